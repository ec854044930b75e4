"""`somad benchmark`: cells run in subprocesses, tables are written, finished cells are not recomputed."""

import json

import pytest

from somad.evaluation.benchmark import expand_grid, markdown_table, run_benchmark
from somad.io.synthetic import make_synthetic_category

COMMON = dict(weights="none", image_size=64, crop_size=None, val_fraction=0.0, device="cpu", batch_size=4)


def test_grid_expands_only_somad():
    cells = expand_grid(["somad", "padim"], {"k": [1, 2], "som_size": [4]})
    assert cells == [("somad", {"k": 1, "som_size": 4}), ("somad", {"k": 2, "som_size": 4}), ("padim", {})]


def test_benchmark_runs_and_resumes(tmp_path):
    cat = make_synthetic_category(tmp_path / "data", n_train=6, n_test_good=2, n_test_defect=2, size=64, seed=0)
    out = tmp_path / "bench"
    own = {"somad": {"rough_epochs": 1, "fine_epochs": 1}}
    rows = run_benchmark(
        [tmp_path / "data"],
        out,
        methods=["somad"],
        common=COMMON,
        own=own,
        somad_grid={"k": [2], "som_size": [4]},
        threads=1,
    )
    assert len(rows) == 1 and rows[0]["category"] == cat.name
    row = rows[0]
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= row[key] <= 1.0
    assert row["fit_s"] > 0 and row["backbone_ms"] <= row["predict_ms"] and row["model_mb"] > 0
    assert row["fit_rss_gb"] > 0.05 and row["n_test"] == 4
    cell_file = next(p for p in (out / "cells").glob("*.json") if not p.name.endswith(".fit.json"))
    stamp = cell_file.stat().st_mtime_ns
    again = run_benchmark(
        [cat], out, methods=["somad"], common=COMMON, own=own, somad_grid={"k": [2], "som_size": [4]}, threads=1
    )
    assert again == rows and cell_file.stat().st_mtime_ns == stamp  # resumed, not recomputed
    assert json.loads(cell_file.read_text()) == row
    md = (out / "results.md").read_text()
    assert md == markdown_table(rows) and "somad (som_size=4, k=2)" in md
    assert (out / "results.csv").read_text().count("\n") == 2
    # another k reuses the fitted model (same fit figures) and both cells land in the tables
    more = run_benchmark(
        [cat], out, methods=["somad"], common=COMMON, own=own, somad_grid={"k": [1], "som_size": [4]}, threads=1
    )
    assert more[0]["fit_s"] == row["fit_s"] and more[0]["k"] == 1
    assert (out / "results.csv").read_text().count("\n") == 3


def test_target_table_reports_ratios_and_verdicts():
    from somad.evaluation.benchmark import performance_targets, target_table

    base = dict(category="cat", image_auroc=0.9, pixel_auroc=0.9, au_pro=0.8, model_mb=100.0)
    rows = [
        {
            **base,
            "method": "somad",
            "som_size": 56,
            "k": 4,
            "variant": "fast",
            "predict_ms": 60.0,
            "backbone_ms": 20.0,
            "post_ms": 30.0,
            "fit_s": 30.0,
            "fit_rss_gb": 2.0,
            "au_pro": 0.796,
        },
        {
            **base,
            "method": "somad",
            "som_size": 56,
            "k": 4,
            "variant": "exact",
            "predict_ms": 120.0,
            "backbone_ms": 20.0,
            "post_ms": 90.0,
            "fit_s": 60.0,
            "fit_rss_gb": 3.0,
        },
        {
            **base,
            "method": "somad",
            "som_size": 14,
            "k": 4,
            "variant": "fast",
            "predict_ms": 1.0,
            "backbone_ms": 1.0,
            "post_ms": 1.0,
            "fit_s": 1.0,
            "fit_rss_gb": 0.1,
        },  # an ablation cell: not the paper setting
        {
            **base,
            "method": "padim",
            "predict_ms": 100.0,
            "backbone_ms": 20.0,
            "post_ms": 70.0,
            "fit_s": 12.0,
            "fit_rss_gb": 1.9,
        },
        {
            **base,
            "method": "patchcore",
            "predict_ms": 50.0,
            "backbone_ms": 20.0,
            "post_ms": 20.0,
            "fit_s": 24.0,
            "fit_rss_gb": 1.2,
        },
    ]
    found = {g.name: g for g in performance_targets(rows)["cat"]["targets"]}
    expected = {  # (value, met): the paper-setting fast cell against PaDiM, PatchCore and the exact cell
        "predict ms: SOMAD / PaDiM": (60 / 100, True),
        "predict ms: SOMAD / PatchCore": (60 / 50, False),
        "after-backbone / backbone": (30 / 20, False),
        "fit s: SOMAD / PaDiM": (30 / 12, True),
        "fit s: SOMAD / PatchCore": (30 / 24, False),
        "fit RSS: SOMAD / (PaDiM + SOMAD arrays)": (2.0 / (1.9 + 100 / 1024), False),
        "au_pro: fast - exact, points": (100 * (0.796 - 0.8), True),
        "image_auroc: fast - exact, points": (0.0, True),
    }
    for name, (value, met) in expected.items():
        assert found[name].value == pytest.approx(value) and found[name].met is met, name
    assert performance_targets([r for r in rows if r["method"] != "patchcore"]) == {}  # needs all three methods
    assert target_table([r for r in rows if r["method"] != "patchcore"]) == ""
    # Interleaved latency figures, when present, replace the cells' predict figures; fit figures stay the cells'.
    latency = {
        "cat": {
            "n_images": 5,
            "methods": {
                "somad": {"predict_ms": 50.0, "backbone_ms": 20.0, "post_ms": 25.0},
                "padim": {"predict_ms": 100.0, "backbone_ms": 20.0, "post_ms": 75.0},
                "patchcore": {"predict_ms": 40.0, "backbone_ms": 20.0, "post_ms": 15.0},
            },
        }
    }
    found = {g.name: g for g in performance_targets(rows, latency)["cat"]["targets"]}
    assert found["predict ms: SOMAD / PaDiM"].value == pytest.approx(0.5)
    assert found["after-backbone / backbone"].value == pytest.approx(1.25)
    assert found["fit s: SOMAD / PaDiM"].value == pytest.approx(2.5)
    table = target_table(rows, latency)  # the markdown shows every target with its verdict
    for g in found.values():
        assert any(g.name in ln and ln.endswith(f"| {'yes' if g.met else 'no'} |") for ln in table.splitlines())


def test_interleaved_latency_times_every_model(tmp_path):
    from somad import SOMAD
    from somad.evaluation.benchmark import _run_latency
    from somad.methods import PaDiM

    cat = make_synthetic_category(tmp_path / "data", n_train=4, n_test_good=2, n_test_defect=2, size=64, seed=1)
    paths = {}
    for name, model in (
        ("somad", SOMAD(**COMMON, som_size=4, k=2, rough_epochs=1, fine_epochs=1)),
        ("padim", PaDiM(**COMMON)),
    ):
        paths[name] = str(model.fit(cat).save(tmp_path / f"{name}.safetensors"))
    result = _run_latency({"models": paths, "category": str(cat), "threads": 1, "n_images": 3})
    assert result["n_images"] == 3 and set(result["methods"]) == {"somad", "padim"}
    for figures in result["methods"].values():
        assert 0 < figures["backbone_ms"] < figures["predict_ms"] and 0 < figures["post_ms"] < figures["predict_ms"]


def test_a_category_without_masks_leaves_pixel_metrics_out_as_evaluate_does(tmp_path):
    import shutil

    from somad.evaluation.protocol import evaluate_model, load_test_samples
    from somad.methods import load

    cat = make_synthetic_category(tmp_path / "data", n_train=6, n_test_good=3, n_test_defect=3, size=64, seed=1)
    shutil.rmtree(cat / "ground_truth")
    out = tmp_path / "bench"
    common = {**COMMON, "val_fraction": 0.34}  # thresholds, so that the saved masks are scored
    (row,) = run_benchmark([cat], out, methods=["padim"], common=common, own={}, somad_grid={}, threads=1)
    assert row["image_auroc"] is not None and row["balanced_accuracy"] is not None
    for key in ("pixel_auroc", "au_pro", "pixel_f1", "pixel_f1_max", "region_overlap"):
        assert row[key] is None, key
    # the false-positive pixel rate is the good test images' alone, as evaluate computes it
    model = load(next((out / "models").glob("*.safetensors")))
    evaluated = evaluate_model(model, load_test_samples(cat))["overall"]
    assert row["good_fp_rate"] == pytest.approx(evaluated["good_fp_rate"]) and evaluated["pixel_f1"] is None
    md = (out / "results.md").read_text()
    for title in ("### Pixel AUROC", "### Pixel F1 of the saved masks"):
        table = md.split(title)[1].split("###")[0]
        assert "| padim | n/a |" in table, table
    assert "n/a: the category cannot give the figure" in md
