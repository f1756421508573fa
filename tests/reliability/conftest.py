"""The fault and abuse suite's shared parts: a TCP proxy that can delay or cut a connection (put
between Tiffin and a real redis-server), a raw-socket HTTP client for half-sent requests, and
helpers to read a server's log. Every server here is a real `bentoml serve` (tests.conftest)."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import RedisServer, free_port, seeded

_addresses = itertools.count(1)


def client_id() -> dict[str, str]:
    """A fresh client identity (the suite's servers trust X-Forwarded-For), so the per-client
    rate limit only ever bites the test that is about it."""
    n = next(_addresses)
    return {"X-Forwarded-For": f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"}


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `delay_s` holds every chunk from the target back
    that long, `cut()` drops every open connection, `refuse` closes new ones at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay_s = 0.0
        self.refuse = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if delayed and self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()


@pytest.fixture(scope="package")
def redis_behind_proxy(model_store: str) -> Iterator[tuple[RedisServer, TcpProxy]]:
    """A real redis-server seeded with the feature snapshot, reached through a TcpProxy."""

    server = RedisServer().start()
    seeded(server, 2000)
    proxy = TcpProxy(server.port)
    yield server, proxy
    proxy.close()
    server.stop()


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """Sends `head` + `body` on a fresh socket and returns everything read until close/timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
