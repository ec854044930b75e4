"""``somad export``: a fitted model as one ONNX graph (backbone + scoring), to run without torch."""

from __future__ import annotations

import json

from somad.cli.common import add_key_args, keys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a fitted model as one ONNX graph (run it without torch: somad.runtime.OnnxDetector)",
        description="Write DIR/model.onnx (the decoded RGB image at any size, uint8 (1, H, W, 3), and optionally "
        "the input gate's result, in, resized inside as the native path resizes; score, anomaly maps, verdict and "
        "mask out, the thresholds held in the graph) and DIR/somad_export.json (thresholds, input size, geometry, "
        "normalisation, source model hash). The graph is checked against the native path under onnxruntime "
        "(scores, maps, verdicts, masks) before the folder is written.",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by `somad fit`")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write")
    p.add_argument(
        "--format",
        default="onnx",
        choices=["onnx"],
        help="onnx (the only format for now)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--search",
        default="model",
        choices=["model", "exact", "ivf"],
        help="SOMAD's nearest-node search in the graph: the model's own (default), exhaustive, or its IVF index",
    )
    p.add_argument(
        "--original-size",
        type=_size,
        metavar="HEIGHTxWIDTH",
        help="tiled models (--tile): the size of the images the graph serves, e.g. 1240x500 (its tiles follow the "
        "frame; images of another aspect ratio are refused); default: the training images' median size",
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the onnxruntime check against the native path (no onnxruntime)"
    )
    add_key_args(p, sign=True, verify=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from somad.export.onnx import META_FILE, export_model

    sign_key, verify_key = keys(args, model=args.model, output=args.output)
    out = export_model(
        args.model,
        args.output,
        format=args.format,
        overwrite=args.overwrite,
        check=not args.no_check,
        search=None if args.search == "model" else args.search,
        sign_key=sign_key,
        verify_key=verify_key,
        original_size=args.original_size,
    )
    meta = json.loads((out / META_FILE).read_text())
    check = meta.get("parity_check")
    if check:
        print(
            f"checked against the native path on {check['images']} generated frames: max relative score "
            f"difference {check['max_rel_score_diff']:.1e}, max map difference {check['max_abs_map_diff']:.1e}, "
            f"{check['verdicts']} verdicts and {check['mask_pixels']} mask pixels compared "
            f"({check['verdicts_differing_at_the_threshold']} and {check['mask_pixels_differing_at_the_threshold']} "
            "differing, at the threshold)"
        )
    g = meta["geometry"]
    h, w = g.get("frame_size") or (g["input_size"],) * 2
    served = "at any size (the graph resizes it)"
    if g.get("original_size"):
        (oh, ow), (fh, fw) = g["original_size"], g["frame_size"]
        served = (
            f"whose frame is {fw}x{fh}, such as {ow}x{oh} (the graph resizes it and cuts {len(g['tile_offsets'])} "
            "tiles; other frames are refused)"
        )
    print(
        f"graph inputs: image uint8 (1, H, W, 3), the decoded RGB image {served}, and optionally original_size, "
        f"valid, image_threshold, pixel_threshold; outputs: score, anomaly_map (1, {h}, {w}), is_anomalous, "
        "original_map and mask (1, H, W)"
    )
    print(f"wrote {out} ({', '.join(meta['files'])}, {META_FILE})")
    return 0


def _size(text: str) -> tuple[int, int]:
    import argparse

    parts = text.lower().replace(",", "x").split("x")
    try:
        height, width = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH (e.g. 1240x500)") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be positive")
    return height, width
