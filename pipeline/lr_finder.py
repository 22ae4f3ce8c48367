"""`python -m pipeline lr-find`: the LR range test on one stage's exact setup, from the initial weights.

The algorithm and its plot live in `pipeline.train.range_test`; this is the command around them.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.model import build_model, param_groups
from pipeline.train.checkpoint import seed_everything
from pipeline.train.preflight import prepare
from pipeline.train.range_test import RangeTest, save_range_test, stage_range_test
from pipeline.train.rundir import new_run_dir
from pipeline.train.stage import RunContext, build_stage


def run_lr_find(cfg: Config, stage_index: int, out_dir: Path | None = None, **kwargs) -> tuple[RangeTest, Path]:
    """The range test on stage `stage_index` (its loader, freezing, AMP, compile, Mixup); writes
    `lr_find.csv` and `lr_find.png` in a new folder and returns the result and that folder."""
    if not 0 <= stage_index < len(cfg.stages):
        raise UserError(f"--stage {stage_index}: the file has stages 0 to {len(cfg.stages) - 1}")
    device, datasets, num_classes = prepare(cfg)
    stage = cfg.stages[stage_index]
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, num_classes).to(device)
    run_dir = new_run_dir(Path(out_dir or cfg.run.out_dir), f"{cfg.run.name}-lr-find")  # before: fail early
    ctx = RunContext(cfg, device, model, param_groups(model), num_classes, datasets)
    with build_stage(ctx, stage_index, validation=False) as parts:
        result = stage_range_test(parts, ctx, **kwargs)
    save_range_test(result, run_dir / "lr_find", f"stage {stage_index}: {stage.img_size}px, batch {stage.batch_size}")
    return result, run_dir
