"""The ``somad`` command line: one module per command (fit, predict, evaluate, calibrate, benchmark, demo).

Only this package prints. Every user error is one line on stderr (``error: ...``) and exit status 2;
an interrupt (Ctrl-C or SIGTERM) exits with 130 and leaves no partial output.

Only the module of the command being run is imported (importing torch takes seconds): ``somad predict EXPORT_DIR``
starts without it. An installation without torch (``pip install "somad[runtime]"``) runs
:data:`RUNTIME_COMMANDS` on export folders; the other commands, and those on a model file, say in one line which
extra to install (:data:`FIT_HINT`), exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from somad._version import __version__
from somad.cli.common import apply_preset, model_from_args, override_thresholds, printable
from somad.errors import SomadError

#: Every command, in the order of ``somad --help``: the name of a module of this package with ``add_parser(sub)``
#: and ``run(args)``.
COMMANDS = ("fit", "predict", "evaluate", "calibrate", "update", "benchmark", "demo", "serve", "info", "export")
#: The commands an installation without torch runs, on an export folder (``somad export``; ``somad.runtime``).
RUNTIME_COMMANDS = ("predict", "serve", "info")
#: The modules only the ``fit`` extra installs (pyproject.toml): a command that needs one says so in one line.
FIT_MODULES = ("torch", "torchvision", "timm", "safetensors")
FIT_HINT = (
    'somad {command} needs torch, which this installation lacks: pip install "somad[fit]" (without it, somad '
    "predict, serve and info take a folder written by `somad export`)"
)
#: anomalib's verbs, run as the somad command that does the same (with a note on stderr).
ALIASES = {"train": "fit", "test": "evaluate"}

logger = logging.getLogger("somad")


def fitting_installed() -> bool:
    """Whether torch can be imported (it is, by this call)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``command`` (one of :data:`COMMANDS`) only that command's parser is built
    (and only its module imported), the others being bare names. Without torch, the commands outside
    :data:`RUNTIME_COMMANDS` are listed with the extra they need."""
    only = command if command in COMMANDS else None
    fitting = None
    parser = argparse.ArgumentParser(
        prog="somad",
        description="Unsupervised visual anomaly detection with SOMAD.",
        epilog="anomalib's verbs work too: " + ", ".join(f"`somad {a}` is `somad {c}`" for a, c in ALIASES.items()),
    )
    parser.add_argument("--version", action="version", version=f"somad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)  # never parsed: argv names another command
            continue
        if name not in RUNTIME_COMMANDS:
            fitting = fitting_installed() if fitting is None else fitting
            if not fitting:
                sub.add_parser(name, help='needs torch: pip install "somad[fit]"')
                continue
        importlib.import_module(f"somad.cli.{name}").add_parser(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command named in ``argv``: its first argument that is not a global option (they take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def needs_fit(exc: ImportError) -> bool:
    """Whether ``exc`` is the import of a module only the ``fit`` extra installs (:data:`FIT_MODULES`)."""
    return isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in FIT_MODULES


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _aliased(argv: list[str]) -> list[str]:
    """``argv`` with an anomalib verb (:data:`ALIASES`) in the command's place replaced by somad's, said on stderr."""
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)  # as _command
    if at is None or argv[at] not in ALIASES:
        return argv
    verb, command = argv[at], ALIASES[argv[at]]
    print(f"note: `somad {verb}` (anomalib's verb) is the same as `somad {command}`; running that", file=sys.stderr)
    return argv[:at] + [command] + argv[at + 1 :]


def main(argv: list[str] | None = None) -> int:
    argv = _aliased(sys.argv[1:] if argv is None else list(argv))
    command = _command(argv)
    if command in COMMANDS and command not in RUNTIME_COMMANDS and not fitting_installed():
        print(f"error: {FIT_HINT.format(command=command)}", file=sys.stderr)
        return 2
    parser = build_parser(command)
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
        print(f"error: {printable(exc)}", file=sys.stderr)  # a file name or a model string may hold escapes
        return 2
    except ImportError as exc:  # a model file without torch: `somad predict model.safetensors` on a runtime install
        if not needs_fit(exc):
            raise
        what = f"{args.command} on a model file" if args.command in RUNTIME_COMMANDS else args.command
        print(f"error: {FIT_HINT.format(command=what)}", file=sys.stderr)
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


__all__ = [
    "ALIASES",
    "COMMANDS",
    "FIT_HINT",
    "RUNTIME_COMMANDS",
    "apply_preset",
    "build_parser",
    "main",
    "model_from_args",
    "needs_fit",
    "override_thresholds",
]
