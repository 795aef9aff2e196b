"""Episodes: single-turn groups, multi-attempt episodes, LTE hinted rollouts."""
