"""The trainer layer: run state, rollout phase, update phase, eval and the loop.

It uses the library (models, sampling, rl, episodes, rewards, data) and is used
by the thin CLIs (mars.train, mars.evaluate, mars.export). Data flow of one
step, module by module: docs/design.md.
"""
