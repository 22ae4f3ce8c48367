"""On a CUDA machine only (skipped elsewhere): the checks docs/gpu.md lists as unrun without a GPU.
Stream ordering of the device decode and of DALI's zero-copy batches, the memory probe, bf16, and
a short run through compile, AMP and the device loaders."""

from __future__ import annotations

import copy
import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig, parse_config
from pipeline.data import build_loader
from pipeline.data.index import scan_image_folder
from pipeline.data.jpeg import decode_jpegs
from pipeline.model import build_model, param_groups
from pipeline.train.memory import check_memory
from pipeline.train.plan import plan_run
from pipeline.train.run import run_training
from pipeline.train.step import resolve_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
CUDA = torch.device("cuda", 0)
SLEEP = 200_000_000  # GPU cycles of torch.cuda._sleep: a kernel still queued when the host goes on


def jpeg_bytes(h: int, w: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


def corrupted_runs(decode, runs: int = 50) -> int:
    """pytorch/vision#9606's harness: blocks of the decoded images' size, freed by the training stream
    while a queued kernel still reads them; a decode that writes into them before that kernel has run
    changes its result."""
    h, w = 256, 320
    items = [jpeg_bytes(h, w, s) for s in range(8)]
    corrupted = 0
    for _ in range(runs):
        blocks = [torch.full((3, h, w), 7, dtype=torch.uint8, device=CUDA) for _ in items]  # one per image
        torch.cuda._sleep(SLEEP)
        total = torch.stack([b.sum(dtype=torch.int64) for b in blocks]).sum()  # queued behind the sleep
        del blocks  # freed on the host now; the sums have not run yet
        decoded = decode(items)
        corrupted += int(total.item() != 7 * len(items) * 3 * h * w)
        del decoded
    return corrupted


def test_device_decode_never_writes_into_memory_a_queued_kernel_still_reads():
    stream = torch.cuda.Stream(CUDA)
    assert corrupted_runs(lambda items: decode_jpegs(items, CUDA, stream)) == 0
    # the control, torchvision's decoder called on the training stream, is what the fence prevents;
    # printed (pytest -s), not asserted: whether it corrupts depends on the GPU and driver
    from torchvision.io import decode_jpeg

    print(f"unfenced torchvision decode: {corrupted_runs(lambda items: decode_jpeg(items, device=CUDA))}/50 corrupted")


def test_decoded_batches_are_the_cpu_decoders_pixels(tmp_path):
    for i in range(16):
        (tmp_path / "c" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / str(i % 2) / f"{i}.jpg").write_bytes(jpeg_bytes(40 + i, 60 - i, i).numpy().tobytes())
    index = scan_image_folder(tmp_path / "c", "data.train")
    batches = {}
    for where in ("workers", "device"):
        loader = build_loader(
            DataConfig(workers=0, decode_on=where), index, train=False, img_size=32, batch_size=8, device=CUDA, seed=0
        )
        batches[where] = [(x.cpu(), y.cpu()) for x, y in loader]
        loader.close()
    for (xa, ya), (xb, yb) in zip(batches["workers"], batches["device"], strict=True):
        assert torch.equal(ya, yb) and (xa - xb).abs().mean() < 0.35  # as on CPU (test_augment)


@pytest.mark.skipif(not HAVE_DALI, reason="DALI not installed")
def test_dali_zero_copy_batches_are_not_reused_while_read(tiny_data):
    """A batch dropped while a queued kernel still reads it keeps its values (DLTensorGraveyard)."""
    index = scan_image_folder(tiny_data / "train", "data.train")
    cfg = DataConfig(backend="dali", workers=2, decode_on="device")
    loader = build_loader(cfg, index, train=True, img_size=32, batch_size=8, device=CUDA, seed=0)
    batches = iter(loader)
    x, _ = next(batches)
    expected = x.sum().item()
    torch.cuda._sleep(SLEEP)
    total = x.sum()
    del x
    for _ in range(3):
        next(batches)
    assert total.item() == pytest.approx(expected)
    loader.close()


@pytest.mark.skipif(not HAVE_DALI, reason="DALI not installed")
def test_dali_memory_does_not_grow_over_epoch_rebuilds(tiny_data):
    index = scan_image_folder(tiny_data / "train", "data.train")
    cfg = DataConfig(backend="dali", workers=2, decode_on="device")
    loader = build_loader(cfg, index, train=True, img_size=32, batch_size=8, device=CUDA, seed=0)
    free = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        torch.cuda.synchronize()
        free.append(torch.cuda.mem_get_info(CUDA)[0])
    loader.close()
    assert free[2] - free[-1] < 64 * 2**20  # after warm-up: less than 64 MiB over 17 rebuilds


def test_the_memory_probe_measures_each_stage(tiny_config):
    cfg = parse_config({**tiny_config, "run": {**tiny_config["run"], "device": "cuda"}})
    model = build_model(cfg.model, 10).to(CUDA)
    peaks = check_memory(model, cfg, plan_run(cfg.stages, 40), param_groups(model), CUDA)
    assert set(peaks) == {0, 1} and all(p > 0 for p in peaks.values())
    assert all(p.grad is None for p in model.parameters())


def test_amp_auto_follows_the_gpus_native_bf16():
    native = torch.cuda.get_device_capability(CUDA)[0] >= 8
    assert resolve_precision("auto", CUDA).dtype == (torch.bfloat16 if native else torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("data", [{"decode_on": "workers"}, {"decode_on": "device"}, {"cache": "decoded"}])
def test_a_short_run_on_the_gpu(tiny_config, tmp_path, data, capsys):
    cfg = copy.deepcopy(tiny_config)
    cfg["run"]["device"] = "auto"
    cfg["train"].update(amp="auto", compile="auto")
    cfg["data"].update(data)
    run_dir = run_training(parse_config(cfg), out_dir=tmp_path / "runs")
    out = capsys.readouterr().out
    assert "device cuda" in out and "compile on" in out and "GiB at its largest size (probe)" in out
    assert (run_dir / "summary.json").is_file()
