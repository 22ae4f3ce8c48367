"""`train.size_jumps`: a run with a jump in training size (24 -> 40 -> 64 px) keeps training at the final
size on a share of every smaller epoch's batches, and mixes the next size into the epoch before a jump."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch

import pipeline.train.loop as loop_mod
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.train.loop import resize_batch
from pipeline.train.plan import EpochPlan, describe_jumps, plan_run
from pipeline.train.run import run_training

STEPS = [
    {"img_size": 24, "batch_size": 8, "epochs": 3},
    {"img_size": 40, "batch_size": 8, "epochs": 2},
    {"img_size": 64, "batch_size": 8, "epochs": 1},
]


def config(tiny_config: dict, stages: list[dict], **train) -> dict:
    cfg = copy.deepcopy(tiny_config)
    cfg["stages"] = copy.deepcopy(stages)
    cfg["train"]["schedule"] = {"scope": "run"}
    cfg["train"].update(train)
    return cfg


def test_a_step_file_plans_final_size_batches_and_a_transition_before_each_jump(tiny_config):
    plan = plan_run(parse_config(config(tiny_config, STEPS)).stages, 40)
    mix = [(e.img_size, e.final_size, e.final_share, e.next_size) for e in plan.epochs]
    assert mix == [
        (24, 64, 0.25, None),
        (24, 64, 0.25, None),
        (24, 64, 0.25, 40),  # the epoch before 24 -> 40
        (40, 64, 0.25, None),
        (40, 64, 0.25, 64),  # the epoch before 40 -> 64
        (64, None, 0.0, None),
    ]
    assert [e.train_sizes for e in plan.epochs[2:5]] == [(24, 40, 64), (40, 64), (40, 64)]
    assert all(e.load_size == 64 for e in plan.epochs)
    assert plan.compiled_shapes() == 3 + 3  # training at 24, 40, 64; validation at each stage's size
    assert plan.epochs[2].size_shares() == pytest.approx({24: 0.375, 40: 0.375, 64: 0.25})
    assert plan.epochs[0].work == pytest.approx(40 * (0.75 * 24**2 + 0.25 * 64**2))
    assert describe_jumps(plan, 1) == (
        "stage 1: 40 -> 64 px jump, 1 transition epoch; 25% of batches at the final 64 px (train.size_jumps)"
    )
    assert describe_jumps(plan, 2) == ""


@pytest.mark.parametrize(
    "stages, train",
    [
        ([{"img_size": [32, 64], "batch_size": 8, "epochs": 6}, {"img_size": 64, "batch_size": 8, "epochs": 2}], {}),
        (STEPS, {"size_jumps": "off"}),
        (STEPS, {"size_jumps": {"ratio": 3.0}}),  # 1.67x and 1.6x steps are not jumps at ratio 3
    ],
)
def test_no_jump_or_switched_off_leaves_the_plan_as_written(tiny_config, stages, train):
    plan = plan_run(parse_config(config(tiny_config, stages, **train)).stages, 40)
    assert all(e.train_sizes == (e.img_size,) and e.work == 40 * e.img_size**2 for e in plan.epochs)


def test_settings_apply_and_bad_ones_are_one_line(tiny_config):
    cfg = config(tiny_config, STEPS, size_jumps={"final_share": 0.5, "transition": False})
    plan = plan_run(parse_config(cfg).stages, 40)
    assert {(e.final_share, e.next_size) for e in plan.epochs[:5]} == {(0.5, None)}
    with pytest.raises(ConfigError, match=r"train\.size_jumps\.final_share: must be in \[0, 1\)"):
        parse_config(config(tiny_config, STEPS, size_jumps={"final_share": 1.0}))
    with pytest.raises(ConfigError, match=r"train\.size_jumps\.ratio: must be above 1"):
        parse_config(config(tiny_config, STEPS, size_jumps={"ratio": 1}))
    staged = config(tiny_config, STEPS)
    staged["stages"][1]["size_jumps"] = "off"
    with pytest.raises(ConfigError, match=r"stages\.1\.size_jumps: set for the whole run, in train\.size_jumps"):
        parse_config(staged)


def test_batch_sizes_are_drawn_from_the_seed_and_index_alone():
    epoch = EpochPlan(0, 2, 24, 24, 8, 8, 8, 4000, 4000, 32000, final_size=64, final_share=0.25, next_size=40)
    sizes = [epoch.batch_px(7, b) for b in range(4000)]
    assert sizes == [epoch.batch_px(7, b) for b in range(4000)]  # a resumed epoch, any process: the same
    assert sizes != [epoch.batch_px(8, b) for b in range(4000)]
    counts = Counter(sizes)
    assert set(counts) == {24, 40, 64} and counts[64] / 4000 == pytest.approx(0.25, abs=0.03)
    early, late = Counter(sizes[:1000]), Counter(sizes[-1000:])
    assert early[40] < 0.15 * 1000 < 0.6 * 1000 < late[40]  # the next size's share rises over the epoch
    plain = EpochPlan(0, 0, 24, 24, 8, 8, 8, 10, 10, 80)
    assert {plain.batch_px(0, b) for b in range(10)} == {24}


def test_resize_batch_keeps_layout_type_and_values():
    x = torch.full((2, 3, 64, 64), 0.5).contiguous(memory_format=torch.channels_last)
    y = resize_batch(x, 24)
    assert y.shape == (2, 3, 24, 24) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, torch.full_like(y, 0.5))
    assert resize_batch(x, 64) is x
    u = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    v = resize_batch(u, 16)
    assert v.dtype == torch.uint8 and v.shape == (2, 3, 16, 16) and v.is_contiguous()
    assert torch.equal(v, resize_batch(u.float(), 16).round().to(torch.uint8))
    board = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2  # the finest detail there is
    small = resize_batch(board.float().expand(1, 3, 64, 64), 24)
    assert small.min() > 0.4 and small.max() < 0.6  # antialiased: its mean, not an aliased pattern


def test_a_run_trains_the_mixed_sizes_and_says_so(tiny_config, tmp_path, monkeypatch, capsys):
    stages = [{"img_size": 8, "batch_size": 8, "epochs": 2}, {"img_size": 16, "batch_size": 8, "epochs": 1}]
    seen = []
    real = loop_mod.resize_batch
    monkeypatch.setattr(loop_mod, "resize_batch", lambda x, size: seen.append((x.shape[-1], size)) or real(x, size))
    run_dir = run_training(parse_config(config(tiny_config, stages)), out_dir=tmp_path)
    out = capsys.readouterr().out
    assert "stage 0: 8 -> 16 px jump, 1 transition epoch; 25% of batches at the final 16 px" in out
    assert len(seen) == 2 * 5 and {loaded for loaded, _ in seen} == {16}  # stage 0 loads at 16 px
    plan = plan_run(parse_config(config(tiny_config, stages)).stages, 40)
    assert [size for _, size in seen] == [plan.epochs[e].batch_px(0, b) for e in (0, 1) for b in range(5)]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["img_size"] for r in epochs if r["kind"] == "epoch"] == [8, 8, 16]
