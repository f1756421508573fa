"""Open-loop HTTP/1.1 load generator: constant arrival rate, latency from the scheduled send time.

Coordinated omission is what a closed-loop tester (one request per client, the next one only when
the previous answered) does to the tail: when the server stalls, the tester stops sending, and the
requests that *would* have been sent during the stall are never measured. Here the k-th request of
a step is due at `t0 + k / rate` whatever happened before; its latency is measured from that due
time, so time spent waiting for a free connection, in the generator's own backlog or in the
server's queue all counts. Latencies go into an HDR histogram (1 µs to 60 s, 3 significant digits).

Built for a small box shared with the servers: one process, uvloop, raw asyncio protocols over
keep-alive connections, request bytes encoded once before the step, responses parsed only as far
as the status line and the body length. On this 2-core box it sustains ~15k req/s on one core
against a trivial server (`python -m bench.loadgen --selftest`), well above what the systems under
test reach, and it reports its own lag (how late it was in sending) so a saturated generator is
visible instead of silently lowering the offered load.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from hdrh.histogram import HdrHistogram

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.I)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)
LATENCY_MAX_US = 60_000_000
LOOKAHEAD_S = 0.001


def encode_post(host: str, port: int, path: str, body: bytes) -> bytes:
    """One complete HTTP/1.1 POST, ready to write to a keep-alive connection."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class StepResult:
    offered_rps: float
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    achieved_rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    max_send_lag_ms: float = 0.0
    connections: int = 0
    aborted: bool = False
    sample_body: bytes = b""

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        return self.n_errors / self.sent if self.sent else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "offered_rps": round(self.offered_rps, 1),
            "achieved_rps": round(self.achieved_rps, 1),
            "duration_s": self.duration_s,
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(self.errors),
            "error_rate": round(self.error_rate, 6),
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
            "max_send_lag_ms": self.max_send_lag_ms,
            "connections": self.connections,
            "aborted": self.aborted,
        }


class _Run:
    """Shared state of one step: the histogram, the idle connections and the backlog."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.hist = HdrHistogram(1, LATENCY_MAX_US, 3)
        self.idle: deque[_Conn] = deque()
        self.backlog: deque[tuple[float, bytes]] = deque()
        self.conns: set[_Conn] = set()
        self.opening = 0
        self.ok = 0
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.last_done = 0.0
        self.sample_body = b""
        self.loop = asyncio.get_running_loop()
        self.now = time.perf_counter  # uvloop's loop.time() is cached per iteration, in ms

    def error(self, kind: str, scheduled: float | None) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.completed += 1
        if scheduled is not None:
            self._record(scheduled)

    def _record(self, scheduled: float) -> None:
        now = self.now()
        self.last_done = now
        us = int((now - scheduled) * 1e6)
        self.hist.record_value(min(max(us, 1), LATENCY_MAX_US))

    def done(self, scheduled: float, status: int, body: bytes) -> None:
        self.completed += 1
        self._record(scheduled)
        if 200 <= status < 300:
            self.ok += 1
        else:
            key = str(status)
            self.errors[key] = self.errors.get(key, 0) + 1
            if not self.sample_body:
                self.sample_body = body[:300]

    def submit(self, scheduled: float, request: bytes) -> None:
        if self.idle:
            self.idle.popleft().send(scheduled, request)  # round-robin over connections
            return
        self.backlog.append((scheduled, request))
        if len(self.conns) + self.opening < self.max_connections:
            self.opening += 1
            self.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError as exc:
            if self.backlog:
                scheduled, _ = self.backlog.popleft()
                self.error(f"connect:{type(exc).__name__}", scheduled)
        finally:
            self.opening -= 1

    def released(self, conn: _Conn) -> None:
        if self.backlog:
            scheduled, request = self.backlog.popleft()
            conn.send(scheduled, request)
        else:
            self.idle.append(conn)


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time (no pipelining)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.scheduled: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.run.conns.add(self)
        self.run.released(self)

    def send(self, scheduled: float, request: bytes) -> None:
        self.scheduled = scheduled
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[: end + 2])
        match = _CONTENT_LENGTH.search(head)
        if match is not None:
            total = end + 4 + int(match.group(1))
            if len(buf) < total:
                return
        elif _CHUNKED.search(head):
            if not buf.endswith(b"0\r\n\r\n"):
                return
            total = len(buf)
        else:
            total = end + 4
        status = int(head[9:12])
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        scheduled, self.scheduled = self.scheduled, None
        if scheduled is None:  # bytes nobody asked for: drop the connection
            self._drop()
            return
        self.run.done(scheduled, status, body)
        if _CLOSE.search(head):
            self._drop()
            return
        self.run.released(self)

    def _drop(self) -> None:
        self.run.conns.discard(self)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        run = self.run
        run.conns.discard(self)
        if self in run.idle:
            run.idle.remove(self)
        if self.scheduled is not None:
            run.error("connection_lost", self.scheduled)
            self.scheduled = None


async def _prewarm(run: _Run, n: int, spacing_s: float = 0.002) -> None:
    """Open `n` keep-alive connections one at a time, a little apart.

    Opened all at once, they land in one burst on the listening socket and the first server
    worker to wake up accepts every one of them: with keep-alive, that worker then serves the
    whole step while its siblings idle. Spaced out, each accept is a fresh race between workers,
    as with many independent clients or a load balancer's connection pool.
    """
    for _ in range(n):
        with contextlib.suppress(OSError):
            await run.loop.create_connection(lambda: _Conn(run), run.host, run.port)
        await asyncio.sleep(spacing_s)


def _ms(us: float) -> float:
    return round(us / 1000, 3)


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration: float,
    max_connections: int = 256,
    prewarm: int = 32,
    drain_timeout: float = 5.0,
    abort_backlog_s: float = 1.0,
) -> StepResult:
    """Offer `rate` req/s for `duration` s, cycling through the pre-encoded `requests`.

    Requests still unanswered `drain_timeout` s after the last due time count as timeouts (their
    latency is recorded as of that moment, a lower bound). A step whose generator-side backlog
    (every connection busy) exceeds `abort_backlog_s` seconds of arrivals is hopeless: it stops
    sending early (`aborted`), which keeps the server's queue, and the next step's wait, short.
    """
    run = _Run(host, port, max_connections)
    await _prewarm(run, min(prewarm, max_connections))
    interval = 1.0 / rate
    total = max(1, int(rate * duration))
    n_req = len(requests)
    now = run.now
    t0 = now() + 0.01
    sent = 0
    max_lag = 0.0
    aborted = False
    abort_at = max(rate * abort_backlog_s, 50)
    while sent < total:
        if len(run.backlog) > abort_at:
            aborted = True
            break
        t = now()
        due = t0 + sent * interval
        if due > t + LOOKAHEAD_S:
            # uvloop timers have 1 ms resolution (a shorter sleep is a busy spin): wake up a little
            # early instead and send what falls due within the look-ahead window.
            await asyncio.sleep(max(due - t - LOOKAHEAD_S, LOOKAHEAD_S))
            t = now()
        lag = t - due
        if lag > max_lag:
            max_lag = lag
        horizon = t + LOOKAHEAD_S
        while sent < total and (due := t0 + sent * interval) <= horizon:
            # Latency starts at the due time, or at the actual hand-over if that was early: a late
            # generator or a busy connection pool is charged to the measured latency, never hidden.
            run.submit(min(due, t), requests[sent % n_req])
            sent += 1
    deadline = (t0 + total * interval if not aborted else now()) + drain_timeout
    while run.completed < sent and now() < deadline:
        await asyncio.sleep(0.005)
    unanswered = sent - run.completed
    connections = len(run.conns)
    for conn in list(run.conns):
        if conn.scheduled is not None:
            run.error("timeout", conn.scheduled)
            conn.scheduled = None
        conn._drop()
    while run.backlog:
        scheduled, _ = run.backlog.popleft()
        run.error("timeout", scheduled)
    end = now()
    window = max(run.last_done, t0 + total * interval) - t0
    h = run.hist
    result = StepResult(
        offered_rps=rate,
        duration_s=duration,
        sent=sent,
        ok=run.ok,
        errors=run.errors,
        achieved_rps=run.ok / window if window > 0 else 0.0,
        p50_ms=_ms(h.get_value_at_percentile(50)),
        p90_ms=_ms(h.get_value_at_percentile(90)),
        p99_ms=_ms(h.get_value_at_percentile(99)),
        p999_ms=_ms(h.get_value_at_percentile(99.9)),
        max_ms=_ms(h.get_max_value()),
        mean_ms=_ms(h.get_mean_value()),
        max_send_lag_ms=round(max_lag * 1000, 3),
        connections=connections,
        aborted=aborted,
        sample_body=run.sample_body,
    )
    del unanswered, end
    await asyncio.sleep(0.05)  # let closed transports finish
    return result


def run_step(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration: float,
    max_connections: int = 256,
) -> StepResult:
    """Synchronous wrapper: one fresh uvloop event loop per step.

    The harness's own objects (histograms, results, bodies) are frozen out of the garbage
    collector for the step: a full collection in the generator delays sends, and an open-loop
    generator charges that delay to the server as latency."""
    import uvloop

    gc.collect()
    gc.freeze()
    try:
        return uvloop.run(open_loop(host, port, requests, rate, duration, max_connections))
    finally:
        gc.unfreeze()


# --- self-test: the generator's own ceiling against a trivial server ---------------------------


class _Echo(asyncio.Protocol):
    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            match = _CONTENT_LENGTH.search(bytes(self.buf[: end + 2]))
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(self.buf) < total:
                return
            del self.buf[:total]
            self.transport.write(self.RESPONSE)


def _serve_trivial(port: int) -> None:
    import os

    import uvloop

    os.sched_setaffinity(0, {1})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Echo, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def selftest(rates: Sequence[float] = (5000, 10000, 15000, 20000), duration: float = 3.0) -> None:
    import multiprocessing
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = multiprocessing.Process(target=_serve_trivial, args=(port,), daemon=True)
    server.start()
    os.sched_setaffinity(0, {0})
    time.sleep(0.5)
    request = encode_post("127.0.0.1", port, "/", b'{"x": 1}')
    try:
        for rate in rates:
            cpu0 = time.process_time()
            r = run_step("127.0.0.1", port, [request], rate, duration)
            cpu = time.process_time() - cpu0
            print(
                f"offered {rate:>7.0f}  achieved {r.achieved_rps:>8.0f}  p50 {r.p50_ms:>7.3f} ms"
                f"  p99 {r.p99_ms:>8.3f} ms  errors {r.n_errors}  lag {r.max_send_lag_ms} ms"
                f"  generator CPU {cpu / max(r.sent, 1) * 1e6:.1f} µs/req"
            )
    finally:
        server.terminate()


if __name__ == "__main__":
    import sys

    if "--selftest" in sys.argv:
        selftest()
    else:
        print(__doc__)
