"""Real industrial data (../shared/data, MVTec layout): SOMAD with EfficientNet-Lite0 finds real defects.

Skips cleanly when ../shared is absent. Reduced settings (28x28 SOM, fewer epochs) keep it near a minute on
2 CPU cores; the full paper-setting figures are in docs/benchmarks.md.
"""

import numpy as np
import pytest
import torch

from somad import SOMAD
from somad.evaluation.protocol import evaluate_model, load_test_samples

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def test_metal_plate_real_defects(shared_data, tmp_path):
    category = shared_data / "mpdd_512" / "metal_plate"
    if not category.is_dir():
        pytest.skip("metal_plate is not in ../shared/data")
    model = SOMAD(
        som_size=28,
        k=4,
        rough_epochs=10,
        fine_epochs=8,
        som_samples=50_000,
        crop_size=None,
        device="cpu",
        cv="holdout",  # a tenth held out, as measured (54 images: cv="auto" would cross-fit, 6 fits)
    ).fit(category)
    assert model.n_train_images_ + model.n_val_images_ == 54 and model.image_threshold_ is not None
    assert 0.0 <= model.som_.topographic_error_ < 0.2
    result = evaluate_model(model, load_test_samples(category))
    overall = result["overall"]
    assert result["n_images"] == {"total": 97, "good": 26, "defective": 71, "skipped": 0}
    # Measured at these settings: image AUROC 0.999, pixel AUROC 0.983, AU-PRO 0.915 (chance: 0.5).
    assert overall["image_auroc"] >= 0.85
    assert overall["pixel_auroc"] >= 0.90
    assert overall["au_pro"] >= 0.70
    assert np.isfinite([overall[k] for k in ("image_auroc", "pixel_auroc", "au_pro")]).all()


# somad 0.5.0's default SOMAD (the paper's pipeline: resize 256, crop 224, no local aggregation, eps 0.01, 56x56,
# k=4) on the shared data: image AUROC, pixel AUROC, AU-PRO at the masks' resolution, measured with 0.5.0 itself
# at 2 threads. Tire's row since somad 0.10: its model inputs are resized horizontal pass first on every Pillow
# (somad.resize); Pillow 13's one-call resize took the vertical pass first for its 300x400 portrait frames, so
# 17.5% of its input values moved by one grey level, and the paper preset's image AUROC from 0.7057 to 0.6680
# (pixel AUROC 0.9423 the same, AU-PRO 0.7857 -> 0.7839; 2 and 4 threads equal, 1 thread 0.6713 / 0.9416 /
# 0.7844). metal_plate (square) is unchanged; magnetic_tile's tall frames moved too, within the spread.
PAPER_0_5_0 = {
    ("mpdd_512", "metal_plate"): (0.9648, 0.9723, 0.8076),
    ("mvtec3d_rgb_half", "tire"): (0.6680, 0.9423, 0.7839),
    ("magnetic_tile", "magnetic_tile"): (0.9164, 0.7778, 0.6146),
}
# How far the paper preset's figures move with the arithmetic alone (docs/benchmarks.md "somad 0.8.0"). eps 0.01
# leaves each node with fewer members than dimensions a null space whose orientation depends on every member, so
# the ~2e-5 by which oneDNN's sums differ between 1 and 2 threads (or between CPUs) reassigns a few patches and
# moves the distances along those directions. Measured on metal_plate: AU-PRO 0.8076 (2 and 4 threads), 0.8816 (1
# thread), 0.8393 (oneDNN off) and 0.9068 (an AVX2 machine without AVX-512); image and pixel AUROC within 0.005.
# The default configuration (eps 3) does not see it. The test pins each figure within this measured spread;
# test_deterministic_paper_fit_is_the_same_at_any_thread_count checks the arithmetic that removes it.
PAPER_SPREAD = (0.03, 0.03, 0.10)


def _paper_model(category):
    from somad.cli import apply_preset, build_parser, model_from_args

    argv = ["fit", str(category), "-o", "unused.safetensors", "--preset", "paper", "--device", "cpu"]
    args = build_parser().parse_args(argv)
    apply_preset(args, argv, args.parser)
    return model_from_args(args)


@pytest.mark.parametrize("where", list(PAPER_0_5_0), ids=[w[1] for w in PAPER_0_5_0])
def test_preset_paper_reproduces_0_5_0(shared_data, where):
    """``--preset paper`` is the paper's configuration as 0.5.0 ran it: its figures, within the measured spread of
    the arithmetic (any CPU, any thread count)."""
    category = shared_data.joinpath(*where)
    if not category.is_dir():
        pytest.skip(f"{where[1]} is not in ../shared/data")
    model = _paper_model(category)
    if where[1] == "tire":
        model.val_fraction = 0.1  # 0.5.0 held out 10% of train/good; validation/good did not exist for it
        model.fit([p for p in sorted((category / "train" / "good").glob("*.png"))])
    else:
        model.fit(category)
    overall = evaluate_model(model, load_test_samples(category))["overall"]
    got = tuple(round(overall[k], 4) for k in ("image_auroc", "pixel_auroc", "au_pro"))
    for value, pinned, spread in zip(got, PAPER_0_5_0[where], PAPER_SPREAD):
        assert abs(value - pinned) <= spread, (got, PAPER_0_5_0[where])


def test_deterministic_paper_fit_is_the_same_at_any_thread_count(shared_data, monkeypatch):
    """With SOMAD_DETERMINISTIC=1 the paper preset's fit (SOM, node statistics, thresholds) and scores are the same,
    bit for bit, at 1 and 2 threads: the arithmetic that moves the figures above is the backbone's, and only it."""
    category = shared_data / "mpdd_512" / "metal_plate"
    if not category.is_dir():
        pytest.skip("metal_plate is not in ../shared/data")
    from somad.features.extractor import DETERMINISTIC_ENV

    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    test_images = sorted((category / "test").rglob("*.png"))[::12]
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model = _paper_model(category).fit(category)
            scores, _ = model.predict_maps(test_images)
            runs.append((model, scores))
    finally:
        torch.set_num_threads(threads)
    (a, sa), (b, sb) = runs
    assert torch.equal(a.som_.weights_, b.som_.weights_)
    assert torch.equal(a.gaussians_.counts, b.gaussians_.counts)
    assert torch.equal(a.gaussians_.packed, b.gaussians_.packed)
    assert a.image_threshold_ == b.image_threshold_
    assert np.array_equal(sa, sb)
