"""Pillow's 8-bit ``BILINEAR`` resize as ONNX nodes, bit for bit, for an input of any size.

The native path resizes every decoded image with ``PIL.Image.resize(..., Image.BILINEAR)``
(``FeatureExtractor.preprocess``). ONNX's own ``Resize`` is another filter (measured in ``somad.export.onnx``: up to 7
grey levels apart on magnetic_tile's odd sizes), so the exported graph carries Pillow's algorithm itself
(``libImaging/Resample.c``, ``ImagingResample`` for 8-bit images), built here from the input's shape at run time:

1. per axis, the filter's coefficients (``precompute_coeffs``), in float64 as Pillow computes them:
   ``scale = in / out``, ``filterscale = max(scale, 1)`` (antialiased when it shrinks), ``support = filterscale``
   (the triangle filter's support is 1), and for output pixel ``i``: ``center = (i + 0.5) * scale``, the input
   window ``[max(0, floor(center - support + 0.5)), min(in, floor(center + support + 0.5)))``, the weights
   ``max(0, 1 - |(x - center + 0.5) / filterscale|)`` over it, normalised to sum 1;
2. the coefficients in fixed point (``normalize_coeffs_8bpc``): ``floor(0.5 + k * 2**22)``, as int32;
3. the horizontal pass, then the vertical one on its 8-bit result (``somad.resize``'s order; each output pixel
   ``clip((2**21 + sum(pixel * coefficient)) >> 22, 0, 255)``, in int32 with every intermediate below ``2**24``:
   :func:`_pass`), each a ``Gather`` of the window's pixels (``taps = 2 * ceil(support) + 1`` per output pixel),
   not a dense matrix, so that a 5-megapixel frame costs a few taps per output pixel and not its width.

Where the size is unchanged Pillow skips the pass; the coefficients are then the identity, so the pass changes
nothing. The oracles are ``somad.resize.resize_bilinear`` and an independent NumPy transcription of the algorithm
(``tests/test_export_resize.py``: every pixel equal under onnxruntime, on sizes that shrink, grow and stay).
OpenVINO computes the coefficients in float32, not float64: a coefficient then differs by one in ``2**22`` now
and then, and a pixel by one grey level where that tips its rounding (measured in that test).
"""

from __future__ import annotations

import numpy as np

#: Pillow's fixed-point precision for 8-bit images (``PRECISION_BITS = 32 - 8 - 2``).
PRECISION_BITS = 22


def pillow_bilinear_nodes(source: str, target: str, size: tuple[int, int], prefix: str = "resize") -> tuple[list, list]:
    """ONNX nodes (opset >= 13) from ``source`` uint8 ``(1, H, W, C)`` (any ``H``, ``W``) to ``target`` uint8
    ``(1, height, width, C)``, ``size = (height, width)``: ``Image.resize((width, height), Image.BILINEAR)`` of every
    channel. Returns ``(nodes, initializers)``; every name made here starts with ``prefix``."""
    from onnx import numpy_helper

    height, width = (int(v) for v in size)
    p = prefix
    consts = {
        f"{p}_zero_f": np.array(0.0),
        f"{p}_half": np.array(0.5),
        f"{p}_one_f": np.array(1.0),
        f"{p}_one_i": np.array(1, np.int64),
        f"{p}_two_i": np.array(2, np.int64),
        f"{p}_scale_bits": np.array(float(1 << PRECISION_BITS)),
        f"{p}_round": np.array(1 << (PRECISION_BITS - 1), np.int32),
        f"{p}_split": np.array(1 << 8, np.int32),
        f"{p}_divisor": np.array(1 << (PRECISION_BITS - 8), np.int32),
        f"{p}_low": np.array(0, np.int32),
        f"{p}_high": np.array(255, np.int32),
        f"{p}_axes0": np.array([0], np.int64),
        f"{p}_axes1": np.array([1], np.int64),
        f"{p}_weight_shape": np.array([0, -1, 1, 1], np.int64),  # (out, taps) -> (out, taps, 1, 1)
    }
    for name, axis, out in (("rows", 1, height), ("cols", 2, width)):
        consts[f"{p}_{name}_at"] = np.array(axis, np.int64)
        consts[f"{p}_{name}_out"] = np.array(float(out))
        consts[f"{p}_{name}_centres0"] = np.arange(out, dtype=np.float64) + 0.5
    nodes = [_node("Shape", [source], [f"{p}_shape"])]
    nodes += _axis_coefficients(p, "rows")
    nodes += _axis_coefficients(p, "cols")
    # Each pass gathers along the first axis, so that every tap it gathers is a contiguous block (a column of the
    # frame, then a row of the half-resized one) and the taps are summed over the second axis.
    nodes += [
        _node("Squeeze", [source, f"{p}_axes0"], [f"{p}_hwc"]),  # (H, W, C)
        _node("Transpose", [f"{p}_hwc"], [f"{p}_whc"], perm=[1, 0, 2]),  # (W, H, C)
        _node("Cast", [f"{p}_whc"], [f"{p}_columns"], to=_INT32),
    ]
    # Horizontal: gather (width, taps, H, C), weigh, sum the taps -> (width, H, C), then rows first: (H, width, C).
    nodes += _pass(p, "cols", f"{p}_columns", f"{p}_horizontal_t")
    nodes += [_node("Transpose", [f"{p}_horizontal_t"], [f"{p}_horizontal"], perm=[1, 0, 2])]
    # Vertical on the 8-bit result: gather (height, taps, width, C), weigh, sum the taps -> (height, width, C).
    nodes += _pass(p, "rows", f"{p}_horizontal", f"{p}_vertical")
    nodes += [
        _node("Cast", [f"{p}_vertical"], [f"{p}_vertical8"], to=_UINT8),
        _node("Unsqueeze", [f"{p}_vertical8", f"{p}_axes0"], [target]),
    ]
    return nodes, [numpy_helper.from_array(v, k) for k, v in consts.items()]


_INT32, _INT64, _UINT8, _DOUBLE = 6, 7, 2, 11  # onnx.TensorProto's element types


def _node(op: str, inputs: list[str], outputs: list[str], **attrs):
    from onnx import helper

    return helper.make_node(op, inputs, outputs, **attrs)


def _axis_coefficients(p: str, axis_name: str) -> list:
    """Nodes giving ``{p}_{axis_name}_index`` int64 ``(out, taps)`` (each output pixel's input pixels, clamped into
    the image where the window is shorter than ``taps``) and ``{p}_{axis_name}_weight`` int32 ``(out, taps)``
    (Pillow's fixed-point coefficients, 0 outside the window) for the input axis ``{p}_{axis_name}_at`` of
    ``{p}_shape``, resized to ``{p}_{axis_name}_out`` pixels."""
    a = f"{p}_{axis_name}"
    return [
        _node("Gather", [f"{p}_shape", f"{a}_at"], [f"{a}_in_i"], axis=0),
        _node("Cast", [f"{a}_in_i"], [f"{a}_in"], to=_DOUBLE),  # the input's length along the axis
        _node("Div", [f"{a}_in", f"{a}_out"], [f"{a}_scale"]),
        _node("Max", [f"{a}_scale", f"{p}_one_f"], [f"{a}_support"]),  # filterscale = support (triangle: 1)
        _node("Div", [f"{p}_one_f", f"{a}_support"], [f"{a}_ss"]),
        _node("Mul", [f"{a}_centres0", f"{a}_scale"], [f"{a}_centre"]),  # (out,): (i + 0.5) * scale
        _node("Sub", [f"{a}_centre", f"{a}_support"], [f"{a}_lo0"]),
        _node("Add", [f"{a}_lo0", f"{p}_half"], [f"{a}_lo1"]),
        _node("Floor", [f"{a}_lo1"], [f"{a}_lo2"]),
        _node("Max", [f"{a}_lo2", f"{p}_zero_f"], [f"{a}_xmin"]),
        _node("Add", [f"{a}_centre", f"{a}_support"], [f"{a}_hi0"]),
        _node("Add", [f"{a}_hi0", f"{p}_half"], [f"{a}_hi1"]),
        _node("Floor", [f"{a}_hi1"], [f"{a}_hi2"]),
        _node("Min", [f"{a}_hi2", f"{a}_in"], [f"{a}_xmax"]),
        _node("Sub", [f"{a}_xmax", f"{a}_xmin"], [f"{a}_count"]),
        # taps = 2 * ceil(support) + 1
        _node("Ceil", [f"{a}_support"], [f"{a}_ceil"]),
        _node("Cast", [f"{a}_ceil"], [f"{a}_ceil_i"], to=_INT64),
        _node("Mul", [f"{a}_ceil_i", f"{p}_two_i"], [f"{a}_taps0"]),
        _node("Add", [f"{a}_taps0", f"{p}_one_i"], [f"{a}_taps"]),
        _node("Cast", [f"{a}_taps"], [f"{a}_taps_f"], to=_DOUBLE),
        _node("Range", [f"{p}_zero_f", f"{a}_taps_f", f"{p}_one_f"], [f"{a}_t"]),  # (taps,)
        _node("Unsqueeze", [f"{a}_xmin", f"{p}_axes1"], [f"{a}_xmin2"]),  # (out, 1)
        _node("Unsqueeze", [f"{a}_centre", f"{p}_axes1"], [f"{a}_centre2"]),
        _node("Unsqueeze", [f"{a}_count", f"{p}_axes1"], [f"{a}_count2"]),
        _node("Add", [f"{a}_xmin2", f"{a}_t"], [f"{a}_pos"]),  # (out, taps): x + xmin
        _node("Sub", [f"{a}_pos", f"{a}_centre2"], [f"{a}_d0"]),
        _node("Add", [f"{a}_d0", f"{p}_half"], [f"{a}_d1"]),
        _node("Mul", [f"{a}_d1", f"{a}_ss"], [f"{a}_d"]),
        _node("Abs", [f"{a}_d"], [f"{a}_absd"]),
        _node("Sub", [f"{p}_one_f", f"{a}_absd"], [f"{a}_tri"]),
        _node("Max", [f"{a}_tri", f"{p}_zero_f"], [f"{a}_w0"]),  # the triangle filter
        _node("Less", [f"{a}_t", f"{a}_count2"], [f"{a}_inside"]),
        _node("Where", [f"{a}_inside", f"{a}_w0", f"{p}_zero_f"], [f"{a}_w"]),
        _node("ReduceSum", [f"{a}_w", f"{p}_axes1"], [f"{a}_ww"], keepdims=1),
        _node("Equal", [f"{a}_ww", f"{p}_zero_f"], [f"{a}_ww_zero"]),
        _node("Where", [f"{a}_ww_zero", f"{p}_one_f", f"{a}_ww"], [f"{a}_norm"]),  # Pillow: divide unless 0
        _node("Div", [f"{a}_w", f"{a}_norm"], [f"{a}_k"]),
        _node("Mul", [f"{a}_k", f"{p}_scale_bits"], [f"{a}_k0"]),
        _node("Add", [f"{a}_k0", f"{p}_half"], [f"{a}_k1"]),
        _node("Floor", [f"{a}_k1"], [f"{a}_k2"]),  # (int)(0.5 + k * 2**22), k >= 0
        _node("Cast", [f"{a}_k2"], [f"{a}_weight"], to=_INT32),
        _node("Sub", [f"{a}_in", f"{p}_one_f"], [f"{a}_last"]),
        _node("Min", [f"{a}_pos", f"{a}_last"], [f"{a}_pos_in"]),
        _node("Cast", [f"{a}_pos_in"], [f"{a}_index"], to=_INT64),
    ]


def _pass(p: str, axis_name: str, source: str, target: str) -> list:
    """One pass of Pillow's resample along the first axis of ``source`` int32 ``(L, M, C)``: gather each output
    pixel's taps ``(out, taps, M, C)``, weigh them with the fixed-point coefficients, sum, round and clip to 0-255
    (int32 ``target`` ``(out, M, C)``).

    Every intermediate stays below ``2**24``, so that a backend that computes integer arithmetic in float32 (OpenVINO's
    CPU plugin does) gets it exact: each coefficient is split as ``hi * 2**8 + lo``, and ``(2**21 + sum(pixel *
    coefficient)) >> 22`` is computed as ``(sum(pixel * hi) + ((2**21 + sum(pixel * lo)) >> 8)) >> 14`` (the same
    integer: nested floor divisions), where ``sum(pixel * hi) <= 255 * (2**14 + taps)`` and ``sum(pixel * lo) <= 255 *
    255 * taps`` (below ``2**24`` up to 224 taps: a 100-fold shrink)."""
    a = f"{p}_{axis_name}"
    return [
        _node("Gather", [source, f"{a}_index"], [f"{a}_taps_px"], axis=0),
        _node("Div", [f"{a}_weight", f"{p}_split"], [f"{a}_hi"]),
        _node("Mul", [f"{a}_hi", f"{p}_split"], [f"{a}_hi_part"]),
        _node("Sub", [f"{a}_weight", f"{a}_hi_part"], [f"{a}_lo"]),
        _node("Reshape", [f"{a}_hi", f"{p}_weight_shape"], [f"{a}_hi_b"]),
        _node("Reshape", [f"{a}_lo", f"{p}_weight_shape"], [f"{a}_lo_b"]),
        _node("Mul", [f"{a}_taps_px", f"{a}_hi_b"], [f"{a}_hi_products"]),
        _node("ReduceSum", [f"{a}_hi_products", f"{p}_axes1"], [f"{a}_hi_sum"], keepdims=0),
        _node("Mul", [f"{a}_taps_px", f"{a}_lo_b"], [f"{a}_lo_products"]),
        _node("ReduceSum", [f"{a}_lo_products", f"{p}_axes1"], [f"{a}_lo_sum0"], keepdims=0),
        _node("Add", [f"{a}_lo_sum0", f"{p}_round"], [f"{a}_lo_sum"]),
        _node("Div", [f"{a}_lo_sum", f"{p}_split"], [f"{a}_carry"]),  # (2**21 + lo sum) >> 8, non-negative
        _node("Add", [f"{a}_hi_sum", f"{a}_carry"], [f"{a}_sum"]),
        _node("Div", [f"{a}_sum", f"{p}_divisor"], [f"{a}_shifted"]),  # >> 14
        _node("Max", [f"{a}_shifted", f"{p}_low"], [f"{a}_clip0"]),
        _node("Min", [f"{a}_clip0", f"{p}_high"], [target]),
    ]
