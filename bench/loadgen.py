"""The load generator: ``wrk`` driven by a generated Lua script whose ``done`` hook prints one JSON line.

Uploads use ``wrk.body`` (the 64 MiB body is built once in wrk's memory and sent on every request), so every workload
goes through the same tool and the same latency histogram.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Load", "Request", "ensure_wrk", "run_wrk"]

_MARK = "BENCH_JSON "

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%.0f,"p99_us":%.0f,"max_us":%.0f}\\n',
    "MARK", summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]
    body_size: int = 0  # bytes of "x"
    expect_status: int = 200


@dataclass(frozen=True, slots=True)
class Load:
    requests: int
    duration: float  # seconds
    bytes_read: int
    socket_errors: int
    status_errors: int  # responses >= 400
    p50_ms: float
    p99_ms: float


def _lua(request: Request) -> str:
    lines = [f'wrk.method = "{request.method}"', f'wrk.path = "{request.path}"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in request.headers.items()]
    if request.body_size:
        lines.append(f'wrk.body = string.rep("x", {request.body_size})')
    return "\n".join(lines) + "\n" + _DONE.replace("MARK", _MARK)


def ensure_wrk() -> str:
    """The path of ``wrk``; installed with apt-get when missing and allowed (root + apt), else a clear exit."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get (Debian package 'wrk')", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, env=env)
        found = shutil.which("wrk")
        if found:
            return found
    sys.exit("error: the benchmark needs wrk. Install it (Debian/Ubuntu: `sudo apt-get install wrk`) and re-run.")


def run_wrk(
    wrk: str,
    url: str,
    request: Request,
    *,
    duration: float,
    connections: int,
    script_dir: Path,
    pin: Sequence[str] = (),
    timeout: float = 30.0,
) -> Load:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{request.method}{request.path}{request.body_size}".lower())
    script = script_dir / f"{slug}.lua"
    script.write_text(_lua(request))
    command = [
        *pin,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={int(timeout)}s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + timeout + 30, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            return Load(
                requests=data["requests"],
                duration=data["duration_us"] / 1e6,
                bytes_read=data["bytes"],
                socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
                status_errors=data["status"],
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
            )
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
