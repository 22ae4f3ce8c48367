"""tools/idx_to_folder.py: IDX files (MNIST / Fashion-MNIST layout) to train/val ImageFolders."""

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TOOL = Path(__file__).resolve().parents[1] / "tools" / "idx_to_folder.py"


def write_idx(path: Path, array: np.ndarray, zipped: bool) -> None:
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if zipped else data)


def make_src(root: Path, n_train: int = 12, n_val: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {}
    for i, (prefix, n) in enumerate((("train", n_train), ("t10k", n_val))):
        images = rng.integers(0, 256, size=(n, 5, 7), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 3
        write_idx(root / f"{prefix}-images-idx3-ubyte{'.gz' if i == 0 else ''}", images, zipped=i == 0)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{'.gz' if i == 0 else ''}", labels, zipped=i == 0)
        arrays[prefix] = (images, labels)
    return arrays


def tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_converts_every_image_exactly_gzipped_or_not(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    arrays = make_src(src)
    r = tool(src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images, labels = arrays[prefix]
        files = sorted((tmp_path / "out" / split).rglob("*.png"))
        assert len(files) == len(labels)
        for f in files:
            i = int(f.stem)
            assert f.parent.name == str(labels[i])
            pixels = np.asarray(Image.open(f))
            assert pixels.shape == (5, 7) and (pixels == images[i]).all()
    assert "train: 12 images" in r.stdout and "val: 6 images" in r.stdout


def test_subset_by_count_per_class_and_fashion_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_src(src)
    r = tool(src, tmp_path / "out", "--per-class-train", 2, "--per-class-val", 1, "--names", "fashion")
    assert r.returncode == 0, r.stderr
    train = {d.name: sorted(int(f.stem) for f in d.iterdir()) for d in (tmp_path / "out" / "train").iterdir()}
    assert train == {"t-shirt": [0, 3], "trouser": [1, 4], "pullover": [2, 5]}  # the first N in file order
    assert sum(1 for _ in (tmp_path / "out" / "val").rglob("*.png")) == 3


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_src(src)
    (tmp_path / "taken").mkdir()
    assert tool(src, tmp_path / "taken").returncode == 2
    r = tool(tmp_path / "missing", tmp_path / "o1")
    assert r.returncode == 2 and "no such folder" in r.stderr
    r = tool(src, tmp_path / "o2", "--per-class-train", 0)
    assert r.returncode == 2 and "--per-class-train 0" in r.stderr
    (src / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # header says 9 labels
    r = tool(src, tmp_path / "o3")
    assert r.returncode == 2 and "t10k-labels-idx1-ubyte" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (src / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 10)  # a broken gzip
    r = tool(src, tmp_path / "o4")
    assert r.returncode == 2 and "train-images-idx3-ubyte.gz" in r.stderr
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", ".o")) for p in tmp_path.iterdir())
