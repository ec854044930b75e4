"""Failure classes from the 0.5.0 attack: nothing read is deleted, nothing hangs, outputs are safe to open."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from somad import SOMAD
from somad.cli import main
from somad.errors import NumericalError
from somad.som.node_stats import inverse_cholesky

TINY = dict(
    weights="none", image_size=64, som_size=4, k=2, rough_epochs=1, fine_epochs=1, device="cpu", val_fraction=0.25
)

#: The somad command line in a fresh process.
SOMAD_CLI = [sys.executable, "-c", "import sys; from somad.cli import main; sys.exit(main())", "-q"]


def _pattern(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    base = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(float)
    return np.clip(base + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    good = root / "good"
    good.mkdir()
    for i in range(8):
        Image.fromarray(_pattern(i)).save(good / f"{i:03d}.png")
    model = SOMAD(**TINY).fit(good).save(root / "m.safetensors")
    return root, good, model


def _one_line_error(capsys, argv, *fragments):
    capsys.readouterr()
    assert main(["-q", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for f in fragments:
        assert str(f) in err, (f, err)


def test_an_output_that_is_or_contains_an_input_is_refused_and_the_inputs_stay(setup, capsys):
    root, good, model = setup
    before = sorted(p.name for p in good.iterdir())
    _one_line_error(capsys, ["predict", model, good, "-o", good, "--overwrite"], "is or contains the input")
    _one_line_error(capsys, ["predict", model, good, "-o", root, "--overwrite"], "is or contains the input")
    assert sorted(p.name for p in good.iterdir()) == before and model.is_file()


def test_evaluate_cannot_overwrite_its_category(setup, capsys, tmp_path):
    root, good, model = setup
    cat = tmp_path / "cat"
    for sub in ("train/good", "test/good"):
        (cat / sub).mkdir(parents=True)
        for p in list(good.iterdir())[:3]:
            (cat / sub / p.name).write_bytes(p.read_bytes())
    _one_line_error(capsys, ["evaluate", model, cat, "-o", cat, "--overwrite"], "is or contains the input")
    assert (cat / "train" / "good").is_dir() and len(list((cat / "test" / "good").iterdir())) == 3


def test_a_non_regular_output_is_never_replaced(setup, capsys, tmp_path):
    root, good, model = setup
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    _one_line_error(
        capsys,
        ["fit", good, "-o", fifo, "--overwrite", "--weights", "none", "--image-size", "64"],
        "not a regular file",
    )
    assert fifo.exists() and not fifo.is_file()


def test_a_model_path_that_is_a_pipe_is_refused_without_waiting(setup, tmp_path):
    root, good, _ = setup
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    cmd = [
        *SOMAD_CLI,
        "predict",
        str(fifo),
        str(good),
        "-o",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # 0.5.0 blocked forever here
    assert done.returncode == 2 and "not a regular file" in done.stderr


def test_non_finite_covariances_fail_instead_of_retrying_forever():
    cov = torch.eye(3, dtype=torch.float64)[None].repeat(2, 1, 1)
    cov[1, 0, 0] = float("nan")
    with pytest.raises(NumericalError):
        inverse_cholesky(cov)
    far = torch.tensor([[[1.0, 1e12], [1e12, 1.0]]], dtype=torch.float64)  # an eigenvalue of -1e12: no sane ridge
    with pytest.raises(NumericalError, match="not positive definite"):
        inverse_cholesky(far)


def test_csv_cells_are_safe_in_a_spreadsheet_and_odd_names_round_trip(setup, tmp_path):
    root, good, model = setup
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(_pattern(1)).save(images / "=HYPERLINK(1).png")
    Image.fromarray(_pattern(2)).save(images / "-2+3.png")
    raw = os.fsencode(images) + b"/bad-\xff.png"  # not valid UTF-8
    Image.fromarray(_pattern(3)).save(raw.decode("utf-8", "surrogateescape"))
    out = tmp_path / "out"
    assert main(["-q", "predict", str(model), str(images), "-o", str(out)]) == 0
    text = (out / "scores.csv").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    rows = list(csv.DictReader(text.splitlines()))
    paths = sorted(r["path"] for r in rows)
    assert "'=HYPERLINK(1).png" in paths and "'-2+3.png" in paths  # neutralised, not run as formulas
    assert any(p.startswith("bad-\\udcff") or p.startswith("bad-\\xff") for p in paths)  # escaped, not lost
    assert all(float(r["score"]) > 0 for r in rows)


def test_concurrent_writers_to_one_output_never_lose_a_result(setup, tmp_path):
    """Two real predict processes to one -o: one writes it, the other fails in one line; nothing is lost."""
    root, good, model = setup
    out = tmp_path / "shared-out"
    cmd = [
        *SOMAD_CLI,
        "predict",
        str(model),
        str(good),
        "-o",
        str(out),
    ]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    failed = next(err for rc, err in results if rc == 2)
    assert "already exists" in failed or "another run" in failed
    assert len((out / "scores.csv").read_text().splitlines()) == 1 + 8  # one whole result
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_a_model_file_is_never_replaced_unasked_even_when_it_appears_during_the_fit(setup, tmp_path):
    from somad import load
    from somad.errors import SomadError

    root, good, model_path = setup
    model = load(model_path)
    target = tmp_path / "m.safetensors"
    model.save(target, overwrite=False)
    first = target.read_bytes()
    with pytest.raises(SomadError, match="another run"):
        model.save(target, overwrite=False)  # as a second fit to the same -o would, after its start check
    assert target.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_leftovers_of_a_killed_run_are_removed_and_a_live_runs_are_kept(setup, tmp_path):
    root, good, model = setup
    out = tmp_path / "out"
    dead = tmp_path / ".out.999999999.x1.partial"  # no such process
    dead.mkdir()
    (dead / "scores.csv").write_text("half")
    live = tmp_path / f".out.{os.getpid()}.x2.partial"  # a run still going
    live.mkdir()
    stale_model = tmp_path / ".m.safetensors.999999999.y.tmp"
    stale_model.write_bytes(b"half a model")
    assert main(["-q", "predict", str(model), str(good), "-o", str(out)]) == 0
    assert not dead.exists() and live.is_dir()
    SOMAD(**TINY).fit(good).save(tmp_path / "m.safetensors")
    assert not stale_model.exists()


@pytest.mark.parametrize("method", ["somad", "padim", "patchcore"])
def test_any_single_corrupted_field_fails_at_load_in_one_line(setup, tmp_path, method):
    """Property: every parameter set to a value its rule refuses, every threshold made NaN or text, every array
    made non-finite or cut short, written with a valid hash: load fails with one line naming the file."""
    from somad import load
    from somad.errors import SomadError
    from somad.io.model_files import load_model, save_model
    from somad.methods import METHODS

    root, good, _ = setup
    common = {k: v for k, v in TINY.items() if k in METHODS[method]._get_param_names()}
    extra = {"somad": {}, "padim": {"eps": 0.01}, "patchcore": {"coreset_ratio": 0.5}}[method]
    path = METHODS[method](**common, **extra).fit(good).save(tmp_path / "m.safetensors")
    config, arrays = load_model(path)
    cases = []
    for name, value in config["params"].items():
        # A list is refused by every rule (a text, a choice, a number, or either: cv takes "auto" or a fold count)
        bad = [123] if isinstance(value, str) else float("nan") if isinstance(value, (int, float)) else "x"
        cases.append(("params", name, bad))
    cases += [("state", "image_threshold", float("nan")), ("state", "pixel_threshold", "high")]
    cases += [("arrays", name, "nan") for name, a in arrays.items() if a.is_floating_point()]
    cases += [("arrays", name, "short") for name in arrays]
    for i, (where, name, bad) in enumerate(cases):
        c = {**config, "params": dict(config["params"]), "state": dict(config["state"])}
        a = dict(arrays)
        if where == "arrays":
            a[name] = torch.full_like(a[name], float("nan")) if bad == "nan" else a[name][: max(0, len(a[name]) - 1)]
        else:
            c[where][name] = bad
        broken = save_model(tmp_path / f"bad{i}.safetensors", c, a)
        with pytest.raises(SomadError) as info:
            load(broken)
        message = str(info.value)
        assert str(broken) in message and "\n" not in message, (where, name, bad, message)


# ---------------------------------------------------------------------------------- class 3: memory blow-ups
def _textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 9.0)
    return np.clip(base[..., None] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def test_huge_images_are_reduced_on_decoding_and_their_outputs_agree(setup, tmp_path, monkeypatch, caplog):
    """0.5.0 decoded a 169 MP PNG whole, built its overlay in float64 at full size (about 120 bytes per pixel) and
    died with a MemoryError traceback. Now an image over MAX_DECODED_PIXELS is reduced while it is decoded (JPEG by
    DCT scaling); its outputs are at the reduced size and its mask is non-empty exactly when it is flagged. The
    limit is lowered here so that a small image stands for a huge one."""
    import somad.io.images as images

    root, good, model = setup
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 128 * 96)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_textured(384, 512)).save(inputs / "big.png")  # 4x the limit's side: factor 4
    Image.fromarray(_textured(384, 512, 1)).save(inputs / "photo.jpg", quality=95)
    Image.fromarray(_textured(300, 330, 2)).save(inputs / "odd.tif")  # factor 3, sides not divisible by it
    mask = np.zeros((384, 512), dtype=np.uint8)
    mask[100:200, 100:300] = 255
    Image.fromarray(mask).save(tmp_path / "big_mask.png")
    assert images.load_image(inputs / "photo.jpg").size == (128, 96)
    assert images.image_size(inputs / "photo.jpg") == images.image_size(inputs / "big.png") == (96, 128)
    assert images.image_size(inputs / "odd.tif") == (100, 110) == images.load_image(inputs / "odd.tif").size[::-1]
    assert images.load_mask(tmp_path / "big_mask.png", shape=(96, 128))[25:50, 25:75].all()
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="somad.io.images"):
        assert main(["-q", "predict", str(model), str(inputs), "-o", str(out), "--save-maps"]) == 0
    assert "decoded at 1/4 of its size" in caplog.text
    rows = {r["path"]: r for r in csv.DictReader((out / "scores.csv").open())}
    for name, shape in (("big.png", (96, 128)), ("photo.jpg", (96, 128)), ("odd.tif", (100, 110))):
        stem = name.rsplit(".", 1)[0]
        assert np.load(out / "maps" / f"{stem}.npy").shape == shape
        assert Image.open(out / "heatmaps" / f"{stem}.png").size == shape[::-1]
        m = np.asarray(Image.open(out / "masks" / f"{stem}.png")) > 0
        assert m.shape == shape and m.any() == (rows[name]["is_anomalous"] == "1"), name


def test_the_overlay_needs_a_few_bytes_per_pixel_not_a_hundred():
    """0.5.0 built the overlay through a float64 RGBA colour image of the whole map (about 120 bytes per pixel);
    now it is uint8, blended a band of rows at a time, with the same colours."""
    import tracemalloc

    from somad.io.outputs import heatmap_overlay

    side = 2048
    image = Image.fromarray(_textured(side, side))
    amap = np.random.default_rng(0).normal(0, 1, (side, side)).astype(np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        overlay = heatmap_overlay(image, amap, -2.0, 2.0)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert overlay.size == (side, side) and overlay.mode == "RGB"
    assert peak / side**2 < 24, f"{peak / side**2:.1f} bytes per pixel"
    from matplotlib import colormaps  # the colours are matplotlib's jet, as before

    small, cut = amap[:64, :64], np.asarray(image)[:64, :64] / np.float32(255)
    expected = np.uint8(np.round(255 * (0.5 * cut + 0.5 * colormaps["jet"](np.clip((small + 2) / 4, 0, 1))[..., :3])))
    np.testing.assert_array_equal(
        np.asarray(heatmap_overlay(Image.fromarray(np.asarray(image)[:64, :64]), small, -2, 2)), expected
    )


def test_out_of_memory_in_predict_is_one_line_naming_the_image_or_a_skip(setup, tmp_path, monkeypatch, capsys):
    import somad.io.images as images
    import somad.io.outputs as outputs
    from somad.methods.somad import SOMAD as SOMADClass

    root, good, model = setup
    real_overlay = outputs.heatmap_overlay

    def overlay(image, amap, lo, hi):
        if image.size == (64, 64) and overlay.calls == 1:
            overlay.calls += 1
            raise MemoryError
        overlay.calls += 1
        return real_overlay(image, amap, lo, hi)

    overlay.calls = 0
    monkeypatch.setattr(outputs, "heatmap_overlay", overlay)
    out = tmp_path / "skip"
    assert main(["-q", "predict", str(model), str(good), "-o", str(out), "--on-error", "skip"]) == 0
    skipped = (out / "skipped.csv").read_text()
    assert "001.png: not enough memory to write its outputs" in skipped
    assert len((out / "scores.csv").read_text().splitlines()) == 1 + 7 and not (out / "heatmaps" / "001.png").exists()
    overlay.calls = 0
    _one_line_error(
        capsys, ["predict", model, good, "-o", tmp_path / "fail", "--on-error", "fail"], "001.png", "not enough memory"
    )

    monkeypatch.setattr(outputs, "heatmap_overlay", real_overlay)
    real_convert = images._convert

    def convert(img, path, **kw):
        if str(path).endswith("002.png"):
            raise MemoryError
        return real_convert(img, path, **kw)

    monkeypatch.setattr(images, "_convert", convert)
    out = tmp_path / "decode"
    assert main(["-q", "predict", str(model), str(good), "-o", str(out)]) == 0
    assert "002.png: not enough memory to decode the image" in (out / "skipped.csv").read_text()
    monkeypatch.setattr(images, "_convert", real_convert)

    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(SOMADClass, "_anomaly_maps", no_memory)
    _one_line_error(capsys, ["predict", model, good, "-o", tmp_path / "score"], "000.png", "not enough memory to score")
    assert not (tmp_path / "score").exists()


def test_model_sizes_have_upper_bounds_with_one_line_errors():
    from somad.errors import SomadError

    for params, fragment in (({"image_size": 100000}, "<= 4096"), ({"som_size": 100000}, "<= 256")):
        with pytest.raises(SomadError, match=fragment):
            SOMAD(**params).fit("/nonexistent")


# ---------------------------------------------------------------------------------- class 8: messages
def _deny(monkeypatch, *targets):
    """Make ``targets`` unreadable: for real with chmod when not root, else by failing the calls that read them."""
    targets = [os.fspath(t) for t in targets]
    if os.geteuid() != 0:
        for t in targets:
            os.chmod(t, 0)
            monkeypatch.undo_chmod = getattr(monkeypatch, "undo_chmod", []) + [t]
        return
    import builtins

    def denied(path):
        return os.fspath(path) in targets

    real_scandir, real_listdir, real_open = os.scandir, os.listdir, builtins.open

    def scandir(path="."):
        if denied(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def listdir(path="."):
        if denied(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_listdir(path)

    def open_(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and denied(file):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(builtins, "open", open_)


@pytest.fixture()
def restore_modes(monkeypatch):
    yield
    for t in getattr(monkeypatch, "undo_chmod", []):
        os.chmod(t, 0o755)


def test_an_unlistable_folder_is_reported_as_such_not_as_empty(setup, tmp_path, monkeypatch, capsys, restore_modes):
    """0.5.0: os.walk skipped a folder it could not list, so the error was "no images found ... check the path"."""
    root, good, model = setup
    folder = tmp_path / "locked"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(_pattern(1)).save(folder / "sub" / "a.png")
    _deny(monkeypatch, folder / "sub")
    fragments = (f"cannot list {folder / 'sub'}: permission denied",)
    _one_line_error(capsys, ["predict", model, folder, "-o", tmp_path / "out"], *fragments)
    _one_line_error(capsys, ["fit", folder, "-o", tmp_path / "m.safetensors", "--weights", "none"], *fragments)
    cat = tmp_path / "cat"
    (cat / "test" / "crack").mkdir(parents=True)
    Image.fromarray(_pattern(2)).save(cat / "test" / "crack" / "b.png")
    _deny(monkeypatch, folder / "sub", cat / "test" / "crack")
    _one_line_error(capsys, ["evaluate", model, cat, "-o", tmp_path / "ev"], f"cannot list {cat / 'test' / 'crack'}")


def test_an_unreadable_model_file_says_why(setup, tmp_path, monkeypatch, capsys, restore_modes):
    root, good, model = setup
    data = model.read_bytes()
    cases = {
        "cut.safetensors": (data[:300], "truncated"),
        "cut_arrays.safetensors": (data[: len(data) // 2], "truncated"),
        "tiny.safetensors": (b"abc", "truncated or empty"),
        "picture.safetensors": ((good / "000.png").read_bytes(), "not a safetensors file"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        _one_line_error(capsys, ["predict", tmp_path / name, good, "-o", tmp_path / "o"], name, fragment, "somad fit")
    (tmp_path / "folder.safetensors").mkdir()
    _one_line_error(capsys, ["predict", tmp_path / "folder.safetensors", good, "-o", tmp_path / "o"], "is a directory")
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(data)
    _deny(monkeypatch, locked)
    _one_line_error(capsys, ["predict", locked, good, "-o", tmp_path / "o"], str(locked), "permission denied")
    assert not (tmp_path / "o").exists()


def test_evaluate_needs_test_not_train_and_says_what_is_missing(setup, tmp_path, capsys):
    root, good, model = setup
    cat = tmp_path / "cat"  # no train/: 0.5.0 refused it as "expected test/<type>/ folders" although they exist
    for sub, seeds in (("test/good", (1, 2, 3)), ("test/crack", (4, 5))):
        (cat / sub).mkdir(parents=True)
        for s in seeds:
            Image.fromarray(_pattern(s)).save(cat / sub / f"{s:03d}.png")
    assert main(["-q", "evaluate", str(model), str(cat), "-o", str(tmp_path / "ev"), "--no-report"]) == 0
    _one_line_error(capsys, ["evaluate", model, good, "-o", tmp_path / "ev2"], str(good), "no test/ folder")


def test_one_class_test_sets_explain_their_missing_auroc(setup, tmp_path, capsys):
    import json

    root, good, model = setup
    cat = tmp_path / "cat"
    (cat / "test" / "good").mkdir(parents=True)
    for s in (1, 2, 3):
        Image.fromarray(_pattern(s)).save(cat / "test" / "good" / f"{s:03d}.png")
    capsys.readouterr()
    assert main(["-q", "evaluate", str(model), str(cat), "-o", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    note = "AUROC needs both good and defective images; the test set has only good ones"
    overall = json.loads((tmp_path / "ev" / "metrics.json").read_text())["overall"]
    assert overall["image_auroc"] is None and overall["note"] == note
    assert note in printed and note in (tmp_path / "ev" / "report.html").read_text()
    only_bad = tmp_path / "bad"
    (only_bad / "test" / "crack").mkdir(parents=True)
    for s in (4, 5):
        Image.fromarray(_pattern(s)).save(only_bad / "test" / "crack" / f"{s:03d}.png")
    assert main(["-q", "evaluate", str(model), str(only_bad), "-o", str(tmp_path / "ev2"), "--no-report"]) == 0
    overall = json.loads((tmp_path / "ev2" / "metrics.json").read_text())["overall"]
    assert overall["image_auroc"] is None and "only defective ones" in overall["note"]


def test_fit_into_a_read_only_folder_fails_before_the_fit(setup, tmp_path, monkeypatch, capsys, restore_modes):
    """0.5.0 fitted for minutes, then failed to write the model."""
    import tempfile

    from somad.methods.base import BaseDetector

    root, good, _ = setup
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        os.chmod(target, 0o555)
        monkeypatch.undo_chmod = [target]
    else:
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.fspath(dir) == os.fspath(target):
                raise PermissionError(13, "Permission denied", os.fspath(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    fits = []
    monkeypatch.setattr(BaseDetector, "fit", lambda self, *a, **k: fits.append(1))
    out = target / "m.safetensors"
    _one_line_error(capsys, ["fit", good, "-o", out, "--weights", "none"], str(out), "permission denied", "another -o")
    _one_line_error(
        capsys, ["fit", good, "-o", target / "new" / "m.safetensors", "--weights", "none"], "cannot write in"
    )
    assert fits == [] and list(target.iterdir()) == []


# ---------------------------------------------------------------------------------------------- issue 26, item 6
@pytest.mark.parametrize("value", ["0", "-1", "5000", "two"])
def test_batch_size_is_validated_by_every_command_and_the_api(setup, tmp_path, capsys, value):
    """``predict --batch-size 0`` (or -1) scored the whole run as one batch: about 10 MB per extra image."""
    from somad import load
    from somad.errors import SomadError

    root, good, model = setup
    commands = [
        ["predict", model, good, "-o", tmp_path / "p"],
        ["evaluate", model, "--good-dir", good, "-o", tmp_path / "e"],
        ["calibrate", model, good, "-o", tmp_path / "c.safetensors"],
        ["update", model, good, "-o", tmp_path / "u.safetensors"],
        ["fit", good, "-o", tmp_path / "f.safetensors"],
        ["benchmark", good, "-o", tmp_path / "b"],
    ]
    for argv in commands:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([*map(str, argv), "--batch-size", value])
        assert info.value.code == 2 and "--batch-size" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    if value.lstrip("-").isdigit():
        with pytest.raises(SomadError, match="batch_size"):
            next(load(model).predict_iter(good, batch_size=int(value)))


def test_info_writes_a_models_escape_sequences_out(setup, tmp_path, capsys):
    """``somad info`` printed a model's strings raw: terminal escape sequences reached the terminal."""
    from _forge import rewrite

    _, _, model = setup

    def plant(config):
        config["somad_version"] = "0.7\x1b[2J\x1b]0;title\x07"
        config["state"]["threshold_info"]["source"] = "fit\x1b[1A\r\u202eevil"

    forged = rewrite(model, tmp_path / "escapes.safetensors", edit_config=plant)
    capsys.readouterr()
    assert main(["info", str(forged)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert "0.7\\x1b[2J\\x1b]0;title\\x07" in out and "fit\\x1b[1A\\r\\u202eevil" in out


def test_predict_never_reads_inputs_from_its_own_output(setup, tmp_path, capsys):
    """With ``-o`` inside the folder predicted, a rerun scored the previous run's heatmaps and masks as inputs."""
    import shutil

    _, good, model = setup
    folder = shutil.copytree(good, tmp_path / "images")
    out = folder / "results"
    assert main(["-q", "predict", str(model), str(folder), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "predict", str(model), str(folder), "-o", str(out), "--overwrite"]) == 0
    assert "left out 16 file(s) inside the output folder" in capsys.readouterr().err  # 8 heatmaps, 8 masks
    with open(out / "scores.csv", newline="") as f:
        assert [row["path"] for row in csv.DictReader(f)] == sorted(p.name for p in good.iterdir())
    solo = tmp_path / "solo"  # a folder whose only images are an earlier run's outputs: nothing left to score
    assert main(["-q", "predict", str(model), str(good), "-o", str(solo / "results")]) == 0
    _one_line_error(capsys, ["predict", model, solo, "-o", solo / "results", "--overwrite"], "holds every input")
    assert (solo / "results" / "scores.csv").is_file()


def test_an_output_that_is_a_file_or_the_current_folder_is_refused_with_the_right_fix(
    setup, tmp_path, capsys, monkeypatch
):
    """``-o FILE`` suggested --overwrite, which then failed; ``-o . --overwrite`` said 'Device or resource busy'."""
    _, good, model = setup
    existing = tmp_path / "notes.txt"
    existing.write_text("keep")
    for extra in ([], ["--overwrite"]):
        _one_line_error(capsys, ["predict", model, good, "-o", existing, *extra], "exists and is not a folder")
        assert existing.read_text() == "keep"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out, words in ((".", "is the current folder, which"), ("..", "or one above it")):
        for extra in ([], ["--overwrite"]):
            capsys.readouterr()
            assert main(["-q", "predict", str(model), str(good), "-o", out, *extra]) == 2
            err = capsys.readouterr().err
            assert words in err and "--overwrite" not in err and "busy" not in err
    assert here.is_dir() and not any(here.iterdir()) and existing.read_text() == "keep"
