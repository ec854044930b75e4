"""What keeps the service up against clients that are slow, silent or not invited.

* :class:`GuardedH11Protocol`: uvicorn's HTTP/1.1 protocol with a deadline on the request head. uvicorn closes an
  idle keep-alive connection, but a connection that opens and never finishes its headers (slowloris) would hold
  its socket forever; here it is closed ``header_timeout`` seconds after its first byte was awaited.
* :func:`body_chunks`: a request body read under a per-chunk ``read_timeout`` and a whole-body ``body_timeout``
  (:class:`BodyTimeout`, answered 408 by the app), so that a client that declares a large body and then goes
  quiet gives its slot back.
* :class:`ApiKey`: ASGI middleware that answers 401 to any request but the open ones (:data:`OPEN_PATHS`: liveness,
  readiness and the API's description) without the key of
  ``--api-key-file`` (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, compared in constant time), before
  the request can take a slot or send a body.
* :func:`raise_open_file_limit`: the soft limit of open files raised to the hard one, so that idle sockets run
  out of time before the process runs out of descriptors.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

from somad.errors import SomadError
from somad.io.integrity import read_key

logger = logging.getLogger("somad.service")

#: Seconds: a request head must be complete this long after the server started waiting for it.
HEADER_TIMEOUT = 10.0
#: Seconds: the longest wait for the next chunk of a request body.
READ_TIMEOUT = 10.0
#: Seconds: the whole body of a request must arrive within this (20 MB at 350 kB/s).
BODY_TIMEOUT = 60.0
#: Environment variable through which ``somad serve --workers N`` passes the head deadline to each worker
#: (uvicorn builds the protocol itself, in each worker process).
HEADER_TIMEOUT_ENV = "SOMAD_SERVE_HEADER_TIMEOUT"


class BodyTimeout(Exception):
    """A request body that did not arrive in time (see :func:`body_chunks`)."""

    def __init__(self, seconds: float, what: str):
        super().__init__(f"{what} within {seconds:g} s")
        self.seconds, self.what = seconds, what


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete ``header_timeout`` seconds
    after the server began waiting for it (on connect, and again whenever a new request's bytes begin)."""

    header_timeout = float(os.environ.get(HEADER_TIMEOUT_ENV, HEADER_TIMEOUT))

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_head_timer", None) is None and self._between_requests():
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)
        super().data_received(data)
        if self._head_timer is not None and not self._between_requests():
            self._head_timer.cancel()  # the head is complete: the app's body deadlines take over
            self._head_timer = None

    def connection_lost(self, exc) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._between_requests() and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("closed %s: no complete request head within %g s", client, self.header_timeout)
            self.transport.close()


async def body_chunks(stream, read_timeout: float, body_timeout: float):
    """The chunks of the async iterator ``stream``; :class:`BodyTimeout` when the next chunk takes longer than
    ``read_timeout`` seconds or the whole takes longer than ``body_timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body_timeout
    chunks = stream.__aiter__()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise BodyTimeout(body_timeout, "the request body did not arrive whole")
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout=min(read_timeout, left))
        except StopAsyncIteration:
            return
        except TimeoutError:
            if read_timeout < left:
                raise BodyTimeout(read_timeout, "no part of the request body arrived") from None
            raise BodyTimeout(body_timeout, "the request body did not arrive whole") from None
        yield chunk


def read_api_key(path) -> bytes:
    """The API key in the file ``path`` (:func:`somad.io.integrity.read_key`'s rules), which clients send in an
    HTTP header: visible ASCII without spaces (``openssl rand -hex 32 > KEY`` makes one)."""
    key = read_key(path)
    if not all(0x21 <= b <= 0x7E for b in key):
        raise SomadError(
            f"{path}: an API key must be visible ASCII without spaces (it travels in an HTTP header); "
            "make one with: openssl rand -hex 32 > KEY"
        )
    return key


#: ``GET`` paths that need no API key: probes of a supervisor and the API's description (no model data).
OPEN_PATHS = ("/health", "/ready", "/docs", "/openapi.json")


class ApiKey:
    """ASGI middleware: 401 for any HTTP request but a ``GET`` of :data:`OPEN_PATHS` that does not carry ``key``."""

    def __init__(self, app, key: bytes) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or (scope.get("method") == "GET" and scope["path"] in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is not None and hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        reason = "wrong API key" if given is not None else "no API key"
        body = json.dumps(
            {"detail": f"{reason}: send the header 'Authorization: Bearer KEY' with the key of --api-key-file"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="somad"'),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def raise_open_file_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit (no-op where there is none)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return
        logger.debug("open-file limit raised from %d to %d", soft, hard)
