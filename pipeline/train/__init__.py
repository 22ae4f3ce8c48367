"""Training: the stage runner (`runner.run_training`), the step, the optimizer and schedule, checkpoints.

The runner is the only place that knows there are stages.
"""
