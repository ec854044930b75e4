"""Nothing forged: an export is verified before it scores, a model file's every field is checked at load, and the
optional HMAC signature refuses a file that was edited and rehashed (issue 26, items 1-3)."""

import json
import shutil

import numpy as np
import pytest
from _forge import read, rewrite, write
from _tiny import tiny
from PIL import Image

from somad import SOMAD, load
from somad.cli import main
from somad.errors import ModelFileError, SomadError
from somad.io import export_format
from somad.io.model_files import load_model

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def textured(n, seed, size=72, defect=False):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 120 + 40 * np.sin(xx / 5.0)[..., None] + 10 * np.cos(yy / 7.0)[..., None]
    out = np.clip(base[None] + rng.normal(0, 8, (n, size, size, 3)), 0, 255).astype(np.uint8)
    if defect:
        out[:, 28:44, 28:44] = 250
    return out


def one_line(exc, *names) -> str:
    text = str(exc)
    assert "\n" not in text and all(str(n) in text for n in names), text
    return text


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "key"  # a folder of its own: never beside a model
    path.write_bytes(KEY + b"\n")  # a trailing newline (echo, openssl rand -hex) is not part of the key
    return path


@pytest.fixture(scope="module")
def model_file(root):
    return SOMAD(**tiny(val_fraction=0.25, seed=3)).fit(textured(8, 0)).save(root / "a.safetensors")


@pytest.fixture(scope="module")
def images(root):
    paths = []
    for i, a in enumerate([*textured(2, 1), *textured(2, 2, defect=True)]):
        paths.append(root / f"img{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


# ---------------------------------------------------------------------------------------------- 1. exports
@pytest.fixture(scope="module")
def exports(root, model_file, key_file):
    """Two exports of one model (unsigned, signed) and one of another model (another seed and images)."""
    pytest.importorskip("onnxruntime")
    from somad.export.onnx import export_model

    other = SOMAD(**tiny(val_fraction=0.25, seed=4)).fit(textured(8, 5)).save(root / "b.safetensors")
    plain = export_model(model_file, root / "ea", check=False)
    signed = export_model(model_file, root / "ea_signed", check=False, sign_key=key_file)
    return plain, signed, export_model(other, root / "eb", check=False)


def _copy(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    return shutil.copytree(src, dst)


def test_export_contract_is_declared_once():
    from somad import runtime
    from somad.export import onnx

    for name in ("MODEL_FILE", "META_FILE", "EXPORT_VERSION", "INPUT_NAME", "OUTPUT_NAMES"):
        assert getattr(onnx, name) is getattr(export_format, name)
    assert runtime.MODEL_FILE is export_format.MODEL_FILE and runtime.META_FILE is export_format.META_FILE


def test_export_records_hashes_and_scores_as_native(exports, model_file, images):
    from somad.runtime import OnnxDetector

    plain, _, _ = exports
    meta = json.loads((plain / export_format.META_FILE).read_text())
    assert meta["export_version"] == export_format.EXPORT_VERSION == 5 and "signature" not in meta
    assert meta["content_sha256"] == export_format.content_sha256(meta)
    native = load(model_file).predict_maps(images)[0]
    np.testing.assert_allclose(OnnxDetector(plain, threads=1).predict_maps(images)[0], native, rtol=1e-3)


def test_altered_initializer_is_refused_before_scoring(exports, root):
    """Issue 26: one whitener initializer scaled by 0.9 scored silently (15.448 against the native 15.702)."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from somad.runtime import OnnxDetector

    folder = _copy(exports[0], root / "tampered")
    graph = onnx.load(str(folder / export_format.MODEL_FILE))
    init = next(i for i in graph.graph.initializer if i.name.startswith("somad_whiteners_t"))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float16(0.9), init.name))
    onnx.save(graph, str(folder / export_format.MODEL_FILE))
    with pytest.raises(ModelFileError) as info:
        OnnxDetector(folder)
    text = one_line(info.value, folder / export_format.MODEL_FILE, folder / export_format.META_FILE)
    assert "does not match" in text and "re-run `somad export`" in text


def test_another_models_graph_beside_the_description_is_refused(exports, root):
    from somad.runtime import OnnxDetector

    folder = _copy(exports[0], root / "swapped")
    shutil.copy(exports[2] / export_format.MODEL_FILE, folder / export_format.MODEL_FILE)
    with pytest.raises(ModelFileError) as info:
        OnnxDetector(folder)
    one_line(info.value, folder / export_format.MODEL_FILE, folder / export_format.META_FILE)


def _edit_meta(folder, edit, *, rehash):
    path = folder / export_format.META_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    if rehash:  # as an attacker would: the unkeyed hash recomputed, the signature kept
        meta["content_sha256"] = export_format.content_sha256(meta)
    path.write_text(json.dumps(meta))


def test_edited_description_is_refused_and_a_key_refuses_a_rehashed_one(exports, root, key_file):
    from somad.runtime import OnnxDetector

    raise_threshold = lambda m: m.update(image_threshold=m["image_threshold"] * 100)  # noqa: E731
    folder = _copy(exports[1], root / "edited")
    _edit_meta(folder, raise_threshold, rehash=False)
    with pytest.raises(ModelFileError, match="content hash does not match"):
        OnnxDetector(folder)
    folder = _copy(exports[1], root / "rehashed")
    _edit_meta(folder, raise_threshold, rehash=True)
    assert OnnxDetector(folder).image_threshold_ > 0  # integrity only: the rehashed edit passes without a key...
    with pytest.raises(ModelFileError) as info:  # ...and not with one
        OnnxDetector(folder, verify_key=key_file)
    assert "signature does not match" in one_line(info.value, folder / export_format.META_FILE)


def test_signed_export_verifies_and_unsigned_or_wrong_key_is_refused(exports, key_file, images):
    from somad.runtime import OnnxDetector

    plain, signed, _ = exports
    ok = OnnxDetector(signed, verify_key=key_file, threads=1)
    np.testing.assert_array_equal(ok.predict_maps(images)[0], OnnxDetector(plain, threads=1).predict_maps(images)[0])
    assert OnnxDetector(signed, verify_key=KEY).method == "somad"  # the key's bytes, or its file
    with pytest.raises(ModelFileError, match="is not signed"):
        OnnxDetector(plain, verify_key=key_file)
    with pytest.raises(ModelFileError, match="signature does not match"):
        OnnxDetector(signed, verify_key=OTHER_KEY)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("display_range", [1.0], "display_range"),
        ("display_range", [3.0, 1.0], "display_range"),
        ("export_version", 0, "export_version"),
        ("image_threshold", "high", "image_threshold"),
        ("geometry", {"image_size": 64, "input_size": 64, "crop_offset": 8}, "geometry"),
        ("files", {}, "files.model.onnx"),
    ],
)
def test_export_description_fields_are_checked(exports, root, field, value, named):
    from somad.runtime import OnnxDetector

    folder = _copy(exports[0], root / "fields")
    _edit_meta(folder, lambda m: m.__setitem__(field, value), rehash=True)
    with pytest.raises(ModelFileError) as info:
        OnnxDetector(folder)
    assert f": {named}" in one_line(info.value, folder / export_format.META_FILE)


def test_export_is_written_whole_or_not_at_all(model_file, root, monkeypatch):
    pytest.importorskip("onnx")
    from somad.export import onnx

    def fail(meta, key=None):
        raise SomadError("stopped before the description was written")

    monkeypatch.setattr(onnx, "seal", fail)
    with pytest.raises(SomadError, match="stopped"):
        onnx.export_model(model_file, root / "never", check=False)
    assert not (root / "never").exists() and not list(root.glob(".never*"))


# ---------------------------------------------------------------------------------------------- 2. model files
def _state(key, value):
    return lambda c: c["state"].__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, named",
    [
        (_state("display_range", [1.0]), "state.display_range"),
        (_state("display_range", "ab"), "state.display_range"),
        (_state("display_range", [float("nan"), 2.0]), "state.display_range"),
        (_state("display_range", [5.0, 1.0]), "state.display_range"),
        (_state("image_threshold", True), "state.image_threshold"),
        (_state("n_train_images", -3), "state.n_train_images"),
        (lambda c: c["state"]["threshold_info"].__setitem__("quantile", 7), "state.threshold_info.quantile"),
        (lambda c: c["state"].pop("image_threshold"), "state.image_threshold"),
        (lambda c: c.__setitem__("params", [1]), "params"),
    ],
)
def test_impossible_config_values_are_refused_in_one_line(model_file, root, edit, named):
    """Issue 26: these passed the hash check and reached a traceback (ValueError, TypeError, IndexError) or a
    wrong answer."""
    path = rewrite(model_file, root / "forged.safetensors", edit_config=edit)
    with pytest.raises(ModelFileError) as info:
        load(path)
    assert f": {named}" in one_line(info.value, path)


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda a: a.__setitem__("som_weights", a["som_weights"] > 0), "arrays.som_weights"),  # bool prototypes
        (lambda a: a.__setitem__("node_counts", a["node_counts"].float()), "arrays.node_counts"),
        (lambda a: a.__setitem__("node_means", a["node_means"].flatten()), "arrays.node_means"),
        (lambda a: a.pop("node_whitener_strips"), "arrays.node_whitener_strips"),
        (lambda a: a.__setitem__("extra", a["som_weights"].clone()), "arrays.extra"),
    ],
)
def test_arrays_of_the_wrong_dtype_or_shape_are_refused(model_file, root, edit, named):
    path = rewrite(model_file, root / "forged.safetensors", edit_arrays=edit)
    with pytest.raises(ModelFileError) as info:
        load(path)
    assert f": {named}" in one_line(info.value, path)


@pytest.mark.parametrize("version", ["0", "-5", "3", "2.0", "two", ""])
def test_format_version_out_of_bounds_is_refused(model_file, root, version):
    path = rewrite(model_file, root / "version.safetensors", edit_metadata=lambda m: m.update(format_version=version))
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert "format version" in one_line(info.value, path)


def test_info_checks_every_field_too(model_file, root, capsys):
    path = rewrite(model_file, root / "info.safetensors", edit_config=_state("display_range", [2.0]))
    assert main(["info", str(path)]) == 2
    assert "state.display_range" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 3. signatures
@pytest.fixture(scope="module")
def signed_file(model_file, root, key_file):
    return load(model_file).save(root / "signed.safetensors", sign_key=key_file)


def test_signed_model_verifies(signed_file, key_file, images, model_file):
    model = load(signed_file, verify_key=key_file)
    np.testing.assert_array_equal(model.predict_maps(images)[0], load(model_file).predict_maps(images)[0])
    assert load(signed_file).image_threshold_ == model.image_threshold_  # a signed file loads without a key too


def test_tampered_then_rehashed_model_is_refused_with_a_key(signed_file, root, key_file, images):
    """Issue 26: a threshold edited and the unkeyed hash recomputed passed predict and info; the defect passed."""
    path = rewrite(signed_file, root / "silenced.safetensors", edit_config=_state("image_threshold", 1e9))
    assert load(path).predict(images).tolist() == [1, 1, 1, 1]  # without a key the forgery still passes...
    with pytest.raises(ModelFileError) as info:  # ...with one it is refused
        load(path, verify_key=key_file)
    assert "signature does not match" in one_line(info.value, path)
    metadata, config, arrays = read(path)
    metadata.pop("signature")  # a stripped signature is no way round it
    write(path, metadata, config, arrays)
    with pytest.raises(ModelFileError, match="is not signed"):
        load(path, verify_key=key_file)


def test_a_pinned_content_hash_refuses_a_model_swapped_after_verification(signed_file, root, key_file, images):
    """Issue 26: `predict --ray --verify-key` verified the file on the driver and the workers re-read it unverified.
    The workers now load with the content hash the driver verified: another file in its place is refused."""
    from somad.service.model_info import read_metadata

    content = read_metadata(signed_file)["sha256"]
    assert load(signed_file, expect_sha256=content).image_threshold_ == load(signed_file).image_threshold_
    swapped = rewrite(signed_file, root / "swapped.safetensors", edit_config=_state("image_threshold", 1e9))
    assert load(swapped).image_threshold_ == 1e9  # a valid file on its own (its unkeyed hash recomputed)...
    with pytest.raises(ModelFileError) as info:  # ...but not the content that was verified
        load(swapped, expect_sha256=content)
    assert "its content changed since the run verified it" in one_line(info.value, swapped)


def test_unsigned_or_wrongly_signed_model_is_refused(model_file, signed_file):
    with pytest.raises(ModelFileError, match="is not signed") as info:
        load(model_file, verify_key=KEY)
    one_line(info.value, model_file)
    with pytest.raises(ModelFileError, match="signature does not match"):
        load(signed_file, verify_key=OTHER_KEY)


def test_cli_signs_and_verifies(model_file, signed_file, root, key_file, images, capsys):
    forged = rewrite(signed_file, root / "cli_forged.safetensors", edit_config=_state("image_threshold", 1e9))
    args = [str(images[0]), "-o", str(root / "out"), "--overwrite", "--verify-key", str(key_file)]
    assert main(["predict", str(signed_file), *args]) == 0
    for path, reason in ((forged, "signature does not match"), (model_file, "is not signed")):
        capsys.readouterr()
        assert main(["predict", str(path), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err and str(path) in err
    capsys.readouterr()
    assert main(["info", str(signed_file), "--verify-key", str(key_file)]) == 0
    assert "verified with --verify-key" in capsys.readouterr().out
    assert main(["info", str(forged), "--verify-key", str(key_file)]) == 2
    assert "signature does not match" in capsys.readouterr().err
    out = root / "calibrated.safetensors"  # calibrate: verifies its input, signs its output
    good = root / "good"
    good.mkdir(exist_ok=True)
    for i, a in enumerate(textured(4, 9)):
        Image.fromarray(a).save(good / f"{i}.png")
    cmd = ["calibrate", str(signed_file), str(good), "-o", str(out), "--overwrite", "--accept-outliers"]
    assert main([*cmd, "--verify-key", str(key_file), "--sign-key", str(key_file)]) == 0
    assert load(out, verify_key=key_file).threshold_info_["source"] == "calibrate"


def test_short_or_missing_key_and_a_key_beside_the_model(model_file, signed_file, key_file, root, caplog):
    short = root / "short.key"
    short.write_bytes(b"12345")
    with pytest.raises(SomadError, match="fewer than 16"):
        load(model_file, verify_key=short)
    with pytest.raises(SomadError, match="key file not found"):
        load(model_file, verify_key=root / "missing.key")
    beside = root / "beside.key"
    beside.write_bytes(KEY)
    with caplog.at_level("WARNING"):
        assert main(["info", str(signed_file), "--verify-key", str(key_file)]) == 0
        assert "in the folder of" not in caplog.text
        assert main(["info", str(signed_file), "--verify-key", str(beside)]) == 0  # the right key, but beside it:
    assert "in the folder of" in caplog.text  # warned about, since whoever writes the model can read it there
