"""The command line end to end on a tiny synthetic category: fit, predict, evaluate, and the independent
metric re-computation (scripts/recompute_metrics.py) agreeing with `somad evaluate` to 1e-4."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from somad.cli import main
from somad.io.synthetic import make_synthetic_category

TINY = [
    "--weights",
    "none",
    "--image-size",
    "64",
    "--crop",
    "48",
    "--som-size",
    "6",
    "--k",
    "2",
    "--rough-epochs",
    "2",
    "--fine-epochs",
    "1",
    "--device",
    "cpu",
]
ROOT = Path(__file__).resolve().parents[1]


def _recompute(out, category):
    """scripts/recompute_metrics.py (numpy/scipy/sklearn alone) over an evaluation's saved maps."""
    script = ROOT / "scripts" / "recompute_metrics.py"
    args = ["--maps", str(out / "maps"), "--category", str(category), "--json", str(out / "metrics.json")]
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_synthetic_category(
        tmp_path_factory.mktemp("data"), n_train=10, n_test_good=3, n_test_defect=4, size=80, seed=2
    )


@pytest.fixture(scope="module")
def model_file(category, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m.safetensors"
    assert main(["-q", "fit", str(category), "-o", str(out), *TINY]) == 0
    return out


def test_fit_writes_one_model_file(model_file):
    assert model_file.is_file()
    assert [p.name for p in model_file.parent.iterdir()] == ["m.safetensors"]  # no temp files left


def test_predict_writes_scores_heatmaps_masks_and_maps(model_file, category, tmp_path, capsys):
    out = tmp_path / "pred"
    test_dir = category / "test"
    assert main(["-q", "predict", str(model_file), str(test_dir), "-o", str(out), "--save-maps"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    images = sorted(p.relative_to(test_dir) for p in test_dir.rglob("*.png"))
    assert sorted(Path(r["path"]) for r in rows) == images
    assert all(r["is_anomalous"] in ("0", "1") for r in rows)  # the model has a threshold (val fraction 0.1)
    for rel in images:
        original = Image.open(test_dir / rel)
        heat = Image.open(out / "heatmaps" / rel.with_suffix(".png"))
        full = np.load(out / "maps" / rel.with_suffix(".npy"))
        assert heat.size == original.size and heat.mode == "RGB"
        assert full.shape == (original.height, original.width) and full.dtype == np.float32
        assert (out / "masks" / rel.with_suffix(".png")).is_file()
        score = float(next(r["score"] for r in rows if Path(r["path"]) == rel))
        assert full.max() == pytest.approx(score, rel=1e-4)  # image score = map maximum
    assert "scored 7 images" in capsys.readouterr().out


def test_evaluate_agrees_with_independent_recomputation(model_file, category, tmp_path):
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", str(model_file), str(category), "-o", str(out), "--save-maps"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_defect_type"]) == {"scratch", "spot"}
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= metrics["overall"][key] <= 1.0
    html = (out / "report.html").read_text()
    assert all(f"{r}" in html for r in ("scratch", "spot"))
    check = _recompute(out, category)
    assert check.returncode == 0, check.stdout + check.stderr


def test_evaluate_at_model_resolution(model_file, category, tmp_path):
    out = tmp_path / "eval_model"
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(model_file),
                str(category),
                "-o",
                str(out),
                "--eval-resolution",
                "model",
                "--no-report",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_resolution"] == "model" and not (out / "report.html").exists()


def test_anomalib_verbs_run_the_somad_commands(model_file, category, tmp_path, capsys):
    """`somad train` is `somad fit` and `somad test` is `somad evaluate`, each said in one line on stderr."""
    out = tmp_path / "trained.safetensors"
    assert main(["-q", "train", str(category), "-o", str(out), *TINY]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "note: `somad train` (anomalib's verb) is the same as `somad fit`; running that" and out.is_file()
    assert main(["-q", "test", str(model_file), str(category), "-o", str(tmp_path / "e"), "--no-report"]) == 0
    assert "is the same as `somad evaluate`" in capsys.readouterr().err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["overall"]["image_auroc"] is not None


def test_a_category_without_masks_has_no_pixel_metrics(model_file, tmp_path):
    """Without ground-truth masks there is nothing to measure pixels against: no pixel figure, not a 0."""
    import shutil

    cat = make_synthetic_category(tmp_path / "data", n_train=4, n_test_good=3, n_test_defect=4, size=80, seed=5)
    shutil.rmtree(cat / "ground_truth")
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", str(model_file), str(cat), "-o", str(out), "--no-report"]) == 0
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    assert overall["image_auroc"] is not None and overall["n_images_pixel"] == 3  # the good images' (empty) masks
    for key in ("pixel_auroc", "au_pro", "pixel_f1_max", "pixel_f1", "region_overlap"):
        assert overall[key] is None, key
    assert overall["good_fp_rate"] is not None  # the good test images need no mask


def test_defect_without_mask_counts_for_image_metrics_only(model_file, tmp_path):
    cat = make_synthetic_category(tmp_path / "data", n_train=4, n_test_good=3, n_test_defect=4, size=80, seed=5)
    dropped = sorted((cat / "ground_truth" / "spot").glob("*_mask.png"))[0]
    dropped.unlink()
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", str(model_file), str(cat), "-o", str(out), "--save-maps", "--no-report"]) == 0
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    assert overall["n_images"] == 7 and overall["n_images_pixel"] == 6
    check = _recompute(out, cat)
    assert check.returncode == 0, check.stdout + check.stderr


def test_scoring_overrides_on_a_loaded_model(model_file, category, tmp_path, capsys):
    """`--search exact` (and `load(..., search=, k=)`) change only scoring; other parameters and other
    methods are refused with a one-line error."""
    from somad import load
    from somad.errors import SomadError

    test_dir = category / "test" / "good"
    assert main(["-q", "predict", str(model_file), str(test_dir), "-o", str(tmp_path / "a")]) == 0
    assert main(["-q", "predict", str(model_file), str(test_dir), "-o", str(tmp_path / "b"), "--search", "exact"]) == 0
    a, b = (list(csv.DictReader(open(tmp_path / d / "scores.csv"))) for d in "ab")
    assert [r["score"] for r in a] == [r["score"] for r in b]  # a 6x6 map is searched exhaustively either way
    model = load(model_file, search="exact", k=1)
    assert model.search == "exact" and model.k == 1
    with pytest.raises(SomadError, match="'eps' cannot be changed on a loaded somad model; valid: k, search"):
        load(model_file, eps=1.0)
    with pytest.raises(SomadError, match="k=0"):
        load(model_file, k=0)
    padim = tmp_path / "padim.safetensors"
    assert main(["-q", "fit", str(category), "-o", str(padim), "--method", "padim", *TINY]) == 0
    capsys.readouterr()
    assert main(["predict", str(padim), str(test_dir), "-o", str(tmp_path / "c"), "--search", "exact"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {padim}: 'search' cannot be changed on a loaded padim model; valid: none"]
