"""Fuzzing the two file readers that take untrusted bytes.

* ``somad.io.images.load_image`` returns an RGB image or raises ``ImageLoadError``, whatever the bytes;
* ``somad.io.model_files.load_model`` (and ``somad.load``) returns a verified model or raises ``ModelFileError``.

Inputs are random bytes and valid files with flipped bytes and truncations. Each test is bounded
(``max_examples``, no per-example deadline, no example database) to keep the suite well under a minute.

A model file whose content hash was recomputed after an edit passes the hash check, so the last tests mutate
every field one at a time (each header field, each config value at any depth, each array's dtype, shape and
values, of a SOMAD, a PaDiM and a PatchCore file) and rehash: ``somad.load`` must refuse the file in one line
naming it, or load a model that scores and that ``somad info`` describes; never a traceback
(run with ``-s`` to see the counts).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from _forge import read, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from somad import SOMAD, PaDiM, PatchCore, load
from somad.cli.info import text
from somad.errors import ImageLoadError, ModelFileError, SomadError
from somad.io.images import load_image
from somad.io.model_files import load_model
from somad.service.model_info import describe

# Pillow warns about the corrupt files it reads (bad TIFF tags, large images): expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _encoded(fmt: str, mode: str = "RGB", size=(24, 16), **kwargs) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


IMAGE_SEEDS = [
    _encoded("PNG"),
    _encoded("PNG", "P"),
    _encoded("PNG", "LA"),
    _encoded("JPEG", quality=80),
    _encoded("JPEG", "L", quality=80),
    _encoded("JPEG", quality=80, progressive=True),
    _encoded("TIFF"),
    _encoded("BMP"),
]


def mutate(draw, seeds: list[bytes]) -> bytes:
    """A seed file with a few bytes replaced (often in the header) and maybe truncated."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        limit = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 127)  # anywhere, or the header
        data[draw(st.integers(0, limit))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def mutated_images(draw) -> bytes:
    return mutate(draw, IMAGE_SEEDS)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def small_bomb_limit():
    """Refuse images above 2 megapixels so that a mutated size fails fast instead of allocating gigabytes."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000
    yield
    Image.MAX_IMAGE_PIXELS = previous


def _check_image(path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        img = load_image(path)
    except ImageLoadError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
    assert np.asarray(img).shape == (img.height, img.width, 3)


def test_image_seeds_are_valid(scratch):
    for i, data in enumerate(IMAGE_SEEDS):
        (scratch / f"seed{i}").write_bytes(data)
        assert load_image(scratch / f"seed{i}").mode == "RGB"


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048))
def test_load_image_random_bytes(scratch, data):
    _check_image(scratch / "random.img", data)


@FUZZ
@given(data=mutated_images())
def test_load_image_mutated_files(scratch, data):
    _check_image(scratch / "mutated.img", data)


# ---------------------------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    """A small valid model file: 8 feature dimensions, a 2 x 2 SOM."""
    root = tmp_path_factory.mktemp("fuzz_model")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    model = SOMAD(
        weights="none",
        image_size=32,
        crop_size=None,
        dims=8,
        som_size=2,
        k=1,
        rough_epochs=1,
        fine_epochs=1,
        val_fraction=0.0,
        device="cpu",
    ).fit(images)
    path = model.save(root / "model.safetensors")
    return path.read_bytes()


def _check_model(path, data: bytes, *, full: bool = False) -> None:
    path.write_bytes(data)
    try:
        result = load(path, device="cpu") if full else load_model(path)
    except ModelFileError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
        return
    if full:
        assert hasattr(result, "extractor_")
    else:
        config, arrays = result
        assert isinstance(config, dict) and "channel_indices" in arrays


def test_model_seed_is_valid(scratch, model_bytes):
    _check_model(scratch / "seed.safetensors", model_bytes, full=True)
    assert load_model(scratch / "seed.safetensors")[0]["method"] == "somad"


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048))
def test_load_model_random_bytes(scratch, data):
    _check_model(scratch / "random.safetensors", data)


@FUZZ
@given(data=st.data())
def test_load_model_mutated_file(scratch, model_bytes, data):
    _check_model(scratch / "mutated.safetensors", data.draw(st.composite(lambda d: mutate(d, [model_bytes]))()))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_full_load_of_mutated_file(scratch, model_bytes, data):
    _check_model(
        scratch / "mutated_full.safetensors", data.draw(st.composite(lambda d: mutate(d, [model_bytes]))()), full=True
    )


# ---------------------------------------------------------------------------------------------- every field
FIELD_KEY = b"fuzz-key-0123456789abcdef"
#: Hypothesis examples per field (each a mutated, rehashed file loaded, and scored when it loads).
FIELD_EXAMPLES = 6
FIELD_METHODS = {
    "somad": (SOMAD, dict(som_size=2, k=1, rough_epochs=1, fine_epochs=1, scatter_dtype="float32")),
    "padim": (PaDiM, {}),
    "patchcore": (PatchCore, {}),
}
HEADER_FIELDS = ("format", "format_version", "config", "sha256", "signature")
DELETE = object()  # a field removed from its table


def _field_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 190, 32)[None, :, None] + np.zeros((32, 32, 3))
    return np.clip(base[None] + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def field_files(tmp_path_factory) -> dict:
    """A small valid file of each method with every optional field filled (thresholds, their table and display
    range; SOMAD: scatter matrices and an update), the SOMAD one signed with :data:`FIELD_KEY`."""
    root = tmp_path_factory.mktemp("fields")
    files = {}
    for method, (cls, extra) in FIELD_METHODS.items():
        model = cls(weights="none", image_size=32, dims=8, val_fraction=0.34, device="cpu", **extra)
        model.fit(_field_images(6, 0))
        if method == "somad":
            model.update(_field_images(2, 1), accept_outliers=True)
        files[method] = model.save(root / f"{method}.safetensors", sign_key=FIELD_KEY if method == "somad" else None)
    return files


def _leaves(value, path=()):
    """Every field of a config: each table as a whole and each value in it, at any depth; a list as a whole and,
    for a list of tables or lists, its first item's fields."""
    if path:
        yield path
    if isinstance(value, dict):
        for key in value:
            yield from _leaves(value[key], (*path, key))
    elif isinstance(value, list) and value and isinstance(value[0], (dict, list)):
        yield from _leaves(value[0], (*path, 0))


def _fields(path) -> list[tuple[str, object]]:
    """(where, name) of every field of a model file: its header's, its config's (at any depth), its arrays."""
    _, config, arrays = read(path)
    return (
        [("header", name) for name in HEADER_FIELDS]
        + [("config", leaf) for leaf in _leaves(config)]
        + [("array", name) for name in sorted(arrays)]
    )


def _mutate_nested(root: dict, field: tuple, data) -> None:
    """Replace the value at key path ``field`` of ``root`` by a hostile draw of its kind, or delete it."""
    table = root
    for key in field[:-1]:
        table = table[key]
    value = data.draw(_hostile(table[field[-1]]))
    if value is DELETE:
        del table[field[-1]]
    else:
        table[field[-1]] = value


def _hostile(current):
    """Values a forged field might hold: of every JSON type, out of range, non-finite, escapes, or the current
    value bent (negated, scaled, wrapped, as text, shortened); or the field removed."""
    derived = [DELETE, [current], str(current)]
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        derived += [-current, current + 1, current * 1e6, 0, -1]
    if isinstance(current, list):
        derived += [current[:-1], current + current[-1:], list(reversed(current))]
    if isinstance(current, dict):
        derived += [{k: v for i, (k, v) in enumerate(current.items()) if i}, {**current, "x": 1}]
    return st.one_of(
        st.sampled_from(derived),
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["", "x", "\x1b[2J", "none", "default", "cpu", "cuda", "exact", "ivf", "float16", "fit"]),
        st.lists(st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True)), max_size=3),
        st.dictionaries(st.sampled_from(["a", "source", "n_images", "quantile"]), st.integers(-1, 3), max_size=2),
    )


HEADER_VALUES = st.one_of(
    st.sampled_from(["", "0", "-5", "1", "3", "2.0", " 2", "+2", "somad", "{}", "[]", "\x1b[2J"]), st.text(max_size=12)
)
ARRAY_EDITS = (
    "bool", "int64", "uint8", "float64", "float16", "drop", "flatten", "add_dim", "transpose", "empty", "nan", "inf",
    "negative", "huge", "fewer_rows", "extra",
)  # fmt: skip


def _edit_array(arrays: dict, name: str, how: str) -> None:
    a = arrays[name]
    dtypes = {"bool": torch.bool, "int64": torch.int64, "uint8": torch.uint8, "float64": torch.float64}
    if how in dtypes:
        arrays[name] = a.to(dtypes[how])
    elif how == "float16":
        arrays[name] = a.to(torch.float16)
    elif how == "drop":
        del arrays[name]
    elif how == "flatten":
        arrays[name] = a.flatten()
    elif how == "add_dim":
        arrays[name] = a[None]
    elif how == "transpose":
        arrays[name] = a.T.contiguous() if a.ndim == 2 else a.flip(0)
    elif how == "empty":
        arrays[name] = a[:0]
    elif how in ("nan", "inf", "negative", "huge"):
        b = a.clone() if a.is_floating_point() else a.double()
        flat = b.view(-1)
        flat[0] = {"nan": float("nan"), "inf": float("inf"), "negative": -abs(float(flat[0])) - 1}.get(how, 1e30)
        arrays[name] = b if a.is_floating_point() or how in ("nan", "inf") else b.to(a.dtype)
    elif how == "fewer_rows":
        arrays[name] = a[:-1].clone()
    else:
        arrays["extra"] = a.clone()


def _mutated(path, where: str, field, data) -> tuple:
    """The file at ``path`` with ``field`` mutated by a value drawn from ``data``: (metadata, config, arrays,
    config text or None)."""
    metadata, config, arrays = read(path)
    config_text = None
    if where == "header":
        value = data.draw(HEADER_VALUES)
        if field == "config":
            config_text = value
        else:
            metadata[field] = value
    elif where == "config":
        _mutate_nested(config, field, data)
    else:
        _edit_array(arrays, field, data.draw(st.sampled_from(ARRAY_EDITS)))
    return metadata, config, arrays, config_text


def _outcome(path, field) -> str:
    """Load the file at ``path``: refused in one line naming it, or loaded, described by ``somad info`` and scored
    (or refused when scoring, in one line). Anything else fails the test."""
    try:
        model = load(path, device="cpu", verify_key=FIELD_KEY if field == "signature" else None)
    except SomadError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
        return "refused at load"
    assert "\x1b" not in text(describe(path))  # escapes in a model's strings never reach the terminal
    if model.image_size > 128 or model.tile_size is not None:
        return "loaded (large geometry, not scored)"
    try:
        scores, _ = model.predict_maps(_field_images(1, 7))
    except SomadError as exc:
        assert "\n" not in str(exc), str(exc)
        return "refused when scoring"
    assert scores.shape == (1,)
    return "loaded and scored"


def _field_fuzz(source, target, where: str, field, outcomes: dict):
    """The hypothesis test of one field: ``source`` with ``field`` mutated, rehashed, written to ``target`` and
    loaded (:func:`_outcome`, counted in ``outcomes``)."""

    @settings(max_examples=FIELD_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def mutate_field(data):
        metadata, config, arrays, config_text = _mutated(source, where, field, data)
        write(target, metadata, config, arrays, rehash=field != "sha256", config_text=config_text)
        result = _outcome(target, field)
        outcomes[result] = outcomes.get(result, 0) + 1

    return mutate_field


@pytest.mark.parametrize("method", list(FIELD_METHODS))
def test_every_field_mutated_loads_or_fails_in_one_line(field_files, scratch, method):
    """Each field of the method's file (PaDiM, PatchCore: those a SOMAD file does not have), mutated
    :data:`FIELD_EXAMPLES` times by hypothesis and rehashed."""
    source = field_files[method]
    shared = set() if method == "somad" else {f for f in _fields(field_files["somad"]) if f[0] != "header"}
    fields = [f for f in _fields(source) if f not in shared]
    outcomes: dict[str, int] = {}
    target = scratch / f"field_{method}.safetensors"
    for where, field in fields:
        _field_fuzz(source, target, where, field, outcomes)()
    n = sum(outcomes.values())
    print(f"\n{method}: {len(fields)} fields, {n} mutated files, {outcomes}, 0 tracebacks")
    assert len(fields) >= (80 if method == "somad" else 3) and outcomes.get("refused at load", 0) > n / 4


# ---------------------------------------------------------------------------------------------- every export field
#: Hypothesis examples per field of an export's description.
EXPORT_EXAMPLES = 3


@pytest.fixture(scope="module")
def field_export(field_files, tmp_path_factory):
    """The SOMAD test file exported (without the parity check), signed with :data:`FIELD_KEY`."""
    pytest.importorskip("onnxruntime")
    from somad.export.onnx import export_model

    return export_model(field_files["somad"], tmp_path_factory.mktemp("export") / "e", check=False, sign_key=FIELD_KEY)


def _export_outcome(folder, field) -> str:
    """Open the export: refused in one line naming its description, or scored (or refused when scoring)."""
    from somad.runtime import OnnxDetector

    try:
        detector = OnnxDetector(folder, threads=1, verify_key=FIELD_KEY if field == ("signature",) else None)
    except SomadError as exc:
        assert "\n" not in str(exc) and str(folder) in str(exc), str(exc)
        return "refused at load"
    try:
        found = detector.predict(_field_images(1, 7))
    except SomadError as exc:
        assert "\n" not in str(exc), str(exc)
        return "refused when scoring"
    assert len(found) == 1 and found[0].anomaly_map.shape == (detector.input_size,) * 2
    return "loaded and scored"


def _export_fuzz(source, target, field, outcomes: dict):
    """The hypothesis test of one field of the description: mutated, the description's hash recomputed (as an
    attacker would; its signature kept), opened by the runtime (:func:`_export_outcome`)."""
    import json
    import shutil

    from somad.io.export_format import META_FILE, content_sha256

    @settings(max_examples=EXPORT_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def mutate_field(data):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        meta = json.loads((source / META_FILE).read_text())
        _mutate_nested(meta, field, data)
        if field != ("content_sha256",):
            meta["content_sha256"] = content_sha256(meta)
        (target / META_FILE).write_text(json.dumps(meta))
        result = _export_outcome(target, field)
        outcomes[result] = outcomes.get(result, 0) + 1

    return mutate_field


def test_every_export_field_mutated_opens_or_fails_in_one_line(field_export, scratch):
    """Each field of ``somad_export.json`` at any depth, mutated :data:`EXPORT_EXAMPLES` times by hypothesis."""
    import json

    from somad.io.export_format import META_FILE

    fields = list(_leaves(json.loads((field_export / META_FILE).read_text())))
    outcomes: dict[str, int] = {}
    for field in fields:
        _export_fuzz(field_export, scratch / "export_fields", field, outcomes)()
    n = sum(outcomes.values())
    print(f"\nexport: {len(fields)} fields, {n} mutated descriptions, {outcomes}, 0 tracebacks")
    assert len(fields) >= 50 and outcomes.get("refused at load", 0) > n / 4
