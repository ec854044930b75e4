"""The one resize of every model input (``somad.resize``) and its copy inside the exported graph
(``somad.export.resize_graph``): every pixel equal, on frames that shrink, grow, stay, and are tall, wide or tiny."""

import io

import numpy as np
import pytest
from PIL import Image

from somad.resize import resize_bilinear

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from somad.export.resize_graph import pillow_bilinear_nodes  # noqa: E402

OUT_SIZES = [(256, 256), (224, 224), (64, 80)]  # (height, width)
EDGE_SHAPES = [(1, 1), (2, 3), (17, 9), (256, 256), (257, 255), (255, 257), (300, 400), (400, 300), (500, 1240),
               (1240, 500), (3000, 31), (31, 3000), (240, 289), (1024, 1024)]  # fmt: skip


def reference(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's 8-bit BILINEAR resample transcribed from ``libImaging/Resample.c`` (``precompute_coeffs``,
    ``normalize_coeffs_8bpc``, ``ImagingResampleHorizontal_8bpc`` then ``...Vertical_8bpc``), written with loops over
    output pixels: an oracle that shares no code with somad."""

    def coefficients(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        filterscale = max(scale, 1.0)
        support = 1.0 * filterscale
        k = np.zeros((n_out, n_in), np.int64)
        for i in range(n_out):
            centre = (i + 0.5) * scale
            xmin = max(int(centre - support + 0.5), 0)
            xmax = min(int(centre + support + 0.5), n_in)
            w = np.array([max(0.0, 1.0 - abs((x - centre + 0.5) / filterscale)) for x in range(xmin, xmax)])
            if w.sum() != 0:
                w = w / w.sum()
            k[i, xmin:xmax] = [int(0.5 + v * (1 << 22)) for v in w]
        return k

    def one_pass(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
        summed = np.moveaxis(np.tensordot(x.astype(np.int64), k, axes=([axis], [1])), -1, axis)
        return np.clip((summed + (1 << 21)) >> 22, 0, 255)

    h, w = frame.shape[:2]
    out = frame.astype(np.int64)
    if w != width:
        out = one_pass(out, coefficients(w, width), 1)
    if h != height:
        out = one_pass(out, coefficients(h, height), 0)
    return out.astype(np.uint8)


def _graph(size: tuple[int, int]) -> bytes:
    from onnx import TensorProto, helper

    nodes, inits = pillow_bilinear_nodes("image", "resized", size)
    graph = helper.make_graph(
        nodes,
        "resize",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, "height", "width", 3])],
        [helper.make_tensor_value_info("resized", TensorProto.UINT8, [1, *size, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _frames(seed: int, n: int):
    rng = np.random.default_rng(seed)
    shapes = EDGE_SHAPES + [tuple(int(v) for v in rng.integers(1, 900, 2)) for _ in range(n)]
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


@pytest.mark.parametrize("size", OUT_SIZES)
def test_resize_bilinear_is_pillows_algorithm_horizontal_pass_first(size):
    height, width = size
    for frame in _frames(0, 20):
        got = np.asarray(resize_bilinear(Image.fromarray(frame), (width, height)))
        assert np.array_equal(got, reference(frame, height, width)), frame.shape
        if frame.shape[0] == height or frame.shape[1] == width:  # one pass: no order to choose
            assert np.array_equal(got, np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR)))


@pytest.mark.parametrize("size", OUT_SIZES)
def test_the_graphs_resize_equals_the_native_one_to_the_bit(size):
    session = ort.InferenceSession(_graph(size), providers=["CPUExecutionProvider"])
    for frame in _frames(1, 40):
        got = session.run(None, {"image": frame[None]})[0][0]
        want = np.asarray(resize_bilinear(Image.fromarray(frame), (size[1], size[0])))
        assert got.shape == (*size, 3) and np.array_equal(got, want), frame.shape


def test_openvino_runs_the_graphs_resize_within_one_grey_level():
    """OpenVINO computes the coefficients in float32 (not float64) and integer arithmetic in float32 (exact here:
    every intermediate is below 2**24): a few pixels per frame differ by one grey level, none by more."""
    ov = pytest.importorskip("openvino")
    model = ov.convert_model(io.BytesIO(_graph((256, 256))))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    differing = []
    for frame in _frames(2, 20):
        got = compiled({"image": frame[None]})[compiled.output(0)][0].astype(int)
        want = np.asarray(resize_bilinear(Image.fromarray(frame), (256, 256))).astype(int)
        assert np.abs(got - want).max() <= 1, frame.shape
        differing.append(float((got != want).mean()))
        if frame.shape[:2] == (256, 256):  # the runtime's own input: the identity, exact
            assert np.array_equal(got, want)
    assert max(differing) < 0.005
