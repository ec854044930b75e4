"""What the commands share: the model flags (from the detectors' parameter tables), run flags, presets and
threshold overrides."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from somad.errors import SomadError

#: Characters a terminal may act on: C0 and C1 controls, DEL, and the bidirectional and other invisible format
#: characters (a model's strings, or a file name, could otherwise move the cursor, retitle the window or reorder
#: the line).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def printable(text) -> str:
    """``text`` with every character a terminal could act on written as its escape (``\\x1b``, ``\\u202e``)."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


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


def add_model_rewrite_args(
    p: argparse.ArgumentParser, *, model_help: str, images_metavar: str, images_help: str
) -> None:
    """The arguments of a command that reads a model and good images and writes a new model file (calibrate,
    update): MODEL, the images, ``-o MODEL2``, ``--overwrite``, ``--device``, ``--batch-size``,
    ``--accept-outliers``, ``--sign-key`` and ``--verify-key``."""
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("good_dir", metavar=images_metavar, help=images_help)
    p.add_argument(
        "--accept-outliers",
        action="store_true",
        help="take images that score far above the model's threshold as good too (by default refused, listed: "
        "above every held-out good score and twice as far from their median as the threshold; defects?)",
    )
    p.add_argument("-o", "--output", required=True, metavar="MODEL2", help="model file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (GPU if present)")
    p.add_argument("--batch-size", type=batch_size, default=16, help="images per backbone batch (default 16)")
    add_key_args(p, sign=True, verify=True)


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


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    """``--backend`` of predict and serve: the runtime of an export folder (``somad.runtime.BACKENDS``)."""
    from somad.runtime import BACKENDS

    p.add_argument(
        "--backend",
        default=None,
        choices=list(BACKENDS),
        help="with an export folder (`somad export`): the runtime that runs its graph, without torch "
        '(default onnxruntime: pip install "somad[runtime]"; openvino: pip install "somad[runtime-openvino]")',
    )


def is_export(model: str) -> bool:
    """Whether the MODEL argument names an export folder (``somad export``) rather than a model file; a folder that
    is not one is refused in one line."""
    from somad.io.export_format import META_FILE

    path = Path(model)
    if not path.is_dir():
        return False
    if not (path / META_FILE).is_file():
        raise SomadError(
            f"{model}: is a directory without {META_FILE}: neither a model file (`somad fit`) nor an export folder "
            "(`somad export`); pass one of those"
        )
    return True


def load_export(args, verify_key: bytes | None):
    """The export folder ``args.model`` as a detector (``somad.runtime.OnnxDetector``, run by ``--backend``), for
    predict and serve; the options only a model file takes are refused in one line."""
    from somad.runtime import OnnxDetector

    refused = (
        (
            "search",
            "an export runs the search it was exported with; drop --search, or re-export with `somad export --search`",
        ),
        ("ray", "--ray scores a model file; drop --ray, or pass the model file"),
    )
    for flag, why in refused:
        if getattr(args, flag, None) is not None:
            raise SomadError(f"{args.model}: is an export folder: {why}")
    if getattr(args, "device", None) == "cuda":
        raise SomadError(f"{args.model}: is an export folder, which runs on the CPU; drop --device cuda")
    return OnnxDetector(args.model, backend=args.backend or "onnxruntime", verify_key=verify_key)


def refuse_backend(args) -> None:
    """``--backend`` given with a model file: one line saying what it takes."""
    if getattr(args, "backend", None) is not None:
        raise SomadError(
            f"{args.model}: is a model file; --backend runs an export folder (write one with `somad export`), "
            "or drop --backend"
        )


def add_run_args(p: argparse.ArgumentParser, on_error_default: str, *, scoring: bool = False) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (GPU if present)")
    if scoring:  # predict and evaluate: overrides of a loaded model's scoring and decisions
        p.add_argument(
            "--search",
            default=None,
            type=search_name,
            metavar="SEARCH",
            help="SOMAD model file: override the model's nearest-node search, one of `somad fit --search` "
            "(default: as fitted)",
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
    p.add_argument("--batch-size", type=batch_size, default=16, help="images per backbone batch (default 16)")
    p.add_argument(
        "--on-error",
        default=on_error_default,
        choices=["fail", "skip"],
        help=f"unreadable images: stop, or skip and list them (default {on_error_default})",
    )


def search_name(text: str) -> str:
    """``--search``: a search of ``somad.som.node_search``, checked at parse time. Its module (and torch) is imported
    only when the flag is given, so that the scoring commands start without torch; without torch the name is kept
    as given (only a model file takes it, and a model file needs torch)."""
    try:
        from somad.som.node_search import SEARCHES
    except ImportError:
        return text
    if text not in SEARCHES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(SEARCHES)})")
    return text


def batch_size(text: str) -> int:
    """``--batch-size``: the detectors' rule for ``batch_size`` (``somad.io.schema.BATCH_SIZE``, their parameter
    table's), at parse time."""
    from somad.io.schema import BATCH_SIZE

    rule = BATCH_SIZE
    try:
        value = rule.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    problem = rule.check(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: {problem}")
    return value


def add_key_args(p: argparse.ArgumentParser, *, sign: bool = False, verify: bool = False) -> None:
    """``--sign-key KEY`` (a command that writes a model or an export) and ``--verify-key KEY`` (one that reads
    a model); see ``somad.io.integrity``."""
    if sign:
        p.add_argument(
            "--sign-key",
            metavar="KEY",
            default=None,
            help="sign what is written with the secret key in this file (HMAC-SHA-256), so that --verify-key can "
            "prove it unchanged; keep the key away from the model folder",
        )
    if verify:
        p.add_argument(
            "--verify-key",
            metavar="KEY",
            default=None,
            help="refuse a model that is not signed with the secret key in this file (see --sign-key)",
        )


def keys(args, model: str | None = None, output: str | None = None) -> tuple[bytes | None, bytes | None]:
    """The ``--sign-key`` and ``--verify-key`` of ``args``, read now (a bad key file fails before any work); a
    warning when a key file sits beside the model it verifies or the output it signs."""
    from somad.io.integrity import read_key, warn_key_beside

    sign_path, verify_path = getattr(args, "sign_key", None), getattr(args, "verify_key", None)
    if sign_path is not None and output is not None:
        warn_key_beside(sign_path, output)
    if verify_path is not None and model is not None:
        warn_key_beside(verify_path, model)
    return (
        None if sign_path is None else read_key(sign_path),
        None if verify_path is None else read_key(verify_path),
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
        kept = {k: (model.threshold_info_ or {}).get(k) for k in ("good_score_median", "good_scores")}
        model.threshold_info_ = {"source": "command line", "n_images": None, **kept}  # the normalised scale's basis


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
