"""JPEG decoding on the CPU: PIL (whole, and at the reduced DCT scale the loader picks for a stage
size), torchvision and TorchCodec, milliseconds per image on one thread, interleaved, medians.

Decides whether the workers' CPU decode should move to TorchCodec (docs/gpu.md). The images are
generated (smooth colour fields with edges, quality 90, 4:2:0); the stage size sets the DCT scale.

    python benchmarks/cpu_decoders.py [--sizes 500x375,1024x768,2048x1536] [--stage 32,64,224] [--repeats 30]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.folder import dct_scale  # noqa: E402


def make_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((1, 3, max(2, height // 16), max(2, width // 16)), dtype=np.float32))
    img = torch.nn.functional.interpolate(low, (height, width), mode="bicubic")[0] * 255
    img[:, height // 3 : height // 3 + 4] = 0  # a few hard edges, as photographs have
    img[:, :, width // 2 : width // 2 + 4] = 255
    out = io.BytesIO()
    Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(out, "JPEG", quality=90)
    return out.getvalue()


def decoders(stage: int) -> dict:
    from torchvision.io import decode_jpeg as torchvision_decode

    def pil(data: bytes, draft: bool):
        with Image.open(io.BytesIO(data)) as im:
            if draft:  # as the loader: the smallest scale that keeps the shorter side >= the stage size
                k = dct_scale(min(im.size), stage)
                im.draft("RGB", (im.size[0] // k, im.size[1] // k))
            return np.asarray(im.convert("RGB"))

    found = {
        "PIL, whole": lambda d: pil(d, False),
        "PIL, reduced DCT": lambda d: pil(d, True),
        "torchvision": lambda d: torchvision_decode(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode="RGB"),
    }
    try:
        from torchcodec.decoders import decode_jpeg as codec_decode

        found["TorchCodec"] = lambda d: codec_decode(d, mode="RGB")
    except Exception as e:  # noqa: BLE001 - not installed, or a build for another torch
        print(f"TorchCodec left out: {type(e).__name__}: {e}", file=sys.stderr)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500x375,1024x768,2048x1536", help="source images, WxH")
    parser.add_argument("--stage", default="32,64,224", help="stage sizes (they set the reduced DCT scale)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    stages = [int(s) for s in args.stage.split(",")]
    cpu = platform.processor() or platform.machine()
    print(f"{date.today()}, torch {torch.__version__}, 1 thread, {cpu}; ms per image, median of {args.repeats}\n")
    names = list(decoders(stages[0]))
    print("| source | stage | DCT scale | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for w, h in sizes:
        data = make_jpeg(w, h, seed=w)
        for stage in stages:
            run = decoders(stage)
            for fn in run.values():  # warm-up: libraries loaded, caches filled
                fn(data)
            times = {name: [] for name in run}
            for _ in range(args.repeats):
                for name, fn in run.items():
                    start = time.perf_counter()
                    fn(data)
                    times[name].append(time.perf_counter() - start)
            ms = [f"{1000 * statistics.median(times[name]):.2f}" for name in names]
            print(f"| {w}x{h} | {stage} | 1/{dct_scale(min(w, h), stage)} | " + " | ".join(ms) + " |")


if __name__ == "__main__":
    main()
