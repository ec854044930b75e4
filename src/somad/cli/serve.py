"""``somad serve``: the HTTP inspection service (FastAPI + uvicorn; ``pip install "somad[serve]"``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from somad.cli.common import add_backend_arg, add_key_args, is_export, keys, load_export, refuse_backend
from somad.errors import SomadError

#: The service's time limits (``somad.service.guard``), repeated here so that ``somad serve --help`` does not
#: import the service (FastAPI may not be installed); a test holds them equal.
HEADER_TIMEOUT, READ_TIMEOUT, BODY_TIMEOUT = 10.0, 10.0, 60.0
#: Seconds a worker of ``--workers N`` may take to start (importing torch on a busy machine) before uvicorn's
#: supervisor gives up on it (uvicorn's own default, 5 s, respawned workers forever on a busy 2-core machine).
WORKER_START_TIMEOUT = 300.0

INSTALL_HINT = 'somad serve needs FastAPI and uvicorn; install them with: pip install "somad[serve]"'


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (POST /v1/predict)",
        description="Serve a model over HTTP: POST /v1/predict (one image), POST /v1/predict/batch, "
        'GET /v1/model, GET /health. Needs the serve extra: pip install "somad[serve]".',
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="model file written by `somad fit`, or folder written by `somad export` (scored without torch)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_range(0, 65535), default=8000, help="port (default 8000)")
    p.add_argument(
        "--workers",
        type=_int_range(1, 256),
        default=1,
        help="worker processes, each with its own copy of the model (default 1)",
    )
    p.add_argument(
        "--max-body-mb",
        type=_positive_float,
        default=20.0,
        metavar="MB",
        help="largest request body; larger ones get 413 (default 20)",
    )
    p.add_argument(
        "--max-queue",
        type=_int_range(1, 100000),
        default=32,
        metavar="N",
        help="requests that may wait for inference per worker; more get 503 (default 32)",
    )
    p.add_argument(
        "--max-megapixels",
        type=_positive_float,
        default=40.0,
        metavar="MP",
        help="largest image, in millions of pixels; larger ones get 413 before decoding (default 40)",
    )
    p.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=HEADER_TIMEOUT,
        metavar="S",
        help=f"close a connection whose request head is not complete after S seconds (default {HEADER_TIMEOUT:g})",
    )
    p.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=READ_TIMEOUT,
        metavar="S",
        help=f"408 when the next part of a request body takes more than S seconds (default {READ_TIMEOUT:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=BODY_TIMEOUT,
        metavar="S",
        help=f"408 when a whole request body takes more than S seconds (default {BODY_TIMEOUT:g})",
    )
    p.add_argument(
        "--api-key-file",
        metavar="KEY",
        default=None,
        help="require this file's key on every request but GET /health (header 'Authorization: Bearer KEY' or "
        "'X-API-Key: KEY'); make one with: openssl rand -hex 32 > KEY",
    )
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: as saved in the model")
    add_backend_arg(p)
    add_key_args(p, verify=True)
    p.set_defaults(func=run)


def exposure_warning(host: str, port: int, api_key: bool = False) -> str | None:
    """A warning when ``host`` is not a loopback address: without ``--api-key-file`` every machine that can reach
    the port can score images and read the model's description; with it, the key and the images still travel
    unencrypted (the service speaks plain HTTP)."""
    import ipaddress

    name = host.strip("[]")
    try:
        loopback = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if loopback:
        return None
    if api_key:
        return (
            f"warning: --host {host} listens beyond this machine over plain HTTP: the API key and the images travel "
            "unencrypted; serve on 127.0.0.1 behind a TLS proxy, or on a network you trust"
        )
    return (
        f"warning: --host {host} listens beyond this machine, without authentication: anyone who can reach port "
        f"{port} can use the model; pass --api-key-file, serve on 127.0.0.1 behind a proxy that authenticates, "
        "or firewall the port"
    )


def _int_range(lo: int, hi: int):
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not in [{lo}, {hi}]")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn
    except ImportError:
        raise SomadError(INSTALL_HINT) from None

    from somad.service.app import CONFIG_ENV, create_app
    from somad.service.guard import HEADER_TIMEOUT_ENV, GuardedH11Protocol, raise_open_file_limit, read_api_key

    warning = exposure_warning(args.host, args.port, api_key=args.api_key_file is not None)
    if warning:  # said first, before the model is loaded
        print(warning, file=sys.stderr)
    _, verify_key = keys(args, model=args.model)
    export = is_export(args.model)
    if not export:
        refuse_backend(args)
    api_key = None if args.api_key_file is None else read_api_key(args.api_key_file)
    raise_open_file_limit()
    GuardedH11Protocol.header_timeout = args.header_timeout
    os.environ[HEADER_TIMEOUT_ENV] = repr(args.header_timeout)  # for the worker processes of --workers N

    settings = {
        "max_body_bytes": int(args.max_body_mb * 1024 * 1024),
        "max_queue": args.max_queue,
        "max_pixels": int(args.max_megapixels * 1e6),
        "read_timeout": args.read_timeout,
        "body_timeout": args.body_timeout,
        "device": args.device,
        "backend": args.backend,
    }
    common = {
        "host": args.host,
        "port": args.port,
        "log_config": None,  # somad's logging (one line per request from somad.service), not uvicorn's
        "access_log": False,
        "timeout_graceful_shutdown": 60,  # SIGTERM: stop accepting, finish the requests in flight, exit
        "http": GuardedH11Protocol,
    }
    if args.workers == 1:
        # A bad or wrongly signed model file or export: one line, exit 2, before listening.
        if export:
            model = load_export(args, verify_key)
        else:
            from somad.methods import load

            model = load(args.model, device=args.device, verify_key=verify_key)
        app = create_app(args.model, model=model, api_key=api_key, **settings)
        config = uvicorn.Config(app, **common)
    else:
        # The whole file checked here, before the port opens (hash, every field, with a key its signature): a bad
        # file is one line and exit 2, not workers that fail and are respawned. Each worker loads it again.
        if export:
            from somad.runtime import describe_export

            describe_export(args.model, verify_key=verify_key)
        else:
            from somad.service.model_info import describe

            describe(args.model, verify=True, verify_key=verify_key)
        if verify_key is not None:
            settings["verify_key"] = os.path.abspath(args.verify_key)  # the key file's path, never the key
        if api_key is not None:
            settings["api_key"] = os.path.abspath(args.api_key_file)
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        level = logging.getLogger().getEffectiveLevel()
        os.environ[CONFIG_ENV] = json.dumps(
            {"model_path": args.model, "torch_threads": threads, "log_level": level, **settings}
        )
        config = uvicorn.Config(
            "somad.service.app:app_from_env",
            factory=True,
            workers=args.workers,
            timeout_worker_healthcheck=WORKER_START_TIMEOUT,
            **common,
        )
    # uvicorn handles SIGTERM and SIGINT while it runs (graceful shutdown) and raises the signal again once it
    # has finished: by then nothing is left to interrupt, so SIGTERM ends the command normally (exit 0).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server = uvicorn.Server(config)
    if args.workers == 1:
        server.run()
        if not server.started:
            raise SomadError(f"the service did not start on {args.host}:{args.port}; see the log above")
    else:
        from uvicorn.supervisors import Multiprocess

        sock = config.bind_socket()
        Multiprocess(config, sockets=[sock]).run()
    return 0
