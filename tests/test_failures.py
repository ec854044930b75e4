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
        bad = 123 if isinstance(value, str) else float("nan") if isinstance(value, (int, float)) else "x"
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
