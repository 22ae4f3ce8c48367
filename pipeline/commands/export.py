"""`python -m pipeline export`: a checkpoint as safetensors weights, TorchScript or ONNX, with timm's config.json.

Each export is read back and checked against the PyTorch model on real validation images.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import StageSpec
from pipeline.errors import UserError
from pipeline.files import atomic_path, atomic_write
from pipeline.options import write_or_fail

if TYPE_CHECKING:
    import torch

    from pipeline.inference import Member

HELP = "a checkpoint as safetensors + timm config.json, TorchScript or ONNX"
FORMATS = {"safetensors": "model.safetensors", "torchscript": "model.pt", "onnx": "model.onnx"}
EXPORT_INSTALL = "pip install -e '.[export]'"
CHECK_IMAGES = 16  # validation images the export is checked on, spread over the folder
EXAMPLE_BATCH = 2  # the batch traced or exported; the check runs another, so a fixed batch would show
TOLERANCE = 1e-3  # largest |logit difference| before the check warns (float32 on CPU: about 1e-6)
# timm's pretrained_cfg keys that describe the network and its input (the input ones are then set to the
# run's); the rest (tag, license, hub ids, paper) describe the weights timm publishes, not these
CONFIG_KEYS = (
    "architecture",
    "num_classes",
    "fixed_input_size",
    "first_conv",
    "classifier",
    "input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
)
TORCHSCRIPT_NOTE = (
    "note: PyTorch deprecates TorchScript (torch.jit); torch.jit.load reads this file while it lasts, "
    "--format onnx or safetensors are the lasting forms"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", type=Path, metavar="RUN_DIR|CKPT", help="a run folder (its best.pt) or a checkpoint")
    parser.add_argument(
        "--format", default="safetensors", metavar="safetensors|torchscript|onnx", help="(default safetensors)"
    )
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with train.ema)")
    parser.add_argument("--img-size", default=None, metavar="N", help="input size (default: as the run validated)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (default: RUN_DIR/export)")


def cmd_export(args: argparse.Namespace) -> int:
    job = load_export(args.target, args.format, args.ema, args.img_size, args.out)
    images, source = check_batch(job)
    write_or_fail(f"--out {job.out}: cannot write", lambda: write_export(job))
    arch, classes = job.member.config["model"]["arch"], len(job.member.classes)
    print(f"exported {job.member.path} ({arch}, {classes} classes, {job.weights} weights, {job.img_size}px)")
    print(f"wrote {job.model_file} and {job.config_file}")
    if job.fmt == "torchscript":
        print(TORCHSCRIPT_NOTE)
    difference = check_export(job, images)
    if difference is None:
        print(f"not checked: onnxruntime is not installed ({EXPORT_INSTALL})")
        return 0
    print(f"checked on {source}: largest |logit difference| to the PyTorch model {difference:.3g}")
    if difference > TOLERANCE:
        print(f"warning: the export differs from the PyTorch model by more than {TOLERANCE:g}", file=sys.stderr)
    return 0


@dataclass
class ExportJob:
    """What one export writes: the model (float32, CPU, eval mode) and the run's last stage."""

    member: Member
    fmt: str
    img_size: int
    stage: StageSpec
    out: Path
    weights: str  # raw | ema

    @property
    def model_file(self) -> Path:
        return self.out / FORMATS[self.fmt]

    @property
    def config_file(self) -> Path:
        return self.out / "config.json"


def load_export(
    target: Path,
    fmt: str = "safetensors",
    use_ema: bool = False,
    img_size: int | str | None = None,
    out: Path | None = None,
) -> ExportJob:
    """Resolve the checkpoint (a run folder: its best.pt) and the export's size (default: the size the
    run validated at) and folder (default: RUN_DIR/export)."""
    import torch

    from pipeline.inference import (
        AUTO,
        check_img_size,
        input_problem,
        last_stage,
        load_member,
        resolve_checkpoint,
        run_folder,
    )
    from pipeline.train.step import Precision

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    size = check_img_size(img_size)
    if size == AUTO:
        raise UserError(f"--img-size {AUTO}: export takes one size; eval --img-size auto finds the best")
    checkpoint = resolve_checkpoint(target, use_ema)
    cpu = torch.device("cpu")
    member = load_member(checkpoint, cpu, use_ema, torch.contiguous_format)  # safetensors saves contiguous tensors
    stage = last_stage(member.config)
    size = size or stage.val_size or stage.img_size
    problem = input_problem([member], size, Precision(None), cpu)
    if problem is not None:
        raise UserError(f"--img-size {size}: {problem}")
    folder = Path(out) if out is not None else run_folder(checkpoint) / "export"
    return ExportJob(member, fmt, size, stage, folder, "ema" if use_ema else "raw")


def write_export(job: ExportJob) -> None:
    """Write the model file and config.json, each atomically."""
    import torch

    model, example = job.member.model, torch.zeros(EXAMPLE_BATCH, 3, job.img_size, job.img_size)
    if job.fmt == "onnx":
        program = onnx_program(model, example, job.member.config["model"]["arch"])  # before anything is written
    if job.fmt == "safetensors":
        from safetensors.torch import save

        weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
        atomic_write(job.model_file, lambda f: f.write(weights))
    else:
        with atomic_path(job.model_file) as tmp:
            if job.fmt == "onnx":
                program.save(str(tmp), external_data=False)  # one file (ONNX's limit for that: 2 GB)
            else:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)  # said once, in TORCHSCRIPT_NOTE
                    torch.jit.save(torch.jit.trace(model, example), str(tmp))
    write_config(job)


def onnx_program(model: torch.nn.Module, example: torch.Tensor, arch: str):
    """torch.onnx's exporter (torch.export based: it needs onnx and onnxscript) with a dynamic batch."""
    import torch

    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ModuleNotFoundError as e:
        raise UserError(f"--format onnx needs the {e.name} package: {EXPORT_INSTALL}") from None
    try:
        return torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - an architecture the exporter cannot take: say so in one line
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--format onnx: torch.onnx cannot export {arch} ({type(e).__name__}: {why}); "
            "--format torchscript or safetensors may"
        ) from None


def write_config(job: ExportJob) -> None:
    """config.json as timm writes it for the hub (architecture, num_classes, label_names, and a
    pretrained_cfg with input size, mean/std, crop_pct, interpolation): the validation transform."""
    from timm.models._hub import save_config_for_hf  # the writer of timm's own save_for_hf

    from pipeline.data.spec import IMAGENET_MEAN, IMAGENET_STD

    model = job.member.model
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k in CONFIG_KEYS}
    data_config = {
        "input_size": (3, job.img_size, job.img_size),
        "interpolation": "bilinear",  # both loaders resize bilinearly, antialiased
        "crop_pct": job.stage.data.crop_pct,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    with atomic_path(job.config_file) as tmp:
        save_config_for_hf(model, tmp, model_config={"label_names": job.member.classes}, data_config=data_config)


def check_batch(job: ExportJob) -> tuple[torch.Tensor, str]:
    """Up to CHECK_IMAGES validation images of the run, spread over its folder, through the validation
    transform at the export's size; random inputs when the folder is gone."""
    import torch

    from pipeline.data import build_loader
    from pipeline.data.demo import demo_root
    from pipeline.data.index import ImageFolderIndex
    from pipeline.inference import collect_images

    val = job.member.config["data"]["val"]
    folder = demo_root() / "val" if val == "demo" else Path(val)
    if not folder.is_dir():
        images = torch.randn(CHECK_IMAGES, 3, job.img_size, job.img_size, generator=torch.Generator().manual_seed(0))
        return images, f"{CHECK_IMAGES} random inputs (data.val {folder} is not there)"
    files = collect_images([folder])
    picked = files[:: max(1, len(files) // CHECK_IMAGES)][:CHECK_IMAGES]
    index = ImageFolderIndex.of(folder, job.member.classes, [(f, k) for k, f in enumerate(picked)])
    data = replace(job.stage.data, backend="tv2", cache=None, workers=0, on_error="skip")
    loader = build_loader(
        data,
        index,
        train=False,
        img_size=job.img_size,
        batch_size=len(picked),
        device=torch.device("cpu"),
        seed=0,
        channels_last=False,
    )
    try:
        images, _ = next(iter(loader))
    finally:
        loader.close()
    return images, f"{len(images)} validation images of {folder}"


def check_export(job: ExportJob, images: torch.Tensor) -> float | None:
    """The largest |logit difference| between the written export, read back as a user would, and the
    PyTorch model on `images`; None when it cannot be run here (ONNX without onnxruntime)."""
    import torch

    with torch.no_grad():
        expected = job.member.model(images)
        if job.fmt == "safetensors":
            import timm

            got = timm.create_model(f"local-dir:{job.out}", pretrained=True).eval()(images)
        elif job.fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
                got = torch.jit.load(str(job.model_file), map_location="cpu")(images)
        else:
            try:
                import onnxruntime
            except ModuleNotFoundError:
                return None
            session = onnxruntime.InferenceSession(str(job.model_file), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(["logits"], {"images": images.contiguous().numpy()})[0])
        return (got.float() - expected.float()).abs().max().item()
