"""RL core: pure losses and advantage estimators (the jitted update step lives in step.py)."""
from mars.rl import advantages
from mars.rl import losses
