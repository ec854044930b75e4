"""The ``somad`` command line: fit, predict, evaluate, demo, benchmark.

Only this module prints. Every user error is one line on stderr (``error: ...``) and exit status 2;
an interrupt (Ctrl-C or SIGTERM) exits with 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import SomadError

logger = logging.getLogger("somad")


# ----------------------------------------------------------------------------------------- shared options
def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags: one per parameter of the detectors, from their parameter tables (``somad.params``)."""
    from .methods import METHODS, PRESETS
    from .params import add_flags

    g = p.add_argument_group("model")
    g.add_argument("--method", default="somad", choices=sorted(METHODS), help="detector (default: somad)")
    g.add_argument(
        "--preset",
        default="default",
        choices=list(PRESETS),
        help="named configuration: 'paper' = the SOMAD paper's pipeline (crop 224, no local aggregation) as "
        "somad 0.5.0 ran it; flags given explicitly override it (default: default)",
    )
    add_flags(g, {"SOMAD": METHODS["somad"], "PaDiM": METHODS["padim"], "PatchCore": METHODS["patchcore"]})


def _add_run_args(p: argparse.ArgumentParser, on_error_default: str, *, scoring: bool = False) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (GPU if present)")
    if scoring:  # predict and evaluate: overrides of a loaded model's scoring and decisions
        p.add_argument(
            "--search",
            default=None,
            choices=["fast", "exact"],
            help="SOMAD: override the model's nearest-node search (default: as fitted)",
        )
        p.add_argument(
            "--threshold",
            type=_finite_float,
            default=None,
            metavar="VALUE",
            help="image threshold: score > VALUE is anomalous (default: the model's)",
        )
        p.add_argument(
            "--pixel-threshold",
            type=_finite_float,
            default=None,
            metavar="VALUE",
            help="pixel threshold of the masks of flagged images (default: the model's)",
        )
    p.add_argument("--batch-size", type=int, default=16, help="images per backbone batch (default 16)")
    p.add_argument(
        "--on-error",
        default=on_error_default,
        choices=["fail", "skip"],
        help=f"unreadable images: stop, or skip and list them (default {on_error_default})",
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def model_from_args(args) -> object:
    """Build an unfitted detector from parsed CLI options: every parameter of the chosen method that has a flag."""
    from .methods import METHODS

    cls = METHODS[args.method]
    return cls(**{name: getattr(args, name) for name in cls._get_param_names() if hasattr(args, name)})


def apply_preset(args, argv: list[str], parser: argparse.ArgumentParser) -> None:
    """Set the values of ``args.preset`` on ``args``, except those whose flag was given in ``argv``."""
    from .methods import PRESETS

    values = PRESETS.get(getattr(args, "preset", "default"), {})
    given = set()
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag.startswith("--"):  # argparse accepts unique prefixes of long options
            given |= {a.dest for opt, a in parser._option_string_actions.items() if opt.startswith(flag)}
    for name, value in values.items():
        if name not in given:
            setattr(args, name, value)


def override_thresholds(model, args) -> None:
    """``--threshold`` / ``--pixel-threshold`` of predict and evaluate replace the model's thresholds."""
    for flag, name in (("threshold", "image_threshold_"), ("pixel_threshold", "pixel_threshold_")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(model, name, float(value))
    if args.threshold is not None or args.pixel_threshold is not None:
        if model.image_threshold_ is None or model.pixel_threshold_ is None:
            raise SomadError(
                f"{args.model}: the model has no threshold to complete; give both --threshold and "
                "--pixel-threshold, or run `somad calibrate` first"
            )
        model.threshold_info_ = {"source": "command line", "n_images": None}


# ----------------------------------------------------------------------------------------- commands
def cmd_fit(args) -> int:
    out = Path(args.output)
    if out.is_dir():
        raise SomadError(f"{out}: is a folder; -o takes the model file to write, e.g. model.safetensors")
    if out.exists() and not args.overwrite:
        raise SomadError(f"{out}: model file already exists; pass --overwrite or choose another -o")
    model = model_from_args(args).fit(args.train_dir)
    model.save(out)
    info = [f"fitted {model.method} on {model.n_train_images_} images in {model.fit_seconds_:.1f} s"]
    if getattr(model, "som_", None) is not None:
        info.append(
            f"quantization error {model.som_.quantization_error_:.4f}, "
            f"topographic error {model.som_.topographic_error_:.4f}"
        )
    if model.image_threshold_ is not None:
        info.append(f"threshold {model.image_threshold_:.4f} from {model.n_val_images_} held-out images")
    elif not model.val_fraction:
        info.append("no threshold (--val-fraction 0): predict writes scores, no decisions or masks")
    print("; ".join(info))
    if model.image_threshold_ is None and model.val_fraction:
        print(
            f"warning: no threshold was set: --val-fraction {model.val_fraction} held out no usable image "
            f"({model.n_train_images_} training image(s)); predict writes scores, no decisions or masks "
            "(use more images or a larger --val-fraction)",
            file=sys.stderr,
        )
    if model.skipped_:
        print(f"skipped {len(model.skipped_)} unreadable training image(s):", file=sys.stderr)
        for line in model.skipped_:
            print(f"  {line}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def _input_items(inputs: list[str]):
    """Image items of the predict inputs; every input must exist and every output name must be unique."""
    from .base import as_items

    for entry in inputs:
        if not Path(entry).exists():
            raise SomadError(f"{entry}: no such file or folder; check the path")
    items = as_items(inputs)
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SomadError(f"two inputs would both be written as {dup!r}; predict the folders separately")
    return items


def cmd_predict(args) -> int:
    from .base import load
    from .outputs import staged_output_dir, write_predictions

    model = load(args.model, device=args.device, search=args.search)
    model.batch_size = args.batch_size
    override_thresholds(model, args)
    items = _input_items(args.inputs)
    with staged_output_dir(args.output, overwrite=args.overwrite) as tmp:
        rows, skipped = write_predictions(model, items, tmp, save_maps=args.save_maps, on_error=args.on_error)
        if skipped and not rows:  # leaving the block by an error discards the staged folder: nothing is written
            first = skipped[0].split("; ")[0]  # the reason without its per-image hint
            raise SomadError(
                f"none of the {len(skipped)} input images could be read (first: {first}); "
                "pass readable image files or folders"
            )
    n_flag = sum(1 for r in rows if r[2] == 1)
    n_invalid = sum(1 for r in rows if r[3] != "ok")
    tail = f"; {n_flag} flagged anomalous" if model.image_threshold_ is not None else ""
    tail += f" ({n_invalid} refused as invalid input, see the status column)" if n_invalid else ""
    print(f"scored {len(rows)} images{tail}; wrote {args.output}/scores.csv")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), listed in {args.output}/skipped.csv", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from .base import load

    out = Path(args.output)
    if out.is_dir():
        raise SomadError(f"{out}: is a folder; -o takes the model file to write, e.g. model.safetensors")
    if out.exists() and not args.overwrite:
        raise SomadError(f"{out}: model file already exists; pass --overwrite or choose another -o")
    model = load(args.model, device=args.device)
    model.batch_size = args.batch_size
    for name in ("threshold_quantile", "pixel_threshold_quantile"):
        if getattr(args, name) is not None:
            setattr(model, name, getattr(args, name))
    model.calibrate(args.good_dir)
    model.save(out)
    info = model.threshold_info_
    print(
        f"image threshold {model.image_threshold_:.4f} = {info['quantile']:g}-quantile of the scores of "
        f"{info['n_images']} good images: expected false-alarm rate {100 * info['expected_false_alarm_rate']:.1f}%"
        + (" (few images: the estimate is rough; 100 or more give a steadier one)" if info["n_images"] < 20 else "")
    )
    print(f"pixel threshold {model.pixel_threshold_:.4f} = {info['pixel_quantile']:g}-quantile of their map pixels")
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(Path(args.output), backbone=args.backbone, device=args.device, overwrite=args.overwrite)
    print(
        f"synthetic set: {result['n_train']} good training images, {result['n_test']} test images "
        f"({result['n_defect']} defective) in {result['data']}"
    )
    print(f"fit {result['fit_seconds']:.1f} s, predict {result['predict_ms']:.0f} ms/image")
    print(f"image AUROC {result['image_auroc']:.4f}   pixel AUROC {result['pixel_auroc']:.4f}")
    print(f"model: {result['model']}   heatmaps: {result['predictions']}/heatmaps")
    return 0


# ----------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="somad", description="Unsupervised visual anomaly detection with SOMAD.")
    parser.add_argument("--version", action="version", version=f"somad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="train on defect-free images", description="Train a detector on defect-free images.")
    p.add_argument("train_dir", metavar="DIR", help="folder of good images, or an MVTec category (uses train/good)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    _add_common_model_args(p)
    _add_run_args(p, "fail")
    p.set_defaults(func=cmd_fit, parser=p)

    p = sub.add_parser(
        "predict",
        help="score images and write heatmaps",
        description="Score images: OUT/scores.csv, OUT/heatmaps/, OUT/masks/ and (--save-maps) OUT/maps/.",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by `somad fit`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--save-maps", action="store_true", help="also write float32 maps at original resolution (.npy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_run_args(p, "skip", scoring=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "calibrate",
        help="re-estimate the thresholds from good images, without refitting",
        description="Re-estimate a model's image and pixel thresholds from a folder of good images "
        "(the same estimate fit makes from its held-out images) and write a new model file.",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by `somad fit`")
    p.add_argument("good_dir", metavar="GOOD_DIR", help="folder of good images (or an MVTec category: train/good)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL2", help="model file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.add_argument(
        "--threshold-quantile",
        type=float,
        default=None,
        help="image threshold quantile (default: the model's, normally 0.99)",
    )
    p.add_argument(
        "--pixel-threshold-quantile",
        type=float,
        default=None,
        help="pixel threshold quantile (default: the model's, normally 0.99)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (GPU if present)")
    p.add_argument("--batch-size", type=int, default=16, help="images per backbone batch (default 16)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "demo",
        help="fit and score a generated synthetic inspection set (offline)",
        description="Generate a synthetic inspection set, fit SOMAD on its good images, "
        "score its test images and print image and pixel AUROC.",
    )
    p.add_argument("-o", "--output", default="somad-demo", metavar="DIR", help="working folder (default somad-demo)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="default efficientnet_lite0")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.set_defaults(func=cmd_demo)

    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Commands defined in their own modules (evaluation, benchmark)."""
    import importlib

    for module in ("evaluate", "benchmark"):
        try:
            mod = importlib.import_module(f"somad.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"somad.{module}":
                raise
            continue
        mod.add_parser(sub, _add_common_model_args, _add_run_args)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if getattr(args, "parser", None) is not None:
        apply_preset(args, argv, args.parser)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.quiet:
        import os

        os.environ["SOMAD_NO_PROGRESS"] = "1"
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM unwinds like Ctrl-C: temporary files are removed
    try:
        return int(args.func(args) or 0)
    except SomadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system problem (permissions, no space, a file where a folder should be)
        where = f"{exc.filename}: " if exc.filename else ""
        print(" ".join(f"error: {where}{exc.strerror or exc}".split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
