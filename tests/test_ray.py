"""Ray batch scoring and sharded fitting (somad.distributed.ray) against the local code paths.

A local Ray with 2 CPUs is started once for the module; the tests skip cleanly where Ray is not installed
(except the one that checks the message given then).
"""

import csv
import sys

import numpy as np
import pytest
import torch
from _tiny import tiny
from PIL import Image

from somad import SOMAD, load
from somad.cli import main

TINY = tiny(fine_epochs=2)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data")
    base = rng.integers(60, 200, size=(1, 64, 64, 3))
    imgs = np.clip(base + rng.integers(-30, 30, size=(16, 64, 64, 3)), 0, 255).astype(np.uint8)
    imgs[12:, 20:36, 20:36] = 250  # defects
    for name, part in (("train", imgs[:10]), ("test", imgs[10:])):
        (root / name).mkdir()
        for i, a in enumerate(part):
            Image.fromarray(a).save(root / name / f"{i:03d}.png")
    (root / "test" / "broken.png").write_bytes(b"not a png")  # unreadable: skipped by both paths
    model = SOMAD(**TINY, val_fraction=0.3).fit(root / "train")
    model.save(root / "model.safetensors")
    return root


def _scores(out):
    with open(out / "scores.csv") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def _files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_ray_predict_writes_the_same_outputs_as_local_predict(ray_local, folders, tmp_path):
    model, test = str(folders / "model.safetensors"), str(folders / "test")
    assert main(["-q", "predict", model, test, "-o", str(tmp_path / "local"), "--save-maps", "--device", "cpu"]) == 0
    argv = ["-q", "predict", model, test, "-o", str(tmp_path / "ray"), "--save-maps", "--device", "cpu"]
    assert main([*argv, "--ray", "--ray-workers", "2"]) == 0
    local, remote = _scores(tmp_path / "local"), _scores(tmp_path / "ray")
    assert list(local) == list(remote) and len(local) == 6  # same images, same order; broken.png skipped
    for name, row in local.items():
        assert float(remote[name]["score"]) == pytest.approx(float(row["score"]), rel=1e-5)
        assert (remote[name]["is_anomalous"], remote[name]["status"]) == (row["is_anomalous"], row["status"])
    assert {r["is_anomalous"] for r in local.values()} == {"0", "1"}  # both verdicts occur
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")
    for rel in _files(tmp_path / "local"):
        if rel.startswith("maps/"):
            assert np.allclose(np.load(tmp_path / "local" / rel), np.load(tmp_path / "ray" / rel), rtol=1e-5, atol=1e-5)
        if rel.startswith("masks/"):
            a = np.asarray(Image.open(tmp_path / "local" / rel))
            b = np.asarray(Image.open(tmp_path / "ray" / rel))
            assert (a != b).mean() < 1e-3
    assert "broken.png" in (tmp_path / "ray" / "skipped.csv").read_text()


@pytest.mark.slow  # an actor's process is killed and restarted (a minute or two on 2 cores)
def test_a_killed_worker_is_restarted_and_no_image_is_lost_or_repeated(ray_local, folders, tmp_path):
    from somad.distributed.ray import RayScoredModel
    from somad.io.outputs import write_predictions

    path = folders / "model.safetensors"
    model = load(path)
    marker = tmp_path / "crashed"
    scorer = RayScoredModel(model, path, workers=2, crash_marker=str(marker))
    images = sorted((folders / "test").glob("0*.png"))
    from somad.methods.base import as_items

    items = as_items([str(p) for p in images])
    (tmp_path / "out").mkdir()
    rows, skipped = write_predictions(scorer, items, tmp_path / "out", save_maps=False, on_error="fail")
    assert marker.exists()  # a worker process did die mid-run
    assert [r[0] for r in rows] == [it.name for it in items] and not skipped  # each image once, in order
    local = model.predict_maps([str(p) for p in images])[0]
    assert np.allclose([float(r[1]) for r in rows], local, rtol=1e-5)
    assert scorer.ray_stats_["images"] == len(items)


def test_ray_fit_matches_the_local_fit(ray_local, folders, tmp_path, capsys):
    """`somad fit --ray` on 2 workers against a local fit with the same parameters and seed."""
    params = {**TINY, "som_samples": 1500, "val_fraction": 0.2, "scatter_dtype": "float32"}  # of 10 x 256 patches
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker: the same feature arithmetic (float16 patches amplify rounding)
    try:
        local = SOMAD(**params).fit(folders / "train")
    finally:
        torch.set_num_threads(threads)
    flags = ["--weights", "none", "--image-size", "64", "--som-size", "4", "--k", "2", "--rough-epochs", "2"]
    flags += ["--fine-epochs", "2", "--som-samples", "1500", "--val-fraction", "0.2", "--device", "cpu"]
    out = tmp_path / "ray.safetensors"
    argv = ["-q", "fit", str(folders / "train"), "-o", str(out), *flags, "--updatable", "--batch-size", "4"]
    assert main([*argv, "--ray", "--ray-workers", "2"]) == 0
    remote = load(out)
    assert torch.allclose(remote.som_.weights_, local.som_.weights_, rtol=1e-5, atol=1e-5)
    assert torch.equal(remote.gaussians_.counts, local.gaussians_.counts)
    assert torch.allclose(remote.gaussians_.means, local.gaussians_.means, atol=1e-5)
    w, v = remote.gaussians_.whiteners.float(), local.gaussians_.whiteners.float()
    assert float((w - v).abs().max()) <= 2e-3 * float(v.abs().max())  # float16 factors: an ulp at most
    assert remote.som_.quantization_error_ == pytest.approx(local.som_.quantization_error_, rel=1e-5)
    # 10 images: cross-fitted (the fold models sharded too), thresholds from all 10 out-of-fold scores
    assert remote.threshold_info_["rule"] == local.threshold_info_["rule"] == "cross_fit"
    assert remote.image_threshold_ == pytest.approx(local.image_threshold_, rel=1e-4)
    test = sorted(str(p) for p in (folders / "test").glob("0*.png"))
    assert np.allclose(remote.predict_maps(test)[0], local.predict_maps(test)[0], rtol=1e-4)
    assert remote.n_train_images_ == local.n_train_images_ == 10 and remote.n_patches_ == local.n_patches_ == 10 * 256
    assert remote.check_updatable() is not None  # per-shard moments merged: the model stays updatable
    capsys.readouterr()
    padim = ["-q", "fit", str(folders / "train"), "-o", str(tmp_path / "p.safetensors"), "--method", "padim"]
    assert main([*padim, "--weights", "none", "--image-size", "64", "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "SOMAD models only" in err and "\n" not in err and not (tmp_path / "p.safetensors").exists()


def test_ray_workers_refuse_a_model_whose_content_is_not_the_verified_one(ray_local, folders):
    """Issue 26: the workers re-read the model file unverified. They now load the content hash the driver
    verified, or refuse."""
    from somad.distributed.ray import RayScoredModel
    from somad.service.model_info import read_metadata

    path = folders / "model.safetensors"
    model = load(path)
    paths = sorted((folders / "test").glob("0*.png"))
    pinned = RayScoredModel(model, path, workers=1, content_sha256=read_metadata(path)["sha256"])
    assert [p.score for p in pinned.predict_iter(paths)] == pytest.approx(model.predict_maps(paths)[0], rel=1e-5)
    other = RayScoredModel(model, path, workers=1, content_sha256="0" * 64)
    with pytest.raises(Exception, match="its content changed since the run verified it"):
        list(other.predict_iter(paths))


def test_without_ray_the_flag_says_how_to_install_it(folders, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    argv = ["predict", str(folders / "model.safetensors"), str(folders / "test"), "-o", str(tmp_path / "o"), "--ray"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'error: Ray is not installed; pip install "somad[ray]" to use --ray'
    assert not (tmp_path / "o").exists()
