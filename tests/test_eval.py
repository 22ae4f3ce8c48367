"""`python -m pipeline eval`: metrics, TTA views, ensembles, outputs and errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import timm
import torch

from pipeline import inference
from pipeline.cli import main
from pipeline.commands import eval as evaluate
from pipeline.commands.eval import candidate_sizes, metrics
from pipeline.inference import predict, tta_views
from pipeline.train.step import Precision

CPU = torch.device("cpu")


def symmetric_batches(n=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, 16, 16, generator=g)
        out.append(((x + x.flip(-1)) / 2, torch.randint(0, 5, (4,), generator=g)))
    return out


def test_flip_tta_leaves_mirror_symmetric_images_unchanged():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    data = symmetric_batches()
    plain, labels = predict([model], data, "none", 16, Precision(None), CPU)
    flipped, _ = predict([model], data, "flip", 16, Precision(None), CPU)
    assert torch.allclose(plain, flipped, atol=1e-6)
    assert torch.equal(labels, torch.cat([y for _, y in data]))
    assert torch.allclose(plain.sum(1), torch.ones(len(labels)))


def test_an_ensemble_of_one_checkpoint_twice_is_that_checkpoint():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    other = timm.create_model("test_resnet", num_classes=5).eval()
    data = symmetric_batches()
    one, _ = predict([model], data, "none", 16, Precision(None), CPU)
    two, _ = predict([model, model], data, "none", 16, Precision(None), CPU)
    mixed, _ = predict([model, other], data, "none", 16, Precision(None), CPU)
    single_other, _ = predict([other], data, "none", 16, Precision(None), CPU)
    assert torch.allclose(one, two, atol=1e-6)
    assert torch.allclose(mixed, (one + single_other) / 2, atol=1e-6)  # the average of the softmaxes


def test_tta_views():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert len(tta_views(x, "none", 6)) == 1
    views = tta_views(x, "flip+crops", 4)
    assert len(views) == 10 and all(v.shape == (2, 3, 4, 4) for v in views)
    assert torch.equal(views[0], x[..., 1:5, 1:5]) and torch.equal(views[1], x[..., 1:5, 1:5].flip(-1))
    assert torch.equal(views[8], x[..., 2:, 2:])  # bottom-right corner


def test_the_centre_view_of_flip_and_crops_is_the_validation_crop(tiny_data):
    from pipeline.data.index import scan_image_folder

    from conftest import make_loader

    index = scan_image_folder(tiny_data / "val", "data.val")
    size = 24
    plain = make_loader(index, train=False, size=size, batch=20)
    wide = make_loader(index, train=False, size=math.floor(size / 0.875), batch=20, crop_pct=1.0)
    (x, _), (big, _) = next(iter(plain)), next(iter(wide))
    views = tta_views(big, "flip+crops", size)
    assert big.shape[-1] == 27 and views[0].shape == x.shape
    assert (views[0] - x).abs().max() < 0.05  # the same pixels, up to resampling rounding
    assert (views[2] - x).abs().max() > 0.1  # a corner is another view


def test_metrics_per_class_and_confusion():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    m = metrics(probs, labels, ["a", "b", "c"])
    assert m["top1"] == 75.0 and m["top5"] == 100.0 and m["samples"] == 4
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert m["per_class"]["b"] == {"samples": 2, "top1": 50.0}


def test_eval_cli_reproduces_the_runs_validation(tiny_run, capsys):
    assert main(["eval", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tiny_run / "eval" / "eval.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert result["top1"] == pytest.approx(summary["best_val_top1"])  # best.pt, as the run measured it
    assert result["checkpoints"] == [str(tiny_run / "checkpoints" / "best.pt")]
    assert len(result["per_class"]) == 10 and sum(r["samples"] for r in result["per_class"].values()) == 20
    assert sum(map(sum, result["confusion"])) == 20
    assert (tiny_run / "eval" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "circle_hstripes" in out and "all" in out


def test_eval_cli_tta_ensemble_and_ema(tiny_run, tmp_path):
    last = tiny_run / "checkpoints" / "last.pt"
    args = ["eval", str(last), "--tta", "flip+crops", "--ensemble", str(last), "--ema", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["tta"] == "flip+crops" and result["weights"] == "ema" and len(result["checkpoints"]) == 2
    assert result["samples"] == 20 and result["img_size"] == 24


def test_candidate_sizes_round_half_up_to_multiples_of_8():
    assert candidate_sizes(24) == [24, 32, 40]  # 27.6 -> 24 (the trained size again), 36 -> 40 (a tie, up)
    assert candidate_sizes(100) == [100, 112, 128, 152]  # the trained size is kept even off the grid of 8
    assert candidate_sizes(160) == [160, 184, 208, 240]
    assert candidate_sizes(224) == [224, 256, 288, 336]


def test_search_sizes_keeps_the_best_and_the_smaller_size_on_a_tie(monkeypatch):
    top1 = {24: 50.0, 32: 70.0, 40: 70.0}
    monkeypatch.setattr(inference, "size_problem", lambda setup, size: None)
    monkeypatch.setattr(evaluate, "evaluate_at", lambda setup, size: {"top1": top1[size], "top5": 90.0, "at": size})
    scores, size, rows = evaluate.search_sizes(SimpleNamespace(run_size=24))
    assert size == 32 and scores["at"] == 32  # the metrics written are those of the chosen size
    assert rows == [{"img_size": s, "top1": t, "top5": 90.0} for s, t in top1.items()]


def eval_json(run, out, *extra):
    assert main(["eval", str(run), "--out", str(out), *extra]) == 0
    return json.loads((out / "eval.json").read_text())


def test_eval_img_size_auto_reports_the_best_candidate(tiny_run, tmp_path, capsys):
    checkpoint = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    trained = checkpoint["config"]["stages"][-1]["img_size"]  # S, as eval reads it
    expected = sorted({trained} | {8 * math.floor(trained * f / 8 + 0.5) for f in (1.15, 1.3, 1.5)})
    result = eval_json(tiny_run, tmp_path / "auto", "--img-size", "auto")
    out = capsys.readouterr().out
    assert [row["img_size"] for row in result["sizes"]] == expected
    best = max(result["sizes"], key=lambda row: (row["top1"], -row["img_size"]))
    assert result["img_size"] == best["img_size"] and result["top1"] == best["top1"]
    assert f"chosen: {best['img_size']}px" in out
    for row in result["sizes"]:  # each candidate is what a plain eval at that size measures
        assert f"{row['img_size']:>4}px: top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%" in out
        plain = eval_json(tiny_run, tmp_path / str(row["img_size"]), "--img-size", str(row["img_size"]))
        assert "sizes" not in plain and (plain["top1"], plain["top5"]) == (row["top1"], row["top5"])
        if row is best:
            assert plain["confusion"] == result["confusion"] and plain["per_class"] == result["per_class"]


def vit_checkpoint(tiny_run, tmp_path, arch):
    """tiny_run's last checkpoint with the (untrained) weights of a timm ViT in place of its ResNet."""
    state = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    state.update(arch=arch, state_dict=timm.create_model(arch, num_classes=10).state_dict(), state_dict_ema=None)
    torch.save(state, tmp_path / f"{arch}.pt")
    return tmp_path / f"{arch}.pt"


def test_eval_img_size_auto_skips_sizes_the_model_cannot_take(tiny_run, tmp_path, capsys):
    # test_vit takes multiples of its 16-px patch only: of 24, 32 and 40, just 32
    result = eval_json(vit_checkpoint(tiny_run, tmp_path, "test_vit"), tmp_path / "out", "--img-size", "auto")
    assert [row["img_size"] for row in result["sizes"]] == [32] and result["img_size"] == 32
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2
    for line, size in zip(warnings, (24, 40)):
        assert line.startswith(f"warning: --img-size auto: skipping {size}px: test_vit.pt cannot take it (")
        assert "divisible by patch size" in line
    # test_vit3 takes 160 px only: no candidate is left
    assert main(["eval", str(vit_checkpoint(tiny_run, tmp_path, "test_vit3")), "--img-size", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and err[-1].startswith("error: --img-size auto: the model takes none of the sizes 24, 32, 40")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--img-size", "4"], "--img-size 4: need at least 8"),
        (["--img-size", "banana"], "--img-size banana: expected an integer >= 8 or auto"),
        (["--ensemble", "nowhere.pt"], "nowhere.pt: no such run folder or checkpoint"),
    ],
)
def test_eval_errors_are_one_line(tiny_run, capsys, extra, message):
    assert main(["eval", str(tiny_run), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}"


def test_eval_refuses_other_classes_and_missing_ema(tiny_run, tiny_data, tmp_path, capsys):
    import shutil

    for name in ("one", "two"):
        (tmp_path / "other" / name).mkdir(parents=True)
        shutil.copy(next((tiny_data / "val").rglob("*.jpg")), tmp_path / "other" / name / "a.jpg")
    assert main(["eval", str(tiny_run), "--data", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data: the class folders of") and "not the 10 classes" in err
    no_ema = tmp_path / "no_ema.pt"
    state = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    state["state_dict_ema"] = None
    torch.save(state, no_ema)
    assert main(["eval", str(no_ema), "--ema"]) == 2
    assert "this run kept no EMA weights" in capsys.readouterr().err
