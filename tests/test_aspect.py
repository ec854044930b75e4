"""The model input's aspect ratio (``aspect``): a fixed camera's frame kept, images of many shapes resized square."""

import logging

import numpy as np
import pytest
from _tiny import stripes, tiny, tiny_common
from PIL import Image

from somad import SOMAD, PaDiM, PatchCore, load
from somad.errors import SomadError
from somad.io.model_files import migrate
from somad.resize import frame_size

TINY = tiny(val_fraction=0.0)


def frames(n, seed, height=80, width=150, defect=False):
    """uint8 (n, H, W, 3) stripes (``_tiny.stripes``), 80x150 by default; with ``defect``, a bright square."""
    return stripes(n, seed, height, width, defect)


@pytest.mark.parametrize(
    "cls, params",
    [
        (SOMAD, TINY),
        (PatchCore, tiny_common(val_fraction=0.0)),
        (PaDiM, tiny_common(val_fraction=0.0, aspect="auto")),  # PaDiM's own default is square (below)
    ],
)
def test_one_frame_is_kept_and_saved(tmp_path, cls, params, caplog):
    """Training images of one size (a fixed camera): the model input is their frame, aspect ratio kept (shorter side
    image_size, multiples of 16); maps cover it, a saved model scores the same, and images of another size are
    resized to it."""
    with caplog.at_level(logging.INFO, logger="somad"):
        model = cls(**params).fit(frames(6, 0))
    assert model.input_frame_ == (64, 128) == frame_size(80, 150, 64)
    assert "model input 128x64: the training images' aspect ratio kept (150x80; aspect='auto')" in caplog.text
    test = [*frames(2, 1), *frames(1, 2, defect=True), *frames(1, 3, 90, 90)]
    scores, maps = model.predict_maps(test)
    assert maps.shape == (4, 64, 128)
    again = load(model.save(tmp_path / "m.safetensors"))
    assert again.input_frame_ == (64, 128) and again.get_params()["aspect"] == "auto"
    np.testing.assert_array_equal(again.predict_maps(test)[0], scores)
    full = model.predict_maps(test, resolution="original")[1]
    assert [m.shape for m in full] == [(80, 150)] * 3 + [(90, 90)]
    assert scores[2] > scores[:2].max()  # the disc is found in the kept frame


def test_many_frames_are_resized_square_unless_kept(caplog):
    """``auto`` over training images of several frames (crops of many shapes) resizes square, and says why;
    ``keep`` takes their median frame; ``square`` never keeps one."""
    mixed = [*frames(3, 0, 80, 150), *frames(2, 1, 150, 80), *frames(2, 2, 80, 160)]
    with caplog.at_level(logging.INFO, logger="somad"):
        auto = SOMAD(**TINY).fit(mixed)
    assert auto.input_frame_ is None and auto.extractor_.geometry.input_shape == (64, 64)
    assert "the training images come in 2 frame sizes, so none is kept" in caplog.text
    kept = SOMAD(**TINY, aspect="keep").fit(mixed)
    assert kept.input_frame_ == frame_size(80, 150, 64) == (64, 128)  # the median size, 80x150
    assert PaDiM(**tiny_common(val_fraction=0.0)).fit(frames(4, 0)).input_frame_ is None  # measured: square
    square = SOMAD(**TINY, aspect="square").fit(frames(4, 0))
    assert square.input_frame_ is None and square.predict_maps(frames(1, 5))[1].shape == (1, 64, 64)
    assert SOMAD(**TINY).fit(frames(4, 0, 90, 90)).input_frame_ is None  # square frames: as before


def test_a_kept_frame_needs_the_whole_image():
    for extra, what in (({"crop_size": 48}, "crop_size=None"), ({"tile_size": 48}, "no tiles")):
        with pytest.raises(SomadError, match=what) as info:
            SOMAD(**TINY, **extra, aspect="keep").fit(frames(2, 0))
        assert "\n" not in str(info.value)
    cropped = SOMAD(**TINY, crop_size=48).fit(frames(3, 0))  # auto: a crop is of a square resize
    assert cropped.input_frame_ is None and cropped.extractor_.geometry.input_shape == (48, 48)


def test_files_before_the_aspect_parameter_were_square():
    config = {"method": "padim", "params": {"image_size": 256}, "state": {}}
    assert migrate(config, {})[0]["params"]["aspect"] == "square"
    config = {"method": "somad", "params": {"aspect": "auto"}, "state": {}}
    assert migrate(config, {})[0]["params"]["aspect"] == "auto"


def test_references_point_into_the_kept_frame():
    """A patch's centre in the original image and the patch covering that pixel are inverse maps through a kept
    frame (each axis its own scale), so an explanation's reference lands where the training patch was."""
    model = SOMAD(**TINY).fit(frames(4, 0))
    gh, gw = model.extractor_.grid_shape
    assert (gh, gw) == (16, 32)
    for size in ((80, 150), (160, 300), (90, 90)):
        for i, j in ((0, 0), (5, 17), (gh - 1, gw - 1)):
            x, y = model._patch_centre(i, j, size)
            assert model._patch_at(x, y, size) == (i, j)
    x, y = model._patch_centre(gh - 1, gw - 1, (80, 150))
    assert 145 < x < 150 and 77 < y < 80


def test_the_exported_graph_resizes_to_the_kept_frame(tmp_path):
    pytest.importorskip("onnxruntime")
    from somad.export.onnx import export_model
    from somad.runtime import OnnxDetector

    model = PatchCore(**tiny_common(val_fraction=0.25, num_neighbors=3)).fit(frames(8, 0))
    test = [*frames(2, 1), *frames(1, 2, defect=True), *frames(1, 3, 90, 90)]
    out = export_model(model, tmp_path / "onnx")
    found = OnnxDetector(out, threads=1).predict([Image.fromarray(a) for a in test])
    native = list(model.predict_iter(test))
    for d, p in zip(found, native):
        assert d.anomaly_map.shape == (64, 128) and abs(d.score - p.score) <= 1e-4 * abs(p.score)
        assert d.is_anomalous == model.verdict(p)
