"""The ``somad`` command line: one module per command (fit, predict, evaluate, calibrate, benchmark, demo).

Only this package prints. Every user error is one line on stderr (``error: ...``) and exit status 2;
an interrupt (Ctrl-C or SIGTERM) exits with 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from somad._version import __version__
from somad.cli import benchmark, calibrate, demo, evaluate, export, fit, info, predict, serve, update
from somad.cli.common import apply_preset, model_from_args, override_thresholds, printable
from somad.errors import SomadError

#: Every command: a module with ``add_parser(sub)`` and ``run(args)``, in the order of ``somad --help``.
COMMANDS = (fit, predict, evaluate, calibrate, update, benchmark, demo, serve, info, export)
#: anomalib's verbs, run as the somad command that does the same (with a note on stderr).
ALIASES = {"train": "fit", "test": "evaluate"}

logger = logging.getLogger("somad")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="somad",
        description="Unsupervised visual anomaly detection with SOMAD.",
        epilog="anomalib's verbs work too: " + ", ".join(f"`somad {a}` is `somad {c}`" for a, c in ALIASES.items()),
    )
    parser.add_argument("--version", action="version", version=f"somad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _aliased(argv: list[str]) -> list[str]:
    """``argv`` with an anomalib verb (:data:`ALIASES`) in the command's place replaced by somad's, said on stderr."""
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)  # the global options take no value
    if at is None or argv[at] not in ALIASES:
        return argv
    verb, command = argv[at], ALIASES[argv[at]]
    print(f"note: `somad {verb}` (anomalib's verb) is the same as `somad {command}`; running that", file=sys.stderr)
    return argv[:at] + [command] + argv[at + 1 :]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _aliased(sys.argv[1:] if argv is None else list(argv))
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
    except OSError as exc:  # a file system problem (permissions, no space, a file where a folder should be)
        where = f"{exc.filename}: " if exc.filename else ""
        print(" ".join(f"error: {where}{exc.strerror or exc}".split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ALIASES", "COMMANDS", "apply_preset", "build_parser", "main", "model_from_args", "override_thresholds"]
