"""What the forwarding tests share: raw request bytes, a raw client, the Date-blind comparison, the proxy config on a
raw upstream, and counting which requests the fast paths took (their functions are wrapped, not replaced)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from corsproxy.http.forward import Exchange
from tests.support.config import BASE_CONFIG, merge

__all__ = ["ORIGIN", "config_on", "count_exchanges", "count_fast_answers", "normal", "raw", "request"]

ORIGIN = b"Origin: https://app.example.com\r\n"
_DATE = re.compile(rb"\r\nDate: [^\r]*")


def request(method: str, target: str, extra: bytes = b"", body: bytes = b"") -> bytes:
    """A request from the allowed origin: request line, ``Host``, ``Origin``, ``extra`` header lines, ``body``."""
    return f"{method} {target} HTTP/1.1\r\nHost: proxy.test\r\n".encode() + ORIGIN + extra + b"\r\n" + body


def normal(response: bytes) -> bytes:
    """``response`` with its ``Date`` values blanked: two answers a second apart compare equal."""
    return _DATE.sub(b"\r\nDate: -", response)


def config_on(tmp_path: Path, port: int, name: str, **override: Any) -> dict[str, Any]:
    """The base config forwarding to ``127.0.0.1:port``, with a store of its own (``name``) in ``tmp_path``."""
    data = merge(
        BASE_CONFIG,
        {"upstream": {"url": f"http://127.0.0.1:{port}"}, "store": {"path": str(tmp_path / f"db-{name}")}},
    )
    return merge(data, override)


async def raw(port: int, payload: bytes, *, quiet: float = 0.6) -> bytes:
    """Send raw bytes on one connection; read until the proxy closes it or nothing comes for ``quiet`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), quiet)
                if not chunk:
                    break
                out += chunk
        return out
    finally:
        writer.close()


def count_exchanges(runner: web.AppRunner, taken: list[Exchange]) -> None:
    """Append to ``taken`` every exchange the runner's forwarding fast path starts."""
    _record(runner, "_forward", taken)


def count_fast_answers(runner: web.AppRunner, answers: list[bytes]) -> None:
    """Append to ``answers`` every answer the runner's preflight fast path writes."""
    _record(runner, "_fast", answers)


def _record(runner: web.AppRunner, name: str, seen: list[Any]) -> None:
    """Wrap the runner's fast path ``name`` (read per connection): what it returns, unless ``None``, is kept."""
    server: Any = runner.server
    inner = getattr(server, name)
    assert inner is not None, f"the fast path {name} is off"

    def recording(*args: Any) -> Any:
        made = inner(*args)
        if made is not None:
            seen.append(made)
        return made

    setattr(server, name, recording)
