"""The CUDA-only decisions, exercised on CPU with the GPU's answers stood in (docs/gpu.md): RNG states
for more GPUs than are visible, native bf16, a GPU torch cannot use, workers per rank, SyncBatchNorm
and compile, the fused optimizer and the carried loss scale, and the per-stage memory probe."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline import distributed
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.data import resolve_workers
from pipeline.errors import ConfigError
from pipeline.model import build_model, param_groups
from pipeline.train import checkpoint as ckpt
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.memory import check_memory, out_of_memory
from pipeline.train.plan import plan_run
from pipeline.train.run import run_training
from pipeline.train.schedule import build_optimizer
from pipeline.train.stage import RunContext, build_stage, use_compile
from pipeline.train.step import resolve_precision

from conftest import Killed, die_after_saves

CPU, CUDA0 = torch.device("cpu"), torch.device("cuda", 0)


class OneVisibleGpu:
    """torch.cuda.set_rng_state on a machine with one GPU: any other index fails as the real one does."""

    def __init__(self):
        self.calls = []

    def __call__(self, state, device="cuda"):
        index = torch.device(device).index or 0
        if index >= 1:
            raise IndexError("list index out of range")  # default_generators[index]
        self.calls.append((state, index))


def states(n: int) -> list[torch.Tensor]:
    return [torch.full((16,), i, dtype=torch.uint8) for i in range(n)]


def test_cuda_rng_of_a_checkpoint_from_more_gpus_restores_only_the_training_device(monkeypatch):
    fake = OneVisibleGpu()
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: [fake(x, i) for i, x in enumerate(s)])
    saved = ckpt.rng_state(CPU)
    saved["cuda"] = states(8)  # an older checkpoint: one state per GPU of an 8-GPU node
    ckpt.set_rng_state(saved, CUDA0)  # set_rng_state_all here raised IndexError at the second GPU
    assert len(fake.calls) == 1 and torch.equal(fake.calls[0][0], saved["cuda"][0])
    # a checkpoint of this version holds the training device's state alone: any device takes it back
    assert torch.equal(ckpt.cuda_rng_of(states(1), torch.device("cuda", 5)), states(1)[0])
    assert torch.equal(ckpt.cuda_rng_of(states(4), torch.device("cuda", 2)), states(4)[2])
    assert ckpt.cuda_rng_of(states(2), torch.device("cuda", 3)) is None  # not saved: left as it is
    assert ckpt.cuda_rng_of(states(8), CPU) is None
    assert ckpt.rng_state(CPU)["cuda"] == []


def test_an_older_checkpoint_with_eight_gpu_states_resumes_mid_epoch(tiny_config, tmp_path, reference_run):
    cfg = copy.deepcopy(tiny_config)
    cfg["run"].update(checkpoint_every=0, log_every=1)
    reference = reference_run(cfg)
    with pytest.raises(Killed):
        run_training(parse_config(cfg), out_dir=tmp_path / "b", hooks=die_after_saves(3))
    (run_dir,) = (tmp_path / "b").iterdir()
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert state["progress"]["batch"] > 0 and len(state["rng"]) == 1  # mid-epoch; one state per rank
    state["rng"] = {**state["rng"][0], "cuda": states(8)}  # as older versions wrote it: rank 0's, every GPU's
    save_checkpoint([last], state)
    run_training(parse_config(cfg), resume=run_dir)
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["state_dict"] for d in (reference, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact, as any mid-epoch resume


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_takes_bf16_only_where_the_gpu_has_it(monkeypatch, native, expected):
    # Turing (T4): bf16 only emulated; torch's default answer counts emulation as support
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    precision = resolve_precision("auto", CUDA0)
    assert precision.dtype == expected and precision.needs_scaler == (expected == torch.float16)


@pytest.fixture
def no_cuda(monkeypatch):
    """A CUDA 13 build of torch that finds no usable GPU; the driver's version is the test's to set."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    return lambda version: monkeypatch.setattr(distributed, "driver_version", lambda: version)


def test_a_driver_too_old_for_the_torch_build_stops_device_auto(no_cuda, tiny_config, write_yaml, capsys):
    no_cuda(535)
    with pytest.raises(ConfigError, match=r"driver 535 is too old .* needs driver 580 or newer.*run\.device: cpu"):
        distributed.resolve_device("auto")
    assert distributed.resolve_device("cpu") == CPU  # asked for by name: no complaint
    cfg = copy.deepcopy(tiny_config)
    cfg["run"]["device"] = "auto"
    assert main(["run", str(write_yaml(cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NVIDIA driver 535" in err[0]


def test_a_gpu_hidden_or_busy_is_a_warning_and_no_gpu_no_word(no_cuda, monkeypatch, capsys):
    no_cuda(580)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert distributed.resolve_device("auto") == CPU
    assert "cannot use this machine's NVIDIA GPU (CUDA_VISIBLE_DEVICES='')" in capsys.readouterr().err
    no_cuda(None)  # no NVIDIA driver at all
    assert distributed.resolve_device("auto") == CPU and capsys.readouterr().err == ""


def test_the_driver_version_is_read_from_the_kernel_module(monkeypatch, tmp_path):
    texts = {
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023": 535,
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build": 580,
    }
    real = distributed.Path
    for text, version in texts.items():
        (tmp_path / "version").write_text(text + "\nGCC version: gcc 12\n")
        monkeypatch.setattr(distributed, "Path", lambda p: real(tmp_path / "version"))
        assert distributed.driver_version() == version
    monkeypatch.setattr(distributed, "Path", lambda p: real(tmp_path / "absent"))
    assert distributed.driver_version() is None


@pytest.mark.parametrize(("cores", "local", "expected"), [(16, 1, 8), (16, 4, 3), (16, 8, 1), (64, 8, 7), (2, 1, 1)])
def test_auto_workers_are_shared_among_the_processes_of_a_node(monkeypatch, cores, local, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert resolve_workers("auto") == expected
    assert resolve_workers(3) == 3


def test_compile_auto_is_off_with_syncbatchnorm(tiny_config):
    stage = parse_config({**tiny_config, "train": {**tiny_config["train"], "compile": "auto"}}).stages[0]
    assert use_compile(stage, CUDA0) and not use_compile(stage, CPU)
    assert not use_compile(stage, CUDA0, sync_bn=True)  # a graph break at every SyncBatchNorm
    forced = parse_config({**tiny_config, "train": {**tiny_config["train"], "compile": "on"}}).stages[0]
    assert use_compile(forced, CUDA0, sync_bn=True)


@pytest.mark.parametrize(("name", "fused"), [("sgd", True), ("adamw", True), ("lamb", None)])
def test_fused_optimizers_where_torch_has_the_kernel(tiny_config, name, fused):
    opt = parse_config({**tiny_config, "train": {**tiny_config["train"], "optimizer": {"name": name}}}).train.optimizer
    model = torch.nn.Linear(4, 2)
    assert build_optimizer(model, opt, fused=True).defaults.get("fused") == fused
    assert not build_optimizer(model, opt).defaults.get("fused")


def test_the_fp16_loss_scale_goes_on_from_stage_to_stage(tiny_config):
    cfg = parse_config({**tiny_config, "train": {**tiny_config["train"], "amp": "fp16"}})
    model = build_model(cfg.model, 10)
    ctx = RunContext(cfg, CPU, model, param_groups(model), 10)
    plan = plan_run(cfg.stages, 40)
    with build_stage(ctx, 0, plan) as first:
        scaler = first.train_step.scaler
        scaler.scale(torch.ones(()))  # the scale is made at the first step
        scaler.update(1024.0)  # as found by stage 0
    with build_stage(ctx, 1, plan) as second:
        assert second.train_step.scaler is scaler and second.train_step.scaler.get_scale() == 1024.0
    bf16 = parse_config({**tiny_config, "train": {**tiny_config["train"], "amp": "bf16"}})
    ctx.cfg = bf16
    with build_stage(ctx, 0, plan) as third:
        assert third.train_step.scaler is None  # bf16 needs none


class FitsUpTo(torch.nn.Module):
    """A model that runs out of memory above `limit` images, as a GPU would."""

    def __init__(self, model: torch.nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.batches = model, limit, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def probe(tiny_config, limit: int, stages: list[dict], world_size: int = 1):
    cfg = parse_config({**tiny_config, "stages": stages})
    model = FitsUpTo(build_model(cfg.model, 10), limit)
    plan = plan_run(cfg.stages, 40, world_size)
    return cfg, model, lambda: check_memory(model, cfg, plan, param_groups(model), CPU, world_size=world_size)


def test_the_memory_probe_names_the_stage_and_the_largest_batch_that_fits(tiny_config):
    stages = [{"img_size": 16, "batch_size": 6, "epochs": 1}, {"img_size": [16, 24], "batch_size": 12, "epochs": 2}]
    _, model, check = probe(tiny_config, 5, stages)
    with pytest.raises(ConfigError) as e:
        check()
    message = str(e.value)
    assert message.startswith("stages.0: a batch of 6 per process at 16px does not fit")
    # batch_size is the micro-batch: fewer images a pass, more passes a step, the same images a step
    assert "the largest that fitted is 5 per process: set stages.0.batch_size to 5 and its accum_steps to 2" in message
    assert "\n" not in message
    stages[1]["accum_steps"] = 3
    _, model, check = probe(tiny_config, 3, stages[1:], world_size=2)  # 6 per process: 3 fit
    with pytest.raises(ConfigError, match=r"stages\.0: a batch of 6 per process at 24px .* fitted is 3 per process: "):
        check()  # the stage's largest size: the end of its ramp
    assert model.batches[0] == 6
    with pytest.raises(ConfigError, match=r"set stages\.0\.batch_size to 6 and its accum_steps to 6 "):
        check()  # 2 processes x 3; twice the passes of the stage's 3


def test_the_memory_probe_leaves_the_model_as_it_was(tiny_config):
    stages = [{"img_size": 16, "batch_size": 6, "epochs": 1, "freeze": "all_but_head"}]  # channels_last too
    _, model, check = probe(tiny_config, 100, stages)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    draw = torch.rand(1)
    torch.manual_seed(3)
    assert check() == {0: 0}  # no peak to report off CUDA
    assert torch.rand(1) == draw  # RNG put back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())  # as built; each stage sets its own format
    _, model, check = probe(tiny_config, 0, stages)
    with pytest.raises(ConfigError, match="not even one image fits"):
        check()


def test_running_out_of_memory_in_training_is_one_line_that_says_how_to_go_on(
    tiny_config, write_yaml, monkeypatch, capsys, tmp_path
):
    import pipeline.train.run as run_module

    real = run_module.train_epoch

    def train_epoch(*args, stage, **kwargs):
        if stage == 1:  # past the probe: a compiled graph or the optimizer's state did not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(*args, stage=stage, **kwargs)

    monkeypatch.setattr(run_module, "train_epoch", train_epoch)
    assert main(["run", str(write_yaml(tiny_config)), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error")]) == 1 and "Traceback" not in "".join(err)
    err = err[-1]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert err.startswith("error: stage 1: out of device memory; resume with a smaller batch")
    assert f"resume with a smaller batch: python -m pipeline run --resume {run_dir} --set stages.1.batch_size=N" in err
    progress = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert (progress["stage"], progress["epoch"]) == (0, 2)  # stage 0 whole: stage 1 may change on resume


def test_an_out_of_memory_in_a_begun_stage_does_not_advise_a_change_resume_refuses(tmp_path):
    begun = str(out_of_memory(2, tmp_path, begun=True))
    assert "its batch cannot change" in begun and "--set" not in begun
    assert f"expandable_segments:True python -m pipeline run --resume {tmp_path}" in begun
    assert "--set stages.2.batch_size=N" in str(out_of_memory(2, tmp_path, begun=False))
