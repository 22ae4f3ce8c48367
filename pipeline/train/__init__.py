"""Training: the stage runner, the step, the optimizer and schedule, checkpoints.

`run_training` is the only place that knows there are stages.
"""

from pipeline.train.runner import run_training

__all__ = ["run_training"]
