"""`somad benchmark`: cells run in subprocesses, tables are written, finished cells are not recomputed."""

import json

from somad.benchmark import expand_grid, markdown_table, run_benchmark
from somad.synthetic import make_synthetic_category

COMMON = dict(weights="none", image_size=64, crop_size=None, val_fraction=0.0, device="cpu", batch_size=4)


def test_grid_expands_only_somad():
    cells = expand_grid(["somad", "padim"], {"k": [1, 2], "som_size": [4]})
    assert cells == [("somad", {"k": 1, "som_size": 4}), ("somad", {"k": 2, "som_size": 4}), ("padim", {})]


def test_benchmark_runs_and_resumes(tmp_path):
    cat = make_synthetic_category(tmp_path / "data", n_train=6, n_test_good=2, n_test_defect=2, size=64, seed=0)
    out = tmp_path / "bench"
    own = {"somad": {"rough_epochs": 1, "fine_epochs": 1}}
    rows = run_benchmark([tmp_path / "data"], out, methods=["somad"], common=COMMON, own=own,
                         somad_grid={"k": [2], "som_size": [4]}, threads=1)
    assert len(rows) == 1 and rows[0]["category"] == cat.name
    row = rows[0]
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= row[key] <= 1.0
    assert row["fit_s"] > 0 and row["backbone_ms"] <= row["predict_ms"] and row["model_mb"] > 0
    assert row["fit_rss_gb"] > 0.05 and row["n_test"] == 4
    cell_file = next(p for p in (out / "cells").glob("*.json") if not p.name.endswith(".fit.json"))
    stamp = cell_file.stat().st_mtime_ns
    again = run_benchmark([cat], out, methods=["somad"], common=COMMON, own=own,
                          somad_grid={"k": [2], "som_size": [4]}, threads=1)
    assert again == rows and cell_file.stat().st_mtime_ns == stamp  # resumed, not recomputed
    assert json.loads(cell_file.read_text()) == row
    md = (out / "results.md").read_text()
    assert md == markdown_table(rows) and "somad (som_size=4, k=2)" in md
    assert (out / "results.csv").read_text().count("\n") == 2
    # another k reuses the fitted model (same fit figures) and both cells land in the tables
    more = run_benchmark([cat], out, methods=["somad"], common=COMMON, own=own,
                         somad_grid={"k": [1], "som_size": [4]}, threads=1)
    assert more[0]["fit_s"] == row["fit_s"] and more[0]["k"] == 1
    assert (out / "results.csv").read_text().count("\n") == 3
