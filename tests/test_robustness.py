"""Robustness: every bad input gets a clear error, nothing is lost, model files are safe.

The CLI runs in-process (``somad.cli.main``) with tiny settings (random backbone weights, 64 px, a 4x4 SOM);
only the signal test starts a subprocess. A user error must exit with status 2 and print exactly one line,
``error: ...``, naming the offending file, with no traceback, and leave no output and no temporary file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from somad import SOMAD, load
from somad.cli import main
from somad.errors import ImageLoadError, ModelFileError, NumericalError, SomadError
from somad.features.backbones import BACKBONES
from somad.features.extractor import FeatureExtractor
from somad.io.images import load_image
from somad.io.model_files import FORMAT_VERSION, content_hash, load_model

TINY_PARAMS = dict(
    weights="none",
    image_size=64,
    crop_size=None,
    som_size=4,
    rough_epochs=1,
    fine_epochs=1,
    val_fraction=0.0,
    device="cpu",
    batch_size=8,
)
TINY = [
    "--weights",
    "none",
    "--image-size",
    "64",
    "--crop",
    "none",
    "--som-size",
    "4",
    "--rough-epochs",
    "1",
    "--fine-epochs",
    "1",
    "--val-fraction",
    "0",
    "--device",
    "cpu",
]
LEFTOVER_MARKS = (".tmp", ".partial", ".old")


# ============================================================================================ helpers
def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``somad -q ARGV`` in-process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        rc = main(["-q", *map(str, argv)])
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *fragments) -> str:
    """Exit 2, exactly one stderr line ``error: ...`` holding every fragment, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[Path]:
    """Temporary or partial files and folders anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(LEFTOVER_MARKS)]


def pattern(size=(64, 64), seed=0) -> np.ndarray:
    """A smooth colour pattern plus a little noise, (H, W, 3) uint8."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def save_good(folder: Path, n: int = 4, size=(64, 64), start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(pattern(size, seed=i)).save(path)
        paths.append(path)
    return paths


def encoded(fmt: str, size=(64, 64), **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern(size)).save(buf, fmt, **kwargs)
    return buf.getvalue()


def bad_image_bytes() -> dict[str, bytes]:
    """Unreadable files that carry an image extension, by kind."""
    png = encoded("PNG")
    corrupt = bytearray(png)
    mid = len(png) // 2
    corrupt[mid : mid + 64] = b"\xff" * 64
    return {
        "corrupt.png": bytes(corrupt),
        "truncated.png": png[: len(png) * 6 // 10],
        "truncated_jpeg.jpg": encoded("JPEG")[:600],
        "zero_bytes.png": b"",
        "text.png": b"this is a text file, not an image\n" * 8,
        "pdf_document.tif": encoded("PDF"),  # a format Pillow can write but not read
    }


BAD_KINDS = sorted(bad_image_bytes())


def safetensors_parts(data: bytes) -> tuple[dict, int]:
    """The parsed safetensors header and the offset where the tensor data starts."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


def with_header(data: bytes, header: dict) -> bytes:
    """``data`` with its safetensors header replaced (padded to 8 bytes, as safetensors writes it)."""
    _, start = safetensors_parts(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[start:]


def write_somad_file(
    path: Path, config_json: str, arrays: dict, *, version: str = str(FORMAT_VERSION), fmt: str = "somad"
) -> Path:
    """A hand-made model file whose hash is valid (so that only the named defect is tested)."""
    from safetensors.torch import save_file

    arrays = {k: v.contiguous() for k, v in arrays.items()}
    metadata = {
        "format": fmt,
        "format_version": version,
        "config": config_json,
        "sha256": content_hash(config_json, arrays),
    }
    save_file(arrays, str(path), metadata=metadata)
    return path


# ============================================================================================ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """good/ (4 training images) and an MVTec-style category cat/ with masks."""
    root = tmp_path_factory.mktemp("data")
    save_good(root / "good", 4)
    cat = root / "cat"
    save_good(cat / "train" / "good", 4)
    save_good(cat / "test" / "good", 2, start=10)
    defects = save_good(cat / "test" / "crack", 2, start=20)
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    for path in defects:
        mask = np.zeros((64, 64), np.uint8)
        mask[20:40, 24:44] = 255
        Image.fromarray(mask).save(cat / "ground_truth" / "crack" / f"{path.stem}_mask.png")
    return root


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory) -> Path:
    """A tiny fitted model with a threshold (1 of 4 images held out)."""
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    SOMAD(**{**TINY_PARAMS, "val_fraction": 0.25}).fit(data / "good").save(path)
    return path


@pytest.fixture()
def work(tmp_path) -> Path:
    return tmp_path


# ============================================================================================ images
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_load_image_rejects_bad_file_with_one_line_naming_it(work, kind):
    path = work / kind
    path.write_bytes(bad_image_bytes()[kind])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert "--on-error skip" in message


def test_load_image_rejects_a_directory_named_like_an_image(work):
    (work / "x.png").mkdir()
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(work / "x.png")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_fit_stops_on_a_bad_image_by_default(capsys, work, kind):
    train = work / "train"
    save_good(train, 3)
    (train / kind).write_bytes(bad_image_bytes()[kind])
    out = work / "m.safetensors"
    rc, _, err = cli(capsys, "fit", train, "-o", out, *TINY)
    assert_user_error(rc, err, train / kind)
    assert not out.exists() and leftovers(work) == []


def test_fit_on_error_skip_trains_on_the_rest_and_lists_the_skipped(capsys, work):
    train = work / "train"
    save_good(train, 3)
    for kind, payload in bad_image_bytes().items():
        (train / kind).write_bytes(payload)
    out = work / "m.safetensors"
    rc, stdout, err = cli(capsys, "fit", train, "-o", out, "--on-error", "skip", *TINY)
    assert rc == 0, err
    assert "fitted somad on 3 images" in stdout
    assert f"left out {len(BAD_KINDS)} training image(s), unreadable or refused by the input gate" in err
    for kind in BAD_KINDS:
        assert str(train / kind) in err
    assert load(out).n_train_images_ == 3
    assert leftovers(work) == []


def test_fit_on_error_skip_with_only_bad_images_is_one_error_naming_a_file(capsys, work):
    train = work / "train"
    train.mkdir()
    for kind, payload in bad_image_bytes().items():
        (train / kind).write_bytes(payload)
    out = work / "m.safetensors"
    rc, _, err = cli(capsys, "fit", train, "-o", out, "--on-error", "skip", *TINY)
    line = assert_user_error(rc, err, "no readable training images", f"all {len(BAD_KINDS)} were skipped")
    assert str(train) in line
    assert not out.exists() and leftovers(work) == []


def test_predict_skips_bad_images_by_default_and_lists_them(capsys, work, model_file):
    inputs = work / "in"
    save_good(inputs, 2)
    for kind, payload in bad_image_bytes().items():
        (inputs / kind).write_bytes(payload)
    out = work / "out"
    rc, stdout, err = cli(capsys, "predict", model_file, inputs, "-o", out)
    assert rc == 0, err
    assert "scored 2 images" in stdout
    assert f"skipped {len(BAD_KINDS)} unreadable image(s), listed in {out}/skipped.csv" in err
    assert "Traceback" not in err
    skipped = (out / "skipped.csv").read_text()
    for kind in BAD_KINDS:
        assert str(inputs / kind) in skipped
    scores = (out / "scores.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in scores[1:]] == ["000.png", "001.png"]
    assert leftovers(work) == []


@pytest.mark.parametrize("kind", ["corrupt.png", "zero_bytes.png", "text.png"])
def test_predict_on_error_fail_writes_nothing(capsys, work, model_file, kind):
    inputs = work / "in"
    save_good(inputs, 2)
    (inputs / kind).write_bytes(bad_image_bytes()[kind])
    out = work / "out"
    rc, _, err = cli(capsys, "predict", model_file, inputs, "-o", out, "--on-error", "fail")
    assert_user_error(rc, err, inputs / kind)
    assert not out.exists() and leftovers(work) == []


def test_predict_missing_input_path_is_an_error(capsys, work, model_file):
    rc, _, err = cli(capsys, "predict", model_file, work / "nope.png", "-o", work / "out")
    assert_user_error(rc, err, work / "nope.png", "no such file or folder")
    assert not (work / "out").exists()


def test_directory_named_like_an_image_and_hidden_files_are_ignored(capsys, work, model_file):
    train = work / "train"
    save_good(train, 3)
    (train / "x.png").mkdir()  # a folder with an image name, empty
    (train / ".hidden.png").write_bytes(b"not an image")  # hidden file: ignored
    (train / ".cache").mkdir()
    (train / ".cache" / "thumb.png").write_bytes(b"")  # inside a hidden folder: ignored
    out = work / "m.safetensors"
    rc, stdout, err = cli(capsys, "fit", train, "-o", out, *TINY)  # --on-error fail: any bad file would stop it
    assert rc == 0, err
    assert "fitted somad on 3 images" in stdout

    rc, stdout, err = cli(capsys, "predict", model_file, train, "-o", work / "out")
    assert rc == 0, err
    assert "scored 3 images" in stdout and "skipped" not in err
    assert not (work / "out" / "skipped.csv").exists()

    # Given explicitly, the empty x.png/ folder is a folder without images.
    rc, _, err = cli(capsys, "predict", model_file, train / "x.png", "-o", work / "out2")
    assert_user_error(rc, err, train / "x.png", "no images found")


def test_evaluate_skips_an_unreadable_test_image_by_default(capsys, work, data, model_file):
    cat = work / "cat"
    shutil.copytree(data / "cat", cat)
    (cat / "test" / "crack" / "bad.png").write_bytes(b"garbage")
    out = work / "ev"
    rc, _, err = cli(capsys, "evaluate", model_file, cat, "-o", out, "--no-report")
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"]["skipped"] == 1 and metrics["n_images"]["total"] == 4
    assert str(cat / "test" / "crack" / "bad.png") in (out / "skipped.csv").read_text()

    rc, _, err = cli(capsys, "evaluate", model_file, cat, "-o", work / "ev2", "--no-report", "--on-error", "fail")
    assert_user_error(rc, err, cat / "test" / "crack" / "bad.png")
    assert not (work / "ev2").exists() and leftovers(work) == []


# ---------------------------------------------------------------------------------------- image modes
def _mode_images(folder: Path) -> dict[str, tuple[int, int]]:
    """One file per Pillow mode; returns name -> (height, width) of the upright image."""
    folder.mkdir(parents=True)
    rgb = pattern((40, 30))
    grey = rgb[..., 0]
    sizes = {}

    def put(name, img, **kw):
        img.save(folder / name, **kw)
        sizes[name] = (30, 40)

    put("grey.png", Image.fromarray(grey, "L"))
    put("bilevel.png", Image.fromarray(grey > 128))
    put("grey_alpha.png", Image.fromarray(np.dstack([grey, grey]), "LA"))
    put("rgba.png", Image.fromarray(np.dstack([rgb, grey]), "RGBA"))
    put("palette.png", Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16))
    put("grey16.png", Image.fromarray(grey.astype(np.uint16) * 257))
    put("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    put("float.tif", Image.fromarray(grey.astype(np.float32) / 255.0))
    put("int32.tif", Image.fromarray(grey.astype(np.int32) * 100))
    return sizes


def test_every_image_mode_goes_through_predict(capsys, work, model_file):
    inputs = work / "modes"
    sizes = _mode_images(inputs)
    for name in sizes:
        assert load_image(inputs / name).mode == "RGB"
    out = work / "out"
    rc, stdout, err = cli(capsys, "predict", model_file, inputs, "-o", out, "--save-maps", "--on-error", "fail")
    assert rc == 0, err
    assert f"scored {len(sizes)} images" in stdout
    for name, (h, w) in sizes.items():
        stem = Path(name).with_suffix("")
        assert Image.open(out / "heatmaps" / f"{stem}.png").size == (w, h)
        assert Image.open(out / "masks" / f"{stem}.png").size == (w, h)
        amap = np.load(out / "maps" / f"{stem}.npy")
        assert amap.shape == (h, w) and np.isfinite(amap).all()


def test_exif_orientation_is_applied_before_scoring(capsys, work, model_file):
    inputs = work / "exif"
    inputs.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 48 wide x 32 high, shown 32 wide x 48 high
    Image.fromarray(pattern((48, 32))).save(inputs / "rotated.jpg", exif=exif)
    assert load_image(inputs / "rotated.jpg").size == (32, 48)
    out = work / "out"
    rc, _, err = cli(capsys, "predict", model_file, inputs, "-o", out, "--save-maps")
    assert rc == 0, err
    assert np.load(out / "maps" / "rotated.npy").shape == (48, 32)
    assert Image.open(out / "heatmaps" / "rotated.png").size == (32, 48)


def test_image_smaller_than_the_model_input_is_upscaled_with_a_warning(work, model_file, caplog):
    path = work / "small.png"
    Image.fromarray(pattern((20, 12))).save(path)
    model = load(model_file)
    with caplog.at_level("WARNING"):
        scores, maps = model.predict_maps([path], resolution="original")
    assert "smaller than the model input" in caplog.text and "upscaled" in caplog.text
    assert maps[0].shape == (12, 20) and np.isfinite(scores).all()


# ============================================================================================ datasets
def test_fit_mvtec_category_without_train_good(capsys, work):
    cat = work / "cat"
    save_good(cat / "train" / "images", 2)
    save_good(cat / "test" / "good", 2)
    rc, _, err = cli(capsys, "fit", cat, "-o", work / "m.safetensors", *TINY)
    assert_user_error(rc, err, cat, "no train/good")
    assert not (work / "m.safetensors").exists()


def test_fit_empty_folder(capsys, work):
    (work / "empty").mkdir()
    (work / "empty" / "README.txt").write_text("no images here")
    rc, _, err = cli(capsys, "fit", work / "empty", "-o", work / "m.safetensors", *TINY)
    assert_user_error(rc, err, work / "empty", "no images found")


def test_fit_nonexistent_folder(capsys, work):
    rc, _, err = cli(capsys, "fit", work / "missing", "-o", work / "m.safetensors", *TINY)
    assert_user_error(rc, err, work / "missing", "does not exist")


def test_fit_single_image_keeps_no_threshold_and_says_so(capsys, work):
    train = work / "one"
    save_good(train, 1)
    out = work / "m.safetensors"
    args = [a for a in TINY if a not in ("--val-fraction", "0")]
    rc, stdout, err = cli(capsys, "fit", train, "-o", out, *args, "--val-fraction", "0.1")
    assert rc == 0, err
    assert "fitted somad on 1 images" in stdout
    assert "warning: no threshold was set" in err and "--val-fraction 0.1" in err
    model = load(out)
    assert model.image_threshold_ is None and model.n_val_images_ == 0
    rc, _, err = cli(capsys, "predict", out, train, "-o", work / "out")
    assert rc == 0, err
    assert (work / "out" / "scores.csv").read_text().splitlines()[1].endswith(",,ok,")  # no decision, no scale
    assert not (work / "out" / "masks").exists()


def test_library_warns_when_val_fraction_holds_out_nothing(data, caplog):
    with caplog.at_level("WARNING"):
        model = SOMAD(**{**TINY_PARAMS, "val_fraction": 0.1, "cv": "holdout"}).fit(data / "good")  # round(0.4) = 0
    assert model.image_threshold_ is None
    assert "holds out none" in caplog.text


@pytest.mark.parametrize("resolution", ["original", "model"])
def test_evaluate_mask_of_wrong_size_names_the_mask_and_both_sizes(capsys, work, data, model_file, resolution):
    cat = work / "cat"
    shutil.copytree(data / "cat", cat)
    mask = cat / "ground_truth" / "crack" / "021_mask.png"
    Image.new("L", (32, 24)).save(mask)
    out = work / "ev"
    rc, _, err = cli(capsys, "evaluate", model_file, cat, "-o", out, "--no-report", "--eval-resolution", resolution)
    assert_user_error(rc, err, mask, "24x32", "64x64")
    assert not out.exists() and leftovers(work) == []


def test_evaluate_corrupt_mask_is_one_error_naming_it(capsys, work, data, model_file):
    cat = work / "cat"
    shutil.copytree(data / "cat", cat)
    mask = cat / "ground_truth" / "crack" / "020_mask.png"
    mask.write_bytes(b"not a png")
    rc, _, err = cli(capsys, "evaluate", model_file, cat, "-o", work / "ev", "--no-report")
    line = assert_user_error(rc, err, mask)
    assert "--on-error skip does not skip masks" in line
    assert not (work / "ev").exists() and leftovers(work) == []


def test_evaluate_missing_and_extra_masks_are_warnings(capsys, work, data, model_file, caplog):
    cat = work / "cat"
    shutil.copytree(data / "cat", cat)
    (cat / "ground_truth" / "crack" / "021_mask.png").unlink()
    Image.new("L", (64, 64)).save(cat / "ground_truth" / "crack" / "099_mask.png")
    with caplog.at_level("WARNING"):
        rc, _, err = cli(capsys, "evaluate", model_file, cat, "-o", work / "ev", "--no-report")
    assert rc == 0, err
    assert "have no ground-truth mask" in caplog.text and "021.png" in caplog.text
    assert "have no matching test image" in caplog.text and "099_mask.png" in caplog.text
    assert (work / "ev" / "metrics.json").is_file()


def test_evaluate_test_folders_without_any_masks(capsys, work, data, model_file):
    cat = work / "cat"
    shutil.copytree(data / "cat", cat)
    shutil.rmtree(cat / "ground_truth")
    rc, _, err = cli(capsys, "evaluate", model_file, cat, "-o", work / "ev", "--no-report")
    assert rc == 0, err
    metrics = json.loads((work / "ev" / "metrics.json").read_text())
    assert metrics["overall"]["image_auroc"] is not None and metrics["overall"]["pixel_auroc"] is None

    rc, _, err = cli(
        capsys,
        "evaluate",
        model_file,
        "--good-dir",
        cat / "test" / "good",
        "--defect-dir",
        cat / "test" / "crack",
        "-o",
        work / "ev2",
        "--no-report",
    )
    assert rc == 0, err
    assert json.loads((work / "ev2" / "metrics.json").read_text())["n_images"]["defective"] == 2


def test_evaluate_missing_mask_dir_and_non_category(capsys, work, data, model_file):
    rc, _, err = cli(
        capsys,
        "evaluate",
        model_file,
        "--defect-dir",
        data / "cat" / "test" / "crack",
        "--mask-dir",
        work / "nomasks",
        "-o",
        work / "ev",
        "--no-report",
    )
    assert_user_error(rc, err, work / "nomasks", "mask folder does not exist")
    rc, _, err = cli(capsys, "evaluate", model_file, data / "good", "-o", work / "ev", "--no-report")
    assert_user_error(rc, err, data / "good", "not an MVTec category")
    assert not (work / "ev").exists() and leftovers(work) == []


# ============================================================================================ parameters
def test_unknown_backbone_on_the_cli_lists_the_choices(capsys, work, data):
    rc, _, err = cli(capsys, "fit", data / "good", "-o", work / "m.safetensors", *TINY, "--backbone", "vgg_nope")
    assert rc == 2 and "Traceback" not in err
    assert "invalid choice: 'vgg_nope'" in err
    assert all(name in err for name in BACKBONES)


def test_unknown_backbone_in_the_library_lists_the_valid_ones(data):
    with pytest.raises(SomadError) as info:
        SOMAD(**{**TINY_PARAMS, "backbone": "x"}).fit(data / "good")
    message = str(info.value)
    assert "backbone='x' is invalid" in message and "\n" not in message
    assert all(name in message for name in BACKBONES)


def test_unknown_method_on_the_cli(capsys, work, data):
    rc, _, err = cli(capsys, "fit", data / "good", "-o", work / "m.safetensors", *TINY, "--method", "magic")
    assert rc == 2 and "Traceback" not in err
    assert "invalid choice: 'magic'" in err and "somad" in err


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--k", "17"], ["k=17", "16"]),  # k > number of nodes (4 x 4)
        (["--k", "0"], ["k=0"]),
        (["--som-size", "1"], ["som_size=1", ">= 2"]),
        (["--dims", "500"], ["dims=500", "176"]),  # more than the backbone's channels
        (["--dims", "0"], ["dims=0"]),
        (["--eps", "-0.5"], ["eps=-0.5", ">= 0"]),
        (["--val-fraction", "1"], ["val_fraction=1.0", "< 1"]),
        (["--val-fraction", "-0.1"], ["val_fraction=-0.1"]),
        (["--val-fraction", "nan"], ["val_fraction=nan"]),
        (["--threshold-quantile", "0"], ["threshold_quantile=0.0"]),
        (["--rough-epochs", "-1"], ["rough_epochs"]),
        (["--image-size", "16"], ["image_size=16", ">= 32"]),
        (["--crop", "128"], ["crop_size=128", "image_size=64"]),
        (["--blur-sigma", "-1"], ["blur_sigma=-1.0"]),
    ],
)
def test_bad_parameters_are_one_line_errors(capsys, work, data, args, fragments):
    out = work / "m.safetensors"
    rc, _, err = cli(capsys, "fit", data / "good", "-o", out, *TINY, *args)
    assert_user_error(rc, err, *fragments)
    assert not out.exists() and leftovers(work) == []


@pytest.mark.parametrize("args", [["--val-fraction", "abc"], ["--k", "2.5"], ["--on-error", "ignore"]])
def test_unparsable_parameters_are_argparse_errors(capsys, work, data, args):
    rc, _, err = cli(capsys, "fit", data / "good", "-o", work / "m.safetensors", *TINY, *args)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("somad fit: error: argument")


def test_evaluate_category_and_plain_folders_are_mutually_exclusive(capsys, work, data, model_file):
    rc, _, err = cli(capsys, "evaluate", model_file, data / "cat", "--good-dir", data / "good", "-o", work / "ev")
    assert_user_error(rc, err, "either CATEGORY_DIR or --good-dir", "not both")
    rc, _, err = cli(capsys, "evaluate", model_file, "-o", work / "ev")
    assert_user_error(rc, err, "no test data")
    assert not (work / "ev").exists()


# ============================================================================================ model files
def test_save_is_atomic_and_leaves_no_temp_file(work, data):
    model = SOMAD(**TINY_PARAMS).fit(data / "good")
    model.save(work / "m.safetensors")
    assert sorted(p.name for p in work.iterdir()) == ["m.safetensors"]
    model.save(work / "m.safetensors")  # overwriting too
    assert sorted(p.name for p in work.iterdir()) == ["m.safetensors"]


def _failing_save_file(exc):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)  # half-written
        raise exc

    return save_file


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_save_keeps_the_previous_file(work, data, monkeypatch, exc):
    import safetensors.torch

    path = work / "m.safetensors"
    model = SOMAD(**TINY_PARAMS).fit(data / "good")
    model.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(exc))
    with pytest.raises(type(exc)):
        model.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in work.iterdir()) == ["m.safetensors"]
    monkeypatch.undo()
    load(path)


def test_interrupted_or_failing_save_in_the_cli(capsys, work, data, monkeypatch):
    import errno

    import safetensors.torch

    path = work / "m.safetensors"
    rc, _, err = cli(capsys, "fit", data / "good", "-o", path, *TINY)
    assert rc == 0, err
    before = path.read_bytes()

    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(KeyboardInterrupt()))
    rc, _, err = cli(capsys, "fit", data / "good", "-o", path, "--overwrite", *TINY)
    assert rc == 130 and "interrupted" in err
    assert path.read_bytes() == before and leftovers(work) == []

    # A full disk, as an OSError and as safetensors really reports it (seen in the 1792-dims scale check).
    for full in (
        OSError(errno.ENOSPC, "No space left on device"),
        safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ):
        monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(full))
        rc, _, err = cli(capsys, "fit", data / "good", "-o", path, "--overwrite", *TINY)
        line = assert_user_error(rc, err, path, "No space left on device", "free space")
        assert "serializing" not in line
        assert path.read_bytes() == before and leftovers(work) == []


def test_fit_output_exists_is_a_folder_or_under_a_file(capsys, work, data):
    path = work / "m.safetensors"
    path.write_bytes(b"precious")
    rc, _, err = cli(capsys, "fit", data / "good", "-o", path, *TINY)
    assert_user_error(rc, err, path, "already exists", "--overwrite")
    assert path.read_bytes() == b"precious"

    (work / "folder.safetensors").mkdir()
    rc, _, err = cli(capsys, "fit", data / "good", "-o", work / "folder.safetensors", "--overwrite", *TINY)
    assert_user_error(rc, err, work / "folder.safetensors", "is a folder")

    (work / "afile").write_text("x")
    rc, _, err = cli(capsys, "fit", data / "good", "-o", work / "afile" / "m.safetensors", *TINY)
    assert_user_error(rc, err, work / "afile" / "m.safetensors", f"{work / 'afile'} is not a folder")  # before the fit
    assert leftovers(work) == []


def test_written_files_get_normal_permissions(capsys, work, data, model_file):
    old = os.umask(0o022)
    try:
        rc, _, err = cli(capsys, "fit", data / "good", "-o", work / "m.safetensors", *TINY)
        assert rc == 0, err
        rc, _, err = cli(capsys, "predict", model_file, data / "good", "-o", work / "out")
        assert rc == 0, err
    finally:
        os.umask(old)
    assert (work / "m.safetensors").stat().st_mode & 0o777 == 0o644
    assert (work / "out").stat().st_mode & 0o777 == 0o755
    assert (work / "out" / "scores.csv").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------- rejected model files
def _valid(model_file: Path) -> bytes:
    return model_file.read_bytes()


def _truncated(model_file, path):
    path.write_bytes(_valid(model_file)[: len(_valid(model_file)) // 2])


def _truncated_header(model_file, path):
    path.write_bytes(_valid(model_file)[:20])


def _flipped_tensor_byte(model_file, path):
    data = bytearray(_valid(model_file))
    _, start = safetensors_parts(bytes(data))
    data[start + (len(data) - start) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _tampered_config(model_file, path):
    data = _valid(model_file)
    header, _ = safetensors_parts(data)
    config = json.loads(header["__metadata__"]["config"])
    config["state"]["image_threshold"] = 1e9  # never flag anything
    header["__metadata__"]["config"] = json.dumps(config, sort_keys=True)
    path.write_bytes(with_header(data, header))


def _future_version(model_file, path):
    config, arrays = load_model(model_file)
    write_somad_file(path, json.dumps(config, sort_keys=True), arrays, version=str(FORMAT_VERSION + 1))


def _garbled_version(model_file, path):
    config, arrays = load_model(model_file)
    write_somad_file(path, json.dumps(config, sort_keys=True), arrays, version="one")


def _not_somad(model_file, path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"format": "pt"})


def _random_bytes(model_file, path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _empty(model_file, path):
    path.write_bytes(b"")


def _pickle_renamed(model_file, path):
    path.write_bytes(pickle.dumps({"som_weights": np.zeros((4, 4))}))


def _torch_save_renamed(model_file, path):
    torch.save({"som_weights": torch.zeros(4, 4)}, path)


def _invalid_json_config(model_file, path):
    _, arrays = load_model(model_file)
    write_somad_file(path, "{not json", arrays)


def _config_not_an_object(model_file, path):
    _, arrays = load_model(model_file)
    write_somad_file(path, "[1, 2, 3]", arrays)


def _unknown_method(model_file, path):
    config, arrays = load_model(model_file)
    write_somad_file(path, json.dumps({**config, "method": "magic"}), arrays)


def _config_without_params(model_file, path):
    config, arrays = load_model(model_file)
    write_somad_file(path, json.dumps({"method": "somad", "state": config["state"]}), arrays)


def _unknown_parameter(model_file, path):
    config, arrays = load_model(model_file)
    config["params"]["warp_drive"] = True
    write_somad_file(path, json.dumps(config), arrays)


def _missing_array(model_file, path):
    config, arrays = load_model(model_file)
    del arrays["som_weights"]
    write_somad_file(path, json.dumps(config), arrays)


def _wrong_array_shape(model_file, path):
    config, arrays = load_model(model_file)
    arrays["node_means"] = arrays["node_means"][:, :5]
    write_somad_file(path, json.dumps(config), arrays)


def _scalar_array(model_file, path):
    config, arrays = load_model(model_file)
    arrays["channel_indices"] = torch.tensor(3)
    write_somad_file(path, json.dumps(config), arrays)


REJECTED = {
    "truncated": (_truncated, "not a readable somad model file"),
    "truncated_header": (_truncated_header, "not a readable somad model file"),
    "flipped_tensor_byte": (_flipped_tensor_byte, "content hash mismatch"),
    "tampered_config": (_tampered_config, "content hash mismatch"),
    "future_format_version": (_future_version, f"format version {FORMAT_VERSION + 1} is newer"),
    "garbled_format_version": (_garbled_version, "invalid format version"),
    "non_somad_safetensors": (_not_somad, "not a somad model"),
    "random_bytes": (_random_bytes, "not a readable somad model file"),
    "empty_file": (_empty, "not a readable somad model file"),
    "pickle_renamed": (_pickle_renamed, "not a readable somad model file"),
    "torch_save_renamed": (_torch_save_renamed, "not a readable somad model file"),
    "invalid_json_config": (_invalid_json_config, "config is not valid JSON"),
    "config_not_an_object": (_config_not_an_object, "not a JSON object"),
    "unknown_method": (_unknown_method, "unknown method 'magic'"),
    "config_without_params": (_config_without_params, "params: it is missing"),
    "unknown_parameter": (_unknown_parameter, "do not fit a somad model"),
    "missing_array": (_missing_array, "arrays.som_weights: it is missing"),
    "wrong_array_shape": (_wrong_array_shape, "arrays do not match the config"),
    "scalar_array": (_scalar_array, "must have 1 non-empty dimension"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_load_rejects_bad_model_files(capsys, work, model_file, data, case):
    build, fragment = REJECTED[case]
    path = work / "bad.safetensors"
    build(model_file, path)
    with pytest.raises(ModelFileError) as info:
        load(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert fragment in str(info.value)
    rc, _, err = cli(capsys, "predict", path, data / "good", "-o", work / "out")
    assert_user_error(rc, err, path, fragment)
    assert not (work / "out").exists()


def test_load_rejects_directory_and_missing_file(capsys, work, data):
    (work / "dir.safetensors").mkdir()
    with pytest.raises(ModelFileError, match="is a directory"):
        load(work / "dir.safetensors")
    with pytest.raises(ModelFileError, match="not found"):
        load(work / "missing.safetensors")
    rc, _, err = cli(capsys, "predict", work / "missing.safetensors", data / "good", "-o", work / "out")
    assert_user_error(rc, err, work / "missing.safetensors", "not found")
    rc, _, err = cli(capsys, "predict", work / "dir.safetensors", data / "good", "-o", work / "out")
    assert_user_error(rc, err, work / "dir.safetensors", "is a directory")


class PlantedPayload:
    """Unpickling this object calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_payload_is_never_executed(capsys, work, data):
    # The payload is live: plain unpickling creates its marker.
    probe = work / "probe_marker"
    pickle.loads(pickle.dumps(PlantedPayload(probe)))
    assert probe.exists()

    marker = work / "marker"
    raw = work / "raw_pickle.safetensors"
    raw.write_bytes(pickle.dumps(PlantedPayload(marker)))
    zipped = work / "torch_pickle.safetensors"
    torch.save({"state": PlantedPayload(marker)}, zipped)  # what torch.load(weights_only=False) would run
    for path in (raw, zipped):
        with pytest.raises(ModelFileError):
            load_model(path)
        with pytest.raises(ModelFileError):
            load(path)
        rc, _, err = cli(capsys, "predict", path, data / "good", "-o", work / "out")
        assert_user_error(rc, err, path)
    assert not marker.exists()


# ============================================================================================ interruption
def _start_fit(train: Path, out: Path, extra=()) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOMAD_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "somad.cli", "fit", str(train), "-o", str(out), *TINY, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> list[str]:
    """Read stderr until a line holding ``text`` (the fit has started)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"fit never printed {text!r}: {''.join(seen)}")


def test_sigterm_during_fit_exits_130_and_leaves_no_model_or_temp_file(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    base = pattern((64, 64))
    for i in range(600):  # about 10 s of feature extraction with the tiny settings on one core
        Image.fromarray(np.roll(base, i, axis=1)).save(train / f"{i:04d}.png", compress_level=0)
    fresh = tmp_path / "fresh" / "model.safetensors"
    fresh.parent.mkdir()
    kept = tmp_path / "kept" / "model.safetensors"
    kept.parent.mkdir()
    kept.write_bytes(b"the previous model, byte for byte")

    procs = [_start_fit(train, fresh), _start_fit(train, kept, ["--overwrite"])]
    for proc in procs:
        _wait_for_line(proc, "fitting somad on")
    time.sleep(0.5)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (out, err)
        assert "interrupted; no partial output was left" in err and "Traceback" not in err
        assert "wrote" not in out
    assert list(fresh.parent.iterdir()) == []
    assert [p.name for p in kept.parent.iterdir()] == ["model.safetensors"]
    assert kept.read_bytes() == b"the previous model, byte for byte"


# ============================================================================================ output folders
def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(capsys, work, data, model_file):
    out = work / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc, _, err = cli(capsys, "predict", model_file, data / "good", "-o", out)
    assert_user_error(rc, err, out, "already exists", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"

    rc, _, err = cli(capsys, "predict", model_file, data / "good", "-o", out, "--overwrite")
    assert rc == 0, err
    assert not (out / "precious.txt").exists() and (out / "scores.csv").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["out"]

    (work / "file_out").write_text("x")
    rc, _, err = cli(capsys, "predict", model_file, data / "good", "-o", work / "file_out", "--overwrite")
    assert_user_error(rc, err, work / "file_out", "not a folder")


def test_error_mid_run_keeps_the_previous_output_and_leaves_no_partial(capsys, work, data, model_file):
    inputs = work / "in"
    save_good(inputs, 3)
    (inputs / "001.png").write_bytes(b"broken")  # the second of three
    out = work / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc, _, err = cli(capsys, "predict", model_file, inputs, "-o", out, "--overwrite", "--on-error", "fail")
    assert_user_error(rc, err, inputs / "001.png")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert leftovers(work) == [] and sorted(p.name for p in work.iterdir()) == ["in", "out"]


def test_interrupt_mid_predict_leaves_nothing(capsys, work, data, model_file, monkeypatch):
    import somad.io.outputs

    calls = []
    real = somad.io.outputs.heatmap_overlay

    def overlay(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(somad.io.outputs, "heatmap_overlay", overlay)
    rc, _, err = cli(capsys, "predict", model_file, data / "good", "-o", work / "out")
    assert rc == 130 and "interrupted" in err
    assert list(work.iterdir()) == []


# ============================================================================================ numerics
@pytest.fixture()
def nan_features(monkeypatch):
    real = FeatureExtractor.__call__

    def poisoned(self, batch):
        feats = real(self, batch)
        feats[0, 0, 0, 0] = float("nan")
        return feats

    monkeypatch.setattr(FeatureExtractor, "__call__", poisoned)


def test_nan_features_in_fit_are_one_line_numerical_errors(capsys, work, data, nan_features):
    with pytest.raises(NumericalError):
        SOMAD(**TINY_PARAMS).fit(data / "good")
    out = work / "m.safetensors"
    rc, _, err = cli(capsys, "fit", data / "good", "-o", out, *TINY)
    assert_user_error(rc, err, "NaN/Inf features", "000.png")
    assert not out.exists() and leftovers(work) == []


def test_nan_features_in_predict_are_one_line_numerical_errors(capsys, work, data, model_file, monkeypatch):
    model = load(model_file)
    real = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, b: real(self, b) * float("inf"))
    with pytest.raises(NumericalError):
        model.predict_maps(data / "good")
    rc, _, err = cli(capsys, "predict", model_file, data / "good", "-o", work / "out")
    assert_user_error(rc, err, "NaN/Inf features", "000.png")
    assert list(work.iterdir()) == []


def test_singular_node_covariances_at_eps_zero_still_give_finite_scores(data):
    # 4 images x 256 patches over 16 nodes: ~64 members per node for 176 dimensions, so every covariance is
    # singular without the ridge.
    model = SOMAD(**{**TINY_PARAMS, "eps": 0.0}).fit(data / "good")
    assert torch.isfinite(model.gaussians_.whiteners).all()
    scores, maps = model.predict_maps(data / "cat" / "test" / "crack")
    assert np.isfinite(scores).all() and np.isfinite(maps).all()
    assert (scores > 0).all()


# ============================================================================================ determinism
def test_same_seed_gives_bit_identical_scores_on_cpu(data, work):
    a = SOMAD(**TINY_PARAMS, seed=3).fit(data / "good")
    b = SOMAD(**TINY_PARAMS, seed=3).fit(data / "good")
    test = data / "cat" / "test"
    sa, ma = a.predict_maps([test / "good", test / "crack"])
    sb, mb = b.predict_maps([test / "good", test / "crack"])
    assert sa.tobytes() == sb.tobytes() and ma.tobytes() == mb.tobytes()
    a.save(work / "a.safetensors")
    b.save(work / "b.safetensors")
    arrays_a, arrays_b = load_model(work / "a.safetensors")[1], load_model(work / "b.safetensors")[1]
    assert arrays_a.keys() == arrays_b.keys()
    assert all(torch.equal(arrays_a[k], arrays_b[k]) for k in arrays_a)


def test_predict_with_no_readable_input_is_an_error_and_writes_nothing(capsys, work, model_file):
    inputs = work / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(b"not a png")
    (inputs / "b.png").write_bytes(b"")
    out = work / "out"
    rc, _, err = cli(capsys, "predict", model_file, inputs, "-o", out)
    line = assert_user_error(rc, err, "none of the 2 input images could be read", "a.png")
    assert "Traceback" not in line
    assert not out.exists() and leftovers(work) == []
