"""Real industrial data (../shared/data, MVTec layout): SOMAD with EfficientNet-Lite0 finds real defects.

Skips cleanly when ../shared is absent. Reduced settings (28x28 SOM, fewer epochs) keep it near a minute on
2 CPU cores; the full paper-setting figures are in docs/benchmarks.md.
"""

import numpy as np
import pytest

from somad import SOMAD
from somad.evaluate import evaluate_model, load_test_samples

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def test_metal_plate_real_defects(shared_data, tmp_path):
    category = shared_data / "mpdd_512" / "metal_plate"
    if not category.is_dir():
        pytest.skip("metal_plate is not in ../shared/data")
    model = SOMAD(som_size=28, k=4, rough_epochs=10, fine_epochs=8, som_samples=50_000, crop_size=None,
                  device="cpu").fit(category)
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
