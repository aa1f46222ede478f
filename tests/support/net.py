"""Ports, bounded waits, and clients that talk to a server on loopback: raw bytes (asyncio) and blocking HTTP.

Blocking clients on purpose where the server is another process: nothing then depends on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Response", "free_port", "raw_exchange", "request", "wait_until"]

T = TypeVar("T")


def free_port() -> int:
    """A loopback port nothing listens on right now (the kernel's choice, released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Call ``check`` until it returns something true, and return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Response:
    """A complete blocking HTTP response."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | str | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection (so that, across many calls, the kernel spreads them over the workers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        response = conn.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        conn.close()


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to ``127.0.0.1:port`` and read until the peer closes (or ``timeout``): the client side of a
    smuggling probe."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            chunks += chunk
        return bytes(chunks)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
