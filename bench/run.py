"""The corsproxy benchmark: one command starts everything, measures, and prints ratios to baselines of the same run.

    python bench/run.py            # full: 3 repeats x 5 s per workload and target, stores of 10k/100k/1M origins
    python bench/run.py --quick    # CI smoke test: 1 x 1 s, a 10k store, no speed assertions

What runs (all on loopback, each a real process): a fast upstream (nginx serving static files when /usr/sbin/nginx
exists, else the aiohttp app in ``bench/servers.py``), ``python -m corsproxy serve`` with a generated config and store
in a temporary directory, the baselines (a bare aiohttp 204 handler, a minimal aiohttp forwarder, nginx), and ``wrk``.
With two or more cores the process under test is pinned to CPU 1 and wrk + the upstream to CPU 0 (``taskset``).

Per run the benchmark reads the measured process's CPU time (``/proc/PID/stat``) and memory
(``/proc/PID/smaps_rollup``, peak RSS reset through ``clear_refs``), so every figure is also given per CPU-second of
that process — the number that means something on a shared machine. Raw results go to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import nginx_conf
import procstat
from loadgen import Load, Request, ensure_wrk, run_wrk

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
MIB = 1 << 20

CONFIG_ORIGINS = [f"https://app{i}.bench.example.com" for i in range(10)]
ALLOWED = CONFIG_ORIGINS[-1]
REFUSED = "https://evil.attacker.test"
ALLOW_METHODS = ["GET", "POST", "PUT", "DELETE"]
UPLOAD_SIZE = 64 * MIB


def store_origin(index: int) -> str:
    return f"https://s{index:07d}.tenants.example.net"


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


# -- processes ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """One process the benchmark started. CPU is measured over it and its descendants (an nginx master and its worker,
    a pre-fork arbiter and its workers); memory on the largest of them (the worker)."""

    name: str
    port: int
    popen: subprocess.Popen[bytes]
    ready_after: float = 0.0  # seconds from start to its first HTTP answer

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in procstat.tree(self.pid):
            try:
                total += procstat.cpu_seconds(pid)
            except OSError:
                continue
        return total

    def main_pid(self) -> int:
        """The worker: of a pre-fork server's descendants the one holding the most memory, else the process itself.
        (A worker's RSS can be below its arbiter's: pages it inherited but never touched are not resident in it.)"""
        workers = procstat.tree(self.pid)[1:]
        best, best_rss = self.pid, -1
        for pid in workers:
            try:
                rss = procstat.memory(pid).rss
            except OSError:
                continue
            if rss > best_rss:
                best, best_rss = pid, rss
        return best


def answered(port: int) -> None:
    """One HTTP exchange (any status): a pre-fork server's arbiter accepts connections before its workers answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("OPTIONS", "/")
        conn.getresponse().read()
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from exc
    finally:
        conn.close()


class Services:
    """The processes of one benchmark run: started pinned, with their output in ``log_dir``, stopped together."""

    def __init__(self, log_dir: Path, pin: bool, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.pin = pin
        self.env = env  # PYTHONPATH for --ref
        self.started: list[Service] = []
        self.logs: list[BinaryIO] = []

    def taskset(self, cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu)] if self.pin else []

    def start(self, name: str, argv: Sequence[str], port: int, cpu: int, *, ready_timeout: float = 60.0) -> Service:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.logs.append(log)
        began = time.monotonic()
        popen = subprocess.Popen(
            [*self.taskset(cpu), *argv], stdout=log, stderr=subprocess.STDOUT, cwd=self.log_dir, env=self.env
        )
        service = Service(name, port, popen)
        self.started.append(service)
        deadline = began + ready_timeout
        while True:
            if popen.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {popen.returncode} before listening:\n{tail}")
            try:
                answered(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not listen on port {port} within {ready_timeout:.0f} s") from None
                time.sleep(0.05)
        service.ready_after = time.monotonic() - began
        return service

    def stop(self, name: str) -> None:
        for service in self.started:
            if service.name == name and service.popen.poll() is None:
                service.popen.send_signal(signal.SIGTERM)
                try:
                    service.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    service.popen.kill()
                    service.popen.wait(timeout=5)

    def stop_all(self) -> None:
        for service in reversed(self.started):
            if service.popen.poll() is None:
                service.popen.send_signal(signal.SIGTERM)
        for service in reversed(self.started):
            try:
                service.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.popen.kill()
                service.popen.wait(timeout=5)
        for log in self.logs:
            log.close()


# -- workloads ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    request: Request
    connections: int
    targets: tuple[str, ...]  # service names; the first is the subject
    per_request_mib: float = 0.0  # > 0: report MiB/s instead of requests/s
    expect: dict[str, int] = field(default_factory=dict)  # per-target expected status when it differs


def preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def workloads(sizes: Sequence[int], nginx: bool, extras: bool, upload: int = UPLOAD_SIZE) -> list[Workload]:
    ng = ("nginx",) if nginx else ()
    floors = ("bare204", *ng, *(("lowlevel204", "bare204-uvloop", "fastpreflight", "rawproto204") if extras else ()))
    forwarders = ("forwarder", *ng, "upstream")
    out = [
        Workload(
            "W1",
            "allowed preflight, 10 origins",
            Request("OPTIONS", "/api/items", preflight(ALLOWED), 0, 204),
            32,
            ("corsproxy", *floors),
        ),
    ]
    for n in sizes:
        out.append(
            Workload(
                f"W2-{size_label(n)}",
                f"allowed preflight, {n:,} origins in the store",
                Request("OPTIONS", "/api/items", preflight(store_origin(n - 2)), 0, 204),
                32,
                (f"corsproxy-{size_label(n)}",),
            )
        )
    get = {"Origin": ALLOWED}
    post = {"Origin": ALLOWED, "Content-Type": "application/octet-stream"}
    post_json = {"Origin": ALLOWED, "Content-Type": "application/json"}
    out += [
        Workload("W3", "GET small JSON, forwarded", Request("GET", "/small.json", get), 32, ("corsproxy", *forwarders)),
        Workload(
            "W3c",
            "GET small JSON, forwarded, 256 keep-alive connections",
            Request("GET", "/small.json", get),
            256,
            ("corsproxy", *ng),
        ),
        Workload(
            "W7",
            "POST 4 KiB JSON, forwarded",
            Request("POST", "/upload", post_json, 4096),
            32,
            ("corsproxy", "forwarder", *ng),
        ),
        # The default configuration logs one line per request at info: measured against the same proxy with the
        # per-request log off (logging.level warning), side by side.
        Workload(
            "W1log",
            "allowed preflight, default logging (info) vs log off",
            Request("OPTIONS", "/api/items", preflight(ALLOWED), 0, 204),
            32,
            ("corsproxy-log", "corsproxy"),
        ),
        Workload(
            "W3log",
            "GET small JSON, forwarded, default logging (info) vs log off",
            Request("GET", "/small.json", get),
            32,
            ("corsproxy-log", "corsproxy"),
        ),
        Workload("W4", "GET 1 MiB, streamed", Request("GET", "/1m.bin", get), 8, ("corsproxy", *forwarders), 1.0),
        Workload(
            "W5",
            "refused preflight",
            Request("OPTIONS", "/api/items", preflight(REFUSED), 0, 403),
            32,
            ("corsproxy", "bare204", *ng, *(("fastpreflight",) if extras else ())),
            expect={"bare204": 204},
        ),
        Workload(
            "W6",
            f"POST {upload // MIB} MiB, streamed",
            Request("POST", "/upload", post, upload),
            2,
            ("corsproxy", *forwarders),
            upload / MIB,
        ),
    ]
    return out


def check(port: int, workload: Workload, target: str) -> str:
    """One real request before measuring: the target must answer as the workload expects, or it is not measured."""
    request = workload.request
    expected = workload.expect.get(target, request.expect_status)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = b"x" * min(request.body_size, 1024)
        headers = dict(request.headers)
        if request.body_size:
            headers["Content-Length"] = str(len(body))
        conn.request(request.method, request.path, body=body or None, headers=headers)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    if response.status != expected:
        return f"status {response.status}, expected {expected}"
    if target.startswith(("corsproxy", "nginx", "fastpreflight")):
        allow_origin = response.getheader("Access-Control-Allow-Origin")
        if expected < 400 and allow_origin != request.headers["Origin"]:
            return f"Access-Control-Allow-Origin {allow_origin!r}"
        if expected >= 400 and allow_origin:
            return f"refusal carries Access-Control-Allow-Origin {allow_origin!r}"
    return ""


# -- measuring ------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    workload: str
    target: str
    repeat: int
    requests: int
    duration: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_s: float
    rss_kib: int
    rss_growth_kib: int  # peak RSS during the run minus RSS before it
    mib: float  # payload moved (uploads: request bodies; downloads: response bytes read by wrk)

    @property
    def rate(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    @property
    def per_cpu(self) -> float:
        return self.requests / self.cpu_s if self.cpu_s > 0 else 0.0


def measure(
    wrk: str,
    target: str,
    service: Service,
    workload: Workload,
    repeat: int,
    duration: float,
    script_dir: Path,
    pin: list[str],
) -> Sample:
    pid = service.main_pid()
    before = procstat.memory(pid)
    peak_reset = procstat.reset_peak_rss(pid)
    cpu0 = service.cpu_seconds()
    load: Load = run_wrk(
        wrk,
        f"http://127.0.0.1:{service.port}",
        workload.request,
        duration=duration,
        connections=workload.connections,
        script_dir=script_dir,
        pin=pin,
    )
    cpu = service.cpu_seconds() - cpu0
    after = procstat.memory(pid)
    peak = after.peak_rss if peak_reset else max(before.rss, after.rss)
    expected = workload.expect.get(target, workload.request.expect_status)
    errors = load.socket_errors + (0 if expected >= 400 else load.status_errors)
    body = workload.request.body_size
    mib = (load.requests * body if body else load.bytes_read) / MIB
    return Sample(
        workload.id,
        target,
        repeat,
        load.requests,
        load.duration,
        errors,
        load.p50_ms,
        load.p99_ms,
        cpu,
        after.rss,
        peak - before.rss,
        mib,
    )


@dataclass
class Row:
    """The median over repeats of one (workload, target)."""

    workload: str
    target: str
    rate: float  # requests/s
    mib_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float
    per_cpu: float  # requests per CPU-second
    mib_per_cpu: float
    rss_mib: float
    rss_growth_mib: float  # the largest growth seen in any repeat
    repeats: int


def aggregate(samples: list[Sample]) -> list[Row]:
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.workload, s.target), []).append(s)
    rows = []
    for (wid, target), group in groups.items():

        def med(get: Callable[[Sample], float], group: list[Sample] = group) -> float:
            return float(statistics.median(get(s) for s in group))

        rows.append(
            Row(
                wid,
                target,
                rate=med(lambda s: s.rate),
                mib_s=med(lambda s: s.mib / s.duration if s.duration else 0.0),
                p50_ms=med(lambda s: s.p50_ms),
                p99_ms=med(lambda s: s.p99_ms),
                errors=sum(s.errors for s in group),
                cpu_s=med(lambda s: s.cpu_s),
                per_cpu=med(lambda s: s.per_cpu),
                mib_per_cpu=med(lambda s: s.mib / s.cpu_s if s.cpu_s > 0 else 0.0),
                rss_mib=med(lambda s: s.rss_kib / 1024),
                rss_growth_mib=max(s.rss_growth_kib for s in group) / 1024,
                repeats=len(group),
            )
        )
    return rows


# -- reporting ------------------------------------------------------------------------------------------------------


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, text_columns: int = 2) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(lines)


def results_table(rows: list[Row], wl: dict[str, Workload], markdown: bool) -> str:
    headers = [
        "workload",
        "target",
        "req/s",
        "MiB/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "CPU-s",
        "req/CPU-s",
        "MiB/CPU-s",
        "RSS MiB",
        "RSS growth MiB",
    ]
    body = []
    for r in rows:
        bulk = wl[r.workload].per_request_mib > 0
        body.append(
            [
                r.workload,
                r.target,
                fmt(r.rate),
                fmt(r.mib_s) if bulk else "",
                fmt(r.p50_ms, 2),
                fmt(r.p99_ms, 2),
                str(r.errors),
                fmt(r.cpu_s, 2),
                fmt(r.per_cpu),
                fmt(r.mib_per_cpu) if bulk else "",
                fmt(r.rss_mib, 1),
                fmt(r.rss_growth_mib, 1),
            ]
        )
    return table(headers, body, markdown)


@dataclass(frozen=True)
class Ratio:
    workload: str
    subject: str
    baseline: str
    throughput: float  # subject / baseline, requests/s or MiB/s
    per_cpu: float  # subject / baseline, per CPU-second of each


def ratios(rows: list[Row], wl: dict[str, Workload]) -> list[Ratio]:
    by = {(r.workload, r.target): r for r in rows}
    out = []

    def add(wid: str, subject: Row, baseline: Row, label: str) -> None:
        bulk = wl[wid].per_request_mib > 0
        num, den = (subject.mib_s, baseline.mib_s) if bulk else (subject.rate, baseline.rate)
        cnum, cden = (subject.mib_per_cpu, baseline.mib_per_cpu) if bulk else (subject.per_cpu, baseline.per_cpu)
        out.append(Ratio(wid, subject.target, label, num / den if den else 0.0, cnum / cden if cden else 0.0))

    for w in wl.values():
        subject = by.get((w.id, w.targets[0]))
        if subject is None:
            continue
        for target in w.targets[1:]:
            if (w.id, target) in by:
                add(w.id, subject, by[(w.id, target)], target)
        if w.id.startswith("W2-"):
            for target in ("corsproxy", "bare204"):
                if ("W1", target) in by:
                    add(w.id, subject, by[("W1", target)], f"{target} (W1)")
    return out


def ratio_table(items: list[Ratio], markdown: bool) -> str:
    body = [[r.workload, r.subject, r.baseline, f"{r.throughput:.2f}x", f"{r.per_cpu:.2f}x"] for r in items]
    return table(["workload", "subject", "baseline", "throughput ratio", "per-CPU-second ratio"], body, markdown, 3)


@dataclass(frozen=True)
class Target:
    text: str
    measured: str
    met: bool | None  # None: not measured in this run


def targets(ratios_: list[Ratio], rows: list[Row], extra: dict[str, Any]) -> list[Target]:
    r = {(x.workload, x.baseline): x for x in ratios_}
    by = {(x.workload, x.target): x for x in rows}
    out: list[Target] = []

    def per_cpu(wid: str, baseline: str, text: str, bound: float) -> None:
        x = r.get((wid, baseline))
        if x is None:
            out.append(Target(text, "not measured", None))
        else:
            out.append(Target(text, f"{x.per_cpu:.2f}x (throughput {x.throughput:.2f}x)", x.per_cpu >= bound))

    for wid in ("W1", "W5"):
        per_cpu(wid, "bare204", f"{wid}: ≥ 1.0× the bare aiohttp 204 handler per CPU-second", 1.0)
        per_cpu(wid, "nginx", f"{wid} (aim): ≥ 0.5× nginx per CPU-second", 0.5)
    biggest = max((k for k in r if k[0].startswith("W2-") and k[1] == "corsproxy (W1)"), default=None, key=lambda k: k)
    if biggest:
        per_cpu(biggest[0], "corsproxy (W1)", f"{biggest[0]}: ≥ 0.95× the 10-origin rate per CPU-second", 0.95)
    per_cpu("W3", "forwarder", "W3: ≥ 1.0× the minimal aiohttp forwarder per CPU-second", 1.0)
    per_cpu("W3", "nginx", "W3: ≥ 0.33× nginx per CPU-second", 0.33)
    per_cpu("W3", "nginx", "W3 (aim): ≥ 0.5× nginx per CPU-second", 0.5)
    per_cpu("W3c", "nginx", "W3c (256 connections): ≥ 0.33× nginx per CPU-second", 0.33)
    per_cpu("W7", "nginx", "W7 (POST 4 KiB): ≥ 0.33× nginx per CPU-second", 0.33)
    for wid in ("W1log", "W3log"):
        per_cpu(wid, "corsproxy", f"{wid[:2]} with default logging: ≥ 0.8× log off per CPU-second", 0.8)
    for wid in ("W4", "W6"):
        per_cpu(wid, "nginx", f"{wid}: ≥ 0.8× nginx per CPU-second", 0.8)
        x = r.get((wid, "nginx"))
        if x is None:
            out.append(Target(f"{wid}: ≥ 0.9× nginx MiB/s", "not measured", None))
        else:
            out.append(
                Target(
                    f"{wid}: ≥ 0.9× nginx MiB/s",
                    f"{x.throughput:.2f}x (per CPU-s {x.per_cpu:.2f}x)",
                    x.throughput >= 0.9,
                )
            )
        row = by.get((wid, "corsproxy"))
        if row is not None:
            out.append(
                Target(
                    f"{wid}: proxy RSS grows < 16 MiB during the transfer",
                    f"{row.rss_growth_mib:.1f} MiB",
                    row.rss_growth_mib < 16,
                )
            )
    memory = extra.get("memory", {})
    if "ratio_anonymous" in memory:
        out.append(
            Target(
                "private memory with 1M origins ≤ 1.2× with 10 (anonymous, i.e. not file-backed)",
                f"{memory['ratio_anonymous']:.2f}x (Private_Clean+Dirty {memory['ratio_private']:.2f}x)",
                memory["ratio_anonymous"] <= 1.2,
            )
        )
    imports = extra.get("imports", {})
    if "1000000" in imports:
        seconds = imports["1000000"]
        out.append(Target("import of 1,000,000 origins with the CLI < 20 s", f"{seconds:.1f} s", seconds < 20))
    return out


def target_table(items: list[Target], markdown: bool) -> str:
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    return table(["target", "measured", "verdict"], [[t.text, t.measured, verdict[t.met]] for t in items], markdown, 3)


# -- setup ----------------------------------------------------------------------------------------------------------


def corsproxy_config(path: Path, port: int, upstream_port: int, store: Path, log_level: str = "warning") -> None:
    """The generated config, as JSON (a YAML subset, so ``yaml.safe_load`` reads it without a YAML writer here)."""
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}", "connect_timeout": 5, "read_timeout": 60},
        "store": {"path": str(store), "map_size_mb": 4096},
        "cors": {
            "allow_origins": CONFIG_ORIGINS,
            "allow_methods": ALLOW_METHODS,
            "allow_headers": ["content-type", "authorization", "x-api-key"],
            "expose_headers": ["x-request-id"],
            "allow_credentials": True,
            "max_age": 600,
        },
        # "warning" keeps the per-request log out of the measurement; --log-level info measures it too
        "logging": {"level": log_level},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")


def import_origins(config: Path, n: int, work: Path, env: dict[str, str] | None = None) -> float:
    """Write ``n`` origins, one per line, and import them with the real CLI; returns the wall-clock seconds."""
    origins = work / f"origins-{n}.txt"
    with origins.open("w") as out:
        out.writelines(store_origin(i) + "\n" for i in range(n))
    began = time.monotonic()
    done = subprocess.run(
        [PYTHON, "-m", "corsproxy", "origins", "import", "--config", str(config), str(origins)],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        check=False,
    )
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise RuntimeError(f"import of {n} origins failed ({done.returncode}): {done.stderr[-2000:]}")
    origins.unlink()
    return seconds


def versions(nginx: bool, ref: str | None, env: dict[str, str] | None) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "unavailable"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"

    import aiohttp
    import lmdb

    out = {
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "lmdb (py)": lmdb.__version__,
        "wrk": first_line(["wrk", "-v"]),
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
        "corsproxy": corsproxy_version(ref, env),
    }
    if nginx:
        out["nginx"] = first_line([nginx_conf.NGINX, "-v"])
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        out["uvloop"] = version("uvloop")
    return out


def corsproxy_version(ref: str | None, env: dict[str, str] | None) -> str:
    """Which corsproxy is measured: the commit, and the directory the subprocesses really import it from."""
    where = subprocess.run(
        [PYTHON, "-c", "import corsproxy, os; print(os.path.dirname(os.path.dirname(corsproxy.__file__)))"],
        capture_output=True, text=True, cwd="/", env=env, check=False,
    ).stdout.strip()  # fmt: skip
    git = ["git", "-C", str(REPO)]
    sha = subprocess.run([*git, "rev-parse", "--short", ref or "HEAD"], capture_output=True, text=True, check=False)
    if sha.returncode != 0:
        return f"imported from {where} (not a git checkout)"
    if ref:
        return f"{ref} ({sha.stdout.strip()}, extracted with git archive)"
    dirty = subprocess.run([*git, "status", "--porcelain", "corsproxy"], capture_output=True, text=True, check=False)
    changes = " + uncommitted changes" if dirty.stdout.strip() else ""
    return f"working tree at {sha.stdout.strip()}{changes}, imported from {where}"


def extract_ref(ref: str, work: Path) -> dict[str, str]:
    """``git archive REF corsproxy`` into the work directory; the environment that makes subprocesses import it."""
    src = work / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "corsproxy"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    return {**os.environ, "PYTHONPATH": str(src)}


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="corsproxy-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def serve_flags(env: dict[str, str] | None) -> list[str]:
    """``--workers 1`` when ``corsproxy serve`` has that option: the benchmark pins one process to one core."""
    done = subprocess.run(
        [PYTHON, "-m", "corsproxy", "serve", "--help"], capture_output=True, text=True, cwd="/", env=env, check=False
    )
    return ["--workers", "1"] if "--workers" in done.stdout else []


# -- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 1 repeat x 1 s, a 10k store, no extras")
    parser.add_argument("--repeats", type=int, help="repeats per workload and target (default: 3, quick: 1)")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default: 5, quick: 1)")
    parser.add_argument("--sizes", help="store sizes for W2, comma-separated (default: 10000,100000,1000000)")
    parser.add_argument("--only", help="workload ids to run, comma-separated prefixes (e.g. W1,W2)")
    parser.add_argument("--upstream", choices=["auto", "nginx", "aiohttp"], default="auto")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx baseline even if installed")
    parser.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="extra W1 floors: aiohttp low-level server, raw asyncio protocol, uvloop (default: full)",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="raw results directory")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="corsproxy's logging.level (info: every request is logged; default: %(default)s)",
    )
    parser.add_argument("--ref", help="benchmark this git commit/branch of corsproxy instead of the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, stores, logs)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    duration = args.duration or (1.0 if args.quick else 5.0)
    sizes = (
        [int(x) for x in args.sizes.split(",")]
        if args.sizes
        else ([10_000] if args.quick else [10_000, 100_000, 1_000_000])
    )
    extras = (not args.quick) if args.extras is None else args.extras
    have_nginx = Path(nginx_conf.NGINX).exists() and not args.no_nginx
    if args.upstream == "nginx" and not Path(nginx_conf.NGINX).exists():
        sys.exit("error: --upstream nginx, but /usr/sbin/nginx is not installed")
    nginx_upstream = args.upstream == "nginx" or (args.upstream == "auto" and Path(nginx_conf.NGINX).exists())
    wrk = ensure_wrk()
    cpus = len(os.sched_getaffinity(0))
    pin = cpus >= 2 and shutil.which("taskset") is not None
    if not pin:
        print(f"note: {cpus} CPU(s) or no taskset: processes are not pinned; CPU-second ratios still hold", flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    wl_list = workloads(sizes, have_nginx, extras, 16 * MIB if args.quick else UPLOAD_SIZE)
    if args.only:
        prefixes = tuple(args.only.split(","))
        wl_list = [w for w in wl_list if w.id.startswith(prefixes)]
    wl = {w.id: w for w in wl_list}
    needed = {t for w in wl_list for t in w.targets}
    extra: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "versions": {},  # filled in once the corsproxy to measure is in place
        "upstream": "nginx (static files; /upload proxied to the aiohttp sink)" if nginx_upstream else "aiohttp",
        "pinning": "proxy/baseline on CPU 1; wrk + upstream on CPU 0" if pin else "none",
        "corsproxy logging.level": args.log_level,
        "repeats": repeats,
        "duration_s": duration,
        "imports": {},
        "startup_s": {},
        "check_failures": [],
    }
    print(
        f"corsproxy benchmark: {repeats} repeat(s) x {duration:g} s, upstream {extra['upstream']}, "
        f"pinning: {extra['pinning']}",
        flush=True,
    )

    samples: list[Sample] = []
    with workdir(args.keep) as work:
        logs = work / "logs"
        logs.mkdir()
        scripts = work / "lua"
        scripts.mkdir()
        services = Services(logs, pin, extract_ref(args.ref, work) if args.ref else None)
        extra["versions"] = versions(have_nginx, args.ref, services.env)
        try:
            svc = start_services(services, work, sizes, needed, nginx_upstream, have_nginx, extra, args.log_level)
            memory_before = {
                name: asdict(procstat.memory(svc[name].main_pid())) for name in svc if name.startswith("cors")
            }
            checked: list[tuple[Workload, str, Service]] = []
            for w in wl_list:
                for target in w.targets:
                    # nginx answers preflights on one port and proxies on another
                    service = svc["nginx-proxy" if target == "nginx" and w.request.method != "OPTIONS" else target]
                    problem = check(service.port, w, target)
                    if problem:
                        print(f"  ! {w.id} {target}: {problem} — not measured", flush=True)
                        extra["check_failures"].append(f"{w.id} {target}: {problem}")
                    else:
                        checked.append((w, target, service))
            wrk_pin = services.taskset(0)
            if not args.quick:
                print("warming up (1 s each)", flush=True)
                for w, target, service in checked:
                    measure(wrk, target, service, w, -1, 1.0, scripts, wrk_pin)
            for repeat in range(repeats):
                for w, target, service in checked:
                    s = measure(wrk, target, service, w, repeat, duration, scripts, wrk_pin)
                    samples.append(s)
                    if w.per_request_mib:
                        unit, per_cpu = (
                            f"{s.mib / s.duration:,.0f} MiB/s",
                            f"{s.mib / max(s.cpu_s, 1e-9):,.0f} MiB/CPU-s",
                        )
                    else:
                        unit, per_cpu = f"{s.rate:,.0f} req/s", f"{s.per_cpu:,.0f} req/CPU-s"
                    print(
                        f"  [{repeat + 1}/{repeats}] {w.id:8} {target:16} {unit:>14}  "
                        f"{per_cpu:>18}  p99 {s.p99_ms:6.2f} ms  errors {s.errors}",
                        flush=True,
                    )
            memory_after = {
                name: asdict(procstat.memory(svc[name].main_pid())) for name in svc if name.startswith("cors")
            }
            extra["memory"] = memory_summary(memory_before, memory_after, sizes)
        finally:
            services.stop_all()

    rows = aggregate(samples)
    rs = ratios(rows, wl)
    ts = targets(rs, rows, extra)
    text = report(rows, rs, ts, wl, extra, markdown=False)
    print("\n" + text)
    (args.out / f"samples-{stamp}.json").write_text(
        json.dumps(
            {"meta": extra, "samples": [asdict(s) for s in samples], "rows": [asdict(r) for r in rows]}, indent=1
        )
    )
    (args.out / f"report-{stamp}.md").write_text(report(rows, rs, ts, wl, extra, markdown=True))
    print(f"\nraw samples and a markdown report: {args.out}/samples-{stamp}.json, report-{stamp}.md")
    # Exit status: did the benchmark work (every target answered correctly, wrk completed requests)? Never speed.
    failed = [s for s in samples if s.requests == 0 and not wl[s.workload].per_request_mib]
    for s in samples:
        if s.requests == 0:
            print(f"warning: {s.workload} {s.target} completed no request in {s.duration:.1f} s", file=sys.stderr)
    return 1 if failed or not samples or extra["check_failures"] else 0


def start_services(
    services: Services,
    work: Path,
    sizes: Sequence[int],
    needed: set[str],
    nginx_upstream: bool,
    have_nginx: bool,
    extra: dict[str, Any],
    log_level: str,
) -> dict[str, Service]:
    svc: dict[str, Service] = {}
    servers = [PYTHON, str(BENCH_DIR / "servers.py")]
    # The upstream, on CPU 0 with wrk.
    if nginx_upstream:
        docroot = work / "www"
        docroot.mkdir()
        sys.path.insert(0, str(BENCH_DIR))
        from servers import ONE_MIB, SMALL_JSON

        (docroot / "small.json").write_bytes(SMALL_JSON)
        (docroot / "1m.bin").write_bytes(ONE_MIB)
        sink = free_port()
        services.start("upstream-sink", [*servers, "upstream", "--port", str(sink)], sink, 0)
        prefix = work / "nginx-upstream"
        prefix.mkdir()
        port = free_port()
        (prefix / "nginx.conf").write_text(nginx_conf.upstream_conf(prefix, port, docroot, sink))
        argv = [nginx_conf.NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
        svc["upstream"] = services.start("upstream", argv, port, 0)
    else:
        port = free_port()
        svc["upstream"] = services.start("upstream", [*servers, "upstream", "--port", str(port)], port, 0)
    upstream_port = svc["upstream"].port

    # corsproxy: the 10-origin instance, then one per store size (imported with the real CLI first).
    flags = serve_flags(services.env)
    stores = [("corsproxy", 0), ("corsproxy-log", 0), *((f"corsproxy-{size_label(n)}", n) for n in sizes)]
    for name, n in stores:
        if name not in needed and name != "corsproxy":
            continue
        config = work / f"{name}.yaml"
        port = free_port()
        # corsproxy-log: the default logging level (every request logged), whatever --log-level says
        level = "info" if name == "corsproxy-log" else log_level
        corsproxy_config(config, port, upstream_port, work / f"{name}.lmdb", level)
        if n:
            print(f"importing {n:,} origins with `corsproxy origins import`", flush=True)
            seconds = import_origins(config, n, work, services.env)
            extra["imports"][str(n)] = seconds
            print(f"  imported {n:,} origins in {seconds:.1f} s", flush=True)
        argv = [PYTHON, "-m", "corsproxy", "serve", "--config", str(config), *flags]
        svc[name] = services.start(name, argv, port, 1, ready_timeout=300)
        extra["startup_s"][name] = svc[name].ready_after
        print(f"  {name} answering after {svc[name].ready_after:.1f} s", flush=True)

    # Baselines, on CPU 1 like corsproxy.
    simple = {
        "bare204": ["bare204"],
        "lowlevel204": ["lowlevel204"],
        "rawproto204": ["rawproto204"],
        "bare204-uvloop": ["bare204", "--uvloop"],
        "fastpreflight": ["fastpreflight", "--origins", ",".join(CONFIG_ORIGINS)],
        "forwarder": ["forwarder", "--upstream", f"http://127.0.0.1:{upstream_port}"],
    }
    for name, args in simple.items():
        if name in needed:
            port = free_port()
            svc[name] = services.start(name, [*servers, *args, "--port", str(port)], port, 1)
    if have_nginx and "nginx" in needed:
        prefix = work / "nginx-proxy"
        prefix.mkdir()
        preflight_port, proxy_port = free_port(), free_port()
        conf = nginx_conf.proxy_conf(
            prefix, preflight_port, proxy_port, upstream_port, CONFIG_ORIGINS, ", ".join(ALLOW_METHODS)
        )
        (prefix / "nginx.conf").write_text(conf)
        argv = [nginx_conf.NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
        nginx = services.start("nginx", argv, preflight_port, 1)
        svc["nginx"] = nginx
        svc["nginx-proxy"] = Service("nginx", proxy_port, nginx.popen)
    return svc


def memory_summary(before: dict[str, Any], after: dict[str, Any], sizes: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"before_load": before, "after_load": after}
    if not sizes:
        return out
    big = f"corsproxy-{size_label(max(sizes))}"
    if big in after and "corsproxy" in after:
        small, large = after["corsproxy"], after[big]
        out["compared"] = [big, "corsproxy"]
        out["ratio_anonymous"] = large["anonymous"] / small["anonymous"]
        out["ratio_private"] = (large["private_clean"] + large["private_dirty"]) / (
            small["private_clean"] + small["private_dirty"]
        )
        out["ratio_rss"] = large["rss"] / small["rss"]
    return out


def report(
    rows: list[Row],
    rs: list[Ratio],
    ts: list[Target],
    wl: dict[str, Workload],
    extra: dict[str, Any],
    *,
    markdown: bool,
) -> str:
    h = "### " if markdown else ""
    li = "- " if markdown else ""
    parts = [
        f"{h}Run",
        f"{li}date: {extra['date']}; command: `{extra['command']}`; "
        f"{extra['repeats']} repeat(s) x {extra['duration_s']:g} s; "
        f"medians over repeats; upstream: {extra['upstream']}; pinning: {extra['pinning']}; "
        f"corsproxy logging.level: {extra['corsproxy logging.level']}",
        f"{li}versions: " + ", ".join(f"{k} {v}" for k, v in extra["versions"].items()),
        "",
        f"{h}Results (medians; errors summed over repeats; RSS growth = peak during a run minus RSS before it, "
        "largest over repeats)",
        results_table(rows, wl, markdown),
        "",
        f"{h}Ratios (subject / baseline, same run; W4/W6 in MiB/s)",
        ratio_table(rs, markdown),
        "",
        f"{h}Issue 6 targets",
        target_table(ts, markdown),
        "",
        f"{h}Store",
    ]
    for n, seconds in extra["imports"].items():
        parts.append(f"- import of {int(n):,} origins (`corsproxy origins import`): {seconds:.1f} s")
    for name, seconds in extra["startup_s"].items():
        parts.append(f"- {name}: answering its first request {seconds:.1f} s after start")
    memory = extra.get("memory", {})
    for name, m in memory.get("after_load", {}).items():
        parts.append(
            f"- {name} memory after the load: RSS {m['rss'] / 1024:.1f} MiB, "
            f"anonymous {m['anonymous'] / 1024:.1f} MiB, "
            f"private (clean+dirty) {(m['private_clean'] + m['private_dirty']) / 1024:.1f} MiB"
        )
    if "ratio_anonymous" in memory:
        parts.append(
            f"- {memory['compared'][0]} / {memory['compared'][1]}: anonymous {memory['ratio_anonymous']:.2f}x, "
            f"private {memory['ratio_private']:.2f}x, RSS {memory['ratio_rss']:.2f}x"
        )
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
