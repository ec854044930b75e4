"""``somad info``: what a model file holds (method, backbone, geometry, thresholds, training set, hashes), or what an
export folder's description says (``somad export``; read and verified without torch)."""

from __future__ import annotations

import json

from somad.cli.common import add_key_args, is_export, keys, printable

NOT_RECORDED = "not recorded"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="describe a model file or an export folder",
        description="Describe a model file: method, backbone, input geometry, thresholds and how they were set, "
        "training set, format version and hashes. The file is read whole and its content hash checked. Or an "
        "export folder (`somad export`): what its somad_export.json says and the files' hashes, every field, the "
        "description's own hash and the graph's SHA-256 checked.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="model file written by `somad fit`, or folder written by `somad export`"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (one JSON object)")
    add_key_args(p, verify=True)
    p.set_defaults(func=run)


def run(args) -> int:
    _, verify_key = keys(args, model=args.model)
    if is_export(args.model):
        from somad.runtime import describe_export

        info = describe_export(args.model, verify_key=verify_key)
        shown = export_text
    else:
        from somad.service.model_info import describe

        info = describe(args.model, verify=True, verify_key=verify_key)
        shown = text
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else shown(info))
    return 0


def _value(value, fmt: str = "{}") -> str:
    return NOT_RECORDED if value is None else fmt.format(value)


def text(info: dict) -> str:
    """The human-readable description of :func:`somad.service.model_info.describe`'s result."""
    from somad.service.model_info import scale_source, threshold_source

    g = info["geometry"]
    if g.get("tile_size"):
        geometry = (
            f"shorter side resized to {g['image_size']}, {g['tile_size']} px tiles (overlap {g['tile_overlap']:g})"
        )
    elif g.get("crop_size"):
        geometry = f"resized to {g['image_size']}x{g['image_size']}, center crop {g['crop_size']}"
    elif g.get("input_frame"):
        (h, w), aspect = g["input_frame"], info["params"].get("aspect")
        geometry = f"resized to {w}x{h}, the training images' aspect ratio kept (aspect={aspect}), whole frame"
    else:
        geometry = f"resized to {g['image_size']}x{g['image_size']}, whole frame (no crop, no tiles)"
    shown = {"backbone", "weights", "image_size", "crop_size", "tile_size", "tile_overlap"}
    side = info.get("som_side")  # SOMAD's fitted map, shown after som_size=auto
    params = ", ".join(
        f"{k}={v}" + (f" ({side}x{side})" if k == "som_size" and v == "auto" and side else "")
        for k, v in sorted(info["params"].items())
        if k not in shown
    )
    lines = [
        ("file", info["path"]),
        ("method", info["method"]),
        ("backbone", f"{info['backbone']} (weights: {info['weights']})"),
        ("input", geometry),
        ("preset", _value(info["preset"])),
        ("parameters", params),
        ("image threshold", _value(info["image_threshold"], "{:.6g}")),
        ("pixel threshold", _value(info["pixel_threshold"], "{:.6g}")),
        ("thresholds set by", threshold_source(info["threshold_info"])),
        ("normalised scale", scale_source(info["threshold_info"])),
        ("training images", _value(info["n_train_images"])),
        _threshold_images(info),
        ("training set sha256", _value(info["train_set_sha256"])),
        ("fit time", _value(info["fit_seconds"], "{:.1f} s")),
        ("written by", f"somad {_value(info['somad_version'])}"),
        ("format version", _value(info["format_version"])),
        ("content sha256", _value(info["content_sha256"])),
        ("signature", _SIGNATURE[info.get("signature")]),
        ("file sha256", f"{info['file_sha256']} ({info['file_bytes']} bytes)"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k + ':':<{width + 1}} {printable(v)}" for k, v in lines)


def export_text(info: dict) -> str:
    """The human-readable description of :func:`somad.runtime.describe_export`'s result."""
    from somad.service.model_info import scale_source, threshold_source

    g = info["geometry"]
    h, w = g.get("frame_size") or (g["image_size"],) * 2
    if g.get("tile_offsets"):
        (oh, ow) = g["original_size"]
        geometry = (
            f"resized to {w}x{h}, {len(g['tile_offsets'])} tiles of {g['tile_size']} px; serves the images of that "
            f"frame (such as {ow}x{oh}) and refuses others"
        )
    elif g.get("crop_size"):
        geometry = f"resized to {w}x{h}, center crop {g['input_size']}"
    else:
        geometry = f"resized to {w}x{h}, whole frame (no crop)"
    params = {**(info.get("params") or {}), **(info.get("scoring") or {})}
    check = info.get("parity_check") or {}
    files = info["files"]
    lines = [
        ("folder", info["path"]),
        ("kind", f"export ({info['format']} graph, export version {info['export_version']})"),
        ("method", info["method"]),
        ("backbone", _value(info.get("backbone"))),
        ("input", geometry),
        ("parameters", ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "backbone") or NOT_RECORDED),
        ("image threshold", _value(info["image_threshold"], "{:.6g}")),
        ("pixel threshold", _value(info["pixel_threshold"], "{:.6g}")),
        ("thresholds set by", threshold_source(info.get("threshold_info"))),
        ("normalised scale", scale_source(info.get("threshold_info"))),
        ("export check", _export_check(check)),
        ("source model", _source(info.get("source_model"))),
        ("written by", f"somad {_value(info.get('somad_version'))} (torch {_value(info.get('torch_version'))})"),
        ("written at", _value(info.get("created"))),
        ("content sha256", info["content_sha256"]),
        ("signature", _SIGNATURE[info.get("signature")]),
        *((f"{name} sha256", f"{f['sha256']} ({f['bytes']} bytes)") for name, f in files.items()),
        ("checked", "every field of the description, its content hash, the graph's SHA-256 against it"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k + ':':<{width + 1}} {printable(v)}" for k, v in lines)


def _export_check(check: dict) -> str:
    """``somad export``'s parity check against the native path, in words."""
    if not check:
        return "not run (--no-check)"
    return (
        f"{check.get('images')} frames against the native path: scores within {check.get('max_rel_score_diff', 0):.2g} "
        f"(relative), maps within {check.get('max_abs_map_diff', 0):.2g}"
    )


def _source(source: dict | None) -> str:
    if not source:
        return NOT_RECORDED
    return f"{source.get('file') or 'a model file'} (sha256 {source['sha256']})"


def _threshold_images(info: dict) -> tuple[str, str]:
    """The row naming the good images the thresholds rest on: held out, or all of them cross-fitted."""
    t = info.get("threshold_info") or {}
    if t.get("rule") == "cross_fit":
        return "threshold images", f"{_value(info['n_val_images'])} (every training image, out of fold)"
    return "held-out images", _value(info["n_val_images"])


_SIGNATURE = {
    "verified": "HMAC-SHA-256, verified with --verify-key",
    "present": "HMAC-SHA-256, not verified (pass --verify-key KEY)",
    None: "none (the content hash proves integrity, not origin; see --sign-key)",
}
