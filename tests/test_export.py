"""`python -m pipeline export`: parity of each format with the checkpoint, timm's loading, and errors."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.commands.export import FORMATS
from pipeline.data.index import scan_image_folder
from pipeline.inference import load_member

from conftest import make_loader

CPU = torch.device("cpu")
TOLERANCE = 1e-4  # float32 on CPU: the formats agree to about 1e-6
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx and onnxscript not installed: pip install -e '.[export]'")


@pytest.fixture(scope="module")
def val_images(tiny_data):
    """Five validation images at 24 px (the run's last size), through the validation transform."""
    index = scan_image_folder(tiny_data / "val", "data.val")
    images, _ = next(iter(make_loader(index, train=False, size=24, batch=5, channels_last=False)))
    return images


def reported_difference(out: str) -> float:
    match = re.search(r"checked on 16 validation images of \S+: largest \|logit difference\| .* model (\S+)", out)
    assert match, out
    return float(match.group(1))


def load_export(fmt: str, folder):
    """The export as a user loads it: a callable from images to logits."""
    if fmt == "safetensors":
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(folder / "model.pt"))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


@pytest.mark.parametrize(
    "fmt",
    [
        "safetensors",
        "torchscript",
        pytest.param("onnx", marks=[needs_onnx, pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")]),
    ],
)
def test_export_matches_the_checkpoint(tiny_run, tmp_path, capsys, val_images, fmt):
    assert main(["export", str(tiny_run), "--format", fmt, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert reported_difference(out) < TOLERANCE
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", FORMATS[fmt]}
    reference = load_member(tiny_run / "checkpoints" / "best.pt", CPU, False, torch.contiguous_format).model
    exported = load_export(fmt, tmp_path)
    with torch.no_grad():
        for batch in (val_images, val_images[:1]):  # neither is the batch it was traced with: the batch is dynamic
            expected = reference(batch)
            assert (exported(batch) - expected).abs().max().item() < TOLERANCE
    assert expected.abs().max() > 0.01  # real logits, not zeros


def test_safetensors_export_loads_through_timm_with_its_preprocessing(tiny_run, tiny_data, tmp_path, val_images):
    assert main(["export", str(tiny_run), "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    checkpoint = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["label_names"] == checkpoint["classes"]
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [3, 24, 24] and pre["crop_pct"] == 0.875 and pre["interpolation"] == "bilinear"
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert "tag" not in pre and "license" not in pre  # those of timm's published weights, not of this model
    # the reader in timm's own form: the architecture, pretrained=True and the file as an overlay
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(pre, file=str(tmp_path / "model.safetensors")),
    ).eval()
    reference = load_member(tiny_run / "checkpoints" / "best.pt", CPU, False, torch.contiguous_format).model
    with torch.no_grad():
        assert torch.equal(model(val_images), reference(val_images))
    data = timm.data.resolve_data_config(model=model)
    assert (
        tuple(data["input_size"]) == (3, 24, 24) and data["crop_pct"] == 0.875 and data["interpolation"] == "bilinear"
    )
    # timm's transform from that config rebuilds the validation input, up to a level of rounding (PIL's resize)
    transform = timm.data.create_transform(**data)
    files = [path for path, _ in scan_image_folder(tiny_data / "val", "data.val").samples[: len(val_images)]]
    rebuilt = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    assert (rebuilt - val_images).abs().max() < 0.03 and (rebuilt - val_images).abs().mean() < 1e-3
    by_dir = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert by_dir.pretrained_cfg["label_names"] == checkpoint["classes"]
    weights = load_file(tmp_path / "model.safetensors")
    assert weights.keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(weights[k], v) for k, v in checkpoint["state_dict"].items())


def test_export_ema_writes_the_ema_weights(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--ema", "--img-size", "32", "--out", str(tmp_path)]) == 0
    assert "(test_resnet, 10 classes, ema weights, 32px)" in capsys.readouterr().out
    checkpoint = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)  # EMA: the last weights
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in checkpoint["state_dict_ema"].items())
    assert not all(torch.equal(weights[k], v) for k, v in checkpoint["state_dict"].items())
    assert json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 32, 32]


@needs_onnx
def test_onnx_without_onnxruntime_is_exported_and_says_it_was_not_checked(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails as if absent
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not checked: onnxruntime is not installed (pip install -e '.[export]')" in out
    assert "largest" not in out
    assert (tmp_path / "model.onnx").stat().st_size > 10_000 and (tmp_path / "config.json").is_file()


def test_onnx_without_the_exporter_packages_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err in (  # whichever of the two is missing first
        "error: --format onnx needs the onnx package: pip install -e '.[export]'",
        "error: --format onnx needs the onnxscript package: pip install -e '.[export]'",
    )
    assert not (tmp_path / "x").exists()


def test_export_checks_on_random_inputs_when_the_validation_folder_is_gone(tiny_run, tmp_path, capsys):
    state = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["data"]["val"] = str(tmp_path / "moved")
    torch.save(state, tmp_path / "moved.pt")
    assert main(["export", str(tmp_path / "moved.pt"), "--format", "torchscript"]) == 0
    out = capsys.readouterr().out
    assert f"checked on 16 random inputs (data.val {tmp_path / 'moved'} is not there)" in out
    assert (tmp_path / "export" / "model.pt").is_file()  # beside a checkpoint outside a run folder


def test_export_errors_are_one_line(tiny_run, tmp_path, capsys):
    not_ours = tmp_path / "weights.pt"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), not_ours)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should go")
    cases = [
        (["nowhere"], "nowhere: no such run folder or checkpoint"),
        ([str(tmp_path)], f"{tmp_path}: no checkpoint in {tmp_path / 'checkpoints'} (not a run folder?)"),
        ([str(tiny_run), "--format", "pickle"], "--format pickle: expected one of safetensors, torchscript, onnx"),
        (
            [str(not_ours)],
            f"{not_ours}: not a checkpoint of this pipeline (no state_dict, arch, num_classes, classes, config)",
        ),
        ([str(tiny_run), "--img-size", "banana"], "--img-size banana: expected an integer >= 8 or auto"),
        (
            [str(tiny_run), "--img-size", "auto"],
            "--img-size auto: export takes one size; eval --img-size auto finds the best",
        ),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert main(["export", str(tiny_run), "--out", str(blocked / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: --out {blocked / 'sub'}: cannot write (")
