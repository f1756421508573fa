"""A deadline on receiving a request's headers (slowloris), inside uvicorn's HTTP protocol.

Why here: no ASGI middleware sees a request before its headers are complete, and uvicorn has no
header timeout of its own (its keep-alive timer runs only after a response). A client that
connects and sends nothing, or sends a request line and headers a byte at a time, holds a
connection (and a file descriptor) of the worker for as long as it likes; a few thousand such
clients exhaust the worker.

The hook: BentoML builds the worker's `uvicorn.Config` itself (`_bentoml_impl/worker/service.py`)
with the default `http="auto"`, *after* importing the service module, and uvicorn resolves that
name through its `uvicorn.config.HTTP_PROTOCOLS` table (name -> import string) when the server
starts (`Config.load`). `install()`, called from `service.py`, points the table's entries at
subclasses of uvicorn's own protocols ("auto" is httptools: Tiffin depends on it). The
subclasses only add a timestamp: set when a request's first byte (or the connection) arrives,
cleared when its headers are complete. One sweep per server (`HeaderDeadlines`, like
`tiffin.limits.BodyWatchdog`) closes the connections whose timestamp is older than the deadline:
a 408 when part of a request arrived, a plain close when nothing did. A timer per request
(`loop.call_later` + `cancel`) costs ~4 us in isolation, 15-20 us measured in context on this
box; the two overridden parser callbacks cost ~0.8 us per request.

Nothing else of uvicorn is touched: parsing, keep-alive, pipelining and shutdown are the parent
classes' own. A uvicorn upgrade that renames the table or the parent classes fails loudly when
service.py imports this module; one that changes the parser callbacks is caught by
tests/test_header_timeout.py (both protocols, in a real uvicorn server).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tiffin.limits import LimitsSettings

log = logging.getLogger("tiffin.limits")

# Answered to a client whose request headers did not arrive in time, then the connection closes.
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"%s"
)
_LOG_EVERY_S = 60.0


class HeaderDeadlines:
    """The header deadline of every connection of one uvicorn server (one worker).

    Found through the server's `ServerState` (the one object uvicorn hands every protocol
    instance of a server): created by the first connection, it wakes every `period` seconds while
    connections exist, so a deadline fires up to `period` late.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        # uvicorn builds protocols with fixed arguments, so the settings are read here, once
        # per server, from the same environment service.py's `install` read them from
        self.timeout_s = LimitsSettings().header_timeout_s
        self.period = min(1.0, max(0.05, self.timeout_s / 4))
        self.loop = loop
        self.connections = connections
        self.closed = 0  # connections closed since the last log line
        self._logged_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, protocol: Any) -> HeaderDeadlines:
        state = protocol.server_state
        deadlines: HeaderDeadlines | None = getattr(state, "tiffin_header_deadlines", None)
        if deadlines is None:
            deadlines = cls(protocol.loop, state.connections)
            state.tiffin_header_deadlines = deadlines
        return deadlines

    def watch(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.period, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        overdue = self.loop.time() - self.timeout_s
        for connection in list(self.connections):
            since = getattr(connection, "head_since", None)
            if since is not None and since <= overdue:
                connection.head_timed_out(self.timeout_s)
                self.closed += 1
        if self.closed and time.monotonic() - self._logged_at >= _LOG_EVERY_S:
            # one line a minute at most: a slowloris attack must not flood the log either
            log.info(
                "closed %d connection(s) whose request headers took longer than %g s",
                self.closed,
                self.timeout_s,
            )
            self.closed, self._logged_at = 0, time.monotonic()
        if self.connections:
            self.watch()


def _close(protocol: Any, answer: bool, timeout_s: float) -> None:
    protocol.head_since = None
    transport = protocol.transport
    if transport is None or transport.is_closing():
        return
    if answer:
        body = b'{"error": "headers: not received within %g s"}' % timeout_s
        transport.write(_REQUEST_TIMEOUT % (len(body), body))
    transport.close()


class _HeaderDeadline:
    """What both protocols add: since when the current request head (or, on a new connection,
    the first one) has been awaited, and whether any of its bytes came. `HeaderDeadlines` reads
    `head_since` and calls `head_timed_out`; each protocol sets and clears the two from its own
    parser's events."""

    head_since: float | None = None
    head_begun = False
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]  # the protocol's, after us
        self.head_since = self.loop.time()
        HeaderDeadlines.of(self).watch()

    def head_timed_out(self, timeout_s: float) -> None:
        _close(self, self.head_begun, timeout_s)


class H11WithHeaderDeadline(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with a header deadline. Headers are complete once h11 leaves its
    IDLE state for the peer (it has parsed a whole request head)."""

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and not self.head_begun:
            self.head_since, self.head_begun = self.loop.time(), True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self.head_since, self.head_begun = None, False


class HttpToolsWithHeaderDeadline(_HeaderDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol (what "auto" picks: Tiffin depends on httptools) with a
    header deadline, from the parser's own callbacks: `on_message_begin` (a request's first
    byte) and `on_headers_complete`."""

    def on_message_begin(self) -> None:
        self.head_since, self.head_begun = self.loop.time(), True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.head_since, self.head_begun = None, False
        super().on_headers_complete()


def install(settings: LimitsSettings) -> bool:
    """Make uvicorn's HTTP protocols the ones with a header deadline, by name: "auto" (what
    BentoML's worker uses), "httptools" and "h11". Call before the server starts (service.py
    does, at import). False (nothing changed) when `header_timeout_s` is 0."""
    from uvicorn.config import HTTP_PROTOCOLS

    if settings.header_timeout_s <= 0:
        return False
    httptools = f"{__name__}:{HttpToolsWithHeaderDeadline.__name__}"
    HTTP_PROTOCOLS.update(
        auto=httptools, httptools=httptools, h11=f"{__name__}:{H11WithHeaderDeadline.__name__}"
    )
    return True
