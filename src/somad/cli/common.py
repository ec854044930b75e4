"""What the commands share: the model flags (from the detectors' parameter tables), run flags, presets and
threshold overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from somad.errors import SomadError
from somad.som.node_search import SEARCHES


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags: one per parameter of the detectors, from their parameter tables (``somad.params``)."""
    from somad.methods import METHODS, PRESETS
    from somad.params import add_flags

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


def add_model_rewrite_args(p: argparse.ArgumentParser, *, model_help: str, images_metavar: str) -> None:
    """The arguments of a command that reads a model and good images and writes a new model file (calibrate,
    update): MODEL, the images, ``-o MODEL2``, ``--overwrite``, ``--device`` and ``--batch-size``."""
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("good_dir", metavar=images_metavar, help="folder of good images (or an MVTec category: train/good)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL2", help="model file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (GPU if present)")
    p.add_argument("--batch-size", type=int, default=16, help="images per backbone batch (default 16)")


def add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--ray [ADDRESS]`` and ``--ray-workers N`` of fit and predict."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help=f"{what} (ADDRESS: 'auto' = the running cluster, ray://host:port; none = a local Ray); "
        'needs pip install "somad[ray]"',
    )
    p.add_argument("--ray-workers", type=int, default=None, metavar="N", help="Ray workers (default: one per CPU)")


def add_run_args(p: argparse.ArgumentParser, on_error_default: str, *, scoring: bool = False) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (GPU if present)")
    if scoring:  # predict and evaluate: overrides of a loaded model's scoring and decisions
        p.add_argument(
            "--search",
            default=None,
            choices=list(SEARCHES),
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
    from somad.methods import METHODS
    from somad.params import PER_METHOD

    cls = METHODS[args.method]
    values = {name: getattr(args, name) for name in cls._get_param_names() if hasattr(args, name)}
    return cls(**{name: value for name, value in values.items() if value is not PER_METHOD})


def apply_preset(args, argv: list[str], parser: argparse.ArgumentParser) -> None:
    """Set the values of ``args.preset`` on ``args``, except those whose flag was given in ``argv``."""
    from somad.methods import PRESETS

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
        median = (model.threshold_info_ or {}).get("good_score_median")  # the normalised scale's 0 stays
        model.threshold_info_ = {"source": "command line", "n_images": None, "good_score_median": median}


def model_output(path: str, overwrite: bool) -> Path:
    """Check ``-o`` of a command that writes a model file, before any work."""
    out = Path(path)
    if out.is_dir():
        raise SomadError(f"{out}: is a folder; -o takes the model file to write, e.g. model.safetensors")
    if out.exists() and not out.is_file():
        raise SomadError(f"{out}: exists and is not a regular file (a device or a pipe?); choose another -o")
    if out.exists() and not overwrite:
        raise SomadError(f"{out}: model file already exists; pass --overwrite or choose another -o")
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Fail now, not after the work, if the model file could not be written: a temporary file is created and
    removed in its folder (or in the nearest existing folder above it, where the save would create the rest)."""
    import os
    import tempfile

    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise SomadError(f"{out}: {folder} is not a folder; choose another -o")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise SomadError(
            f"{out}: cannot write in {folder} ({reason}); choose another -o or make the folder writable"
        ) from None
