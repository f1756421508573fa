"""The header deadline (tiffin/header_timeout.py) in a real uvicorn server on a loopback socket,
for both of uvicorn's HTTP/1.1 protocols, with raw-socket clients. Nothing is mocked; the
end-to-end case against `bentoml serve` is in tests/reliability/test_abuse.py."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from uvicorn.config import HTTP_PROTOCOLS

from tests.conftest import UvicornServer
from tiffin import header_timeout
from tiffin.limits import LimitsSettings

TIMEOUT_S = 1.0
# A deadline is enforced by a sweep every min(1 s, timeout / 4): up to that late, plus slack for
# a busy box.
LATE_S = TIMEOUT_S / 4 + 1.0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 after `?sleep=` seconds (default none), having read the whole body."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    query = scope["query_string"].decode()
    if query.startswith("sleep="):
        await asyncio.sleep(float(query[6:]))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(
    params=[header_timeout.HttpToolsWithHeaderDeadline, header_timeout.H11WithHeaderDeadline],
    ids=["httptools", "h11"],
)
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("TIFFIN_LIMITS_HEADER_TIMEOUT_S", str(TIMEOUT_S))
    with UvicornServer(app, http=request.param, timeout_keep_alive=5) as served:
        yield served.port


def read_until_closed(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_trickled_headers_get_a_408_within_the_deadline(server: int) -> None:
    """Pass: a client sending a request head one byte every 0.1 s (never finishing within the
    deadline) gets a 408 and a closed connection within deadline + one sweep + 1 s."""
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + b"X" * 400
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        started = time.monotonic()
        for byte in head:
            # stop sending once the server has answered or closed: writing to a closed
            # connection draws a reset, which can discard the answer before it is read
            if select.select([s], [], [], 0)[0] or time.monotonic() - started > 5:
                break
            s.sendall(bytes([byte]))
            time.sleep(0.1)
        answer = read_until_closed(s)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"headers: not received within 1 s" in answer
    assert TIMEOUT_S - 0.05 <= took <= TIMEOUT_S + LATE_S, took


def test_a_silent_connection_is_closed_without_an_answer(server: int) -> None:
    """Pass: a connection that sends nothing is closed, with no bytes written, within the
    deadline + one sweep + 1 s."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        started = time.monotonic()
        answer = read_until_closed(s)
        took = time.monotonic() - started
    assert answer == b""
    assert TIMEOUT_S - 0.05 <= took <= TIMEOUT_S + LATE_S, took


def test_ordinary_and_keep_alive_requests_are_untouched(server: int) -> None:
    """Pass: on one keep-alive connection, requests spaced wider than the deadline (idle time
    after a response belongs to the keep-alive timeout), a request the application takes longer
    than the deadline to answer, and a pipelined pair all get 200; so do 20 fresh connections."""
    with httpx.Client(base_url=f"http://127.0.0.1:{server}", timeout=10) as client:
        for _ in range(3):
            assert client.post("/", content=b"{}").status_code == 200
            time.sleep(TIMEOUT_S * 1.5)
        assert client.get("/?sleep=1.5").status_code == 200
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = b""
        while answers.count(b"HTTP/1.1 200 ") < 2 and (chunk := s.recv(65536)):
            answers += chunk
        assert answers.count(b"HTTP/1.1 200 ") == 2, answers
    for _ in range(20):
        assert httpx.get(f"http://127.0.0.1:{server}/").status_code == 200


def test_install_switches_uvicorns_protocols_and_zero_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pass: `install` points "auto" (BentoML's choice), "httptools" and "h11" at the protocols
    with a deadline; with `header_timeout_s` 0 it changes nothing."""
    for name in ("auto", "httptools", "h11"):
        monkeypatch.setitem(HTTP_PROTOCOLS, name, HTTP_PROTOCOLS[name])  # restored afterwards
    before = dict(HTTP_PROTOCOLS)
    assert header_timeout.install(LimitsSettings(header_timeout_s=0)) is False
    assert before == HTTP_PROTOCOLS
    assert header_timeout.install(LimitsSettings(header_timeout_s=3)) is True
    assert HTTP_PROTOCOLS["auto"] == "tiffin.header_timeout:HttpToolsWithHeaderDeadline"
    assert HTTP_PROTOCOLS["h11"] == "tiffin.header_timeout:H11WithHeaderDeadline"
