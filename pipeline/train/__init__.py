"""Training: the run plan, stage building, the epoch loop, the step, schedules, checkpoints, checks.

`run.run_training` is the entry point; `run` is the only module that walks through stages.
"""
