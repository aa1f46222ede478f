"""Where a preflight's CPU time goes: a sampling profile of the live proxy under load, and micro-timings of its parts.

    python bench/profile_preflight.py              # 10 s of W1 under py-spy, plus micro-timings (10 and 100k origins)
    python bench/profile_preflight.py --seconds 3 --size 10000 --no-forward

1. Starts ``python -m corsproxy serve`` (pinned to CPU 1) and the bare aiohttp 204 handler, drives each with wrk (CPU 0)
   and samples it with py-spy (``pip install py-spy``), then attributes every sample to a layer — aiohttp's protocol
   and parser, its router/app, Response construction and writing, corsproxy's shell, decision core, the LMDB lookup, the
   event loop — both *self* (innermost frame) and *inclusive* (a key function anywhere on the stack). Shares are turned
   into microseconds per preflight with the process's own CPU-seconds per request from the same run.
   With ``--forward`` (the default) the same for a forwarded small GET (W3), against the minimal aiohttp forwarder.
2. Times the request-path pieces in-process with ``timeit`` (no sockets): ``CorsEngine.judge`` (allowed / refused),
   ``OriginStore.find``, origin parsing, ``preflight_headers``, building the ``web.Response``.

Raw py-spy output goes to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from loadgen import Request, ensure_wrk, run_wrk
from run import (
    ALLOWED,
    BENCH_DIR,
    PYTHON,
    REFUSED,
    Services,
    corsproxy_config,
    extract_ref,
    free_port,
    import_origins,
    preflight,
    serve_flags,
    store_origin,
)

#: Self-time layers, matched on the innermost frame's file (first match wins).
LAYERS = [
    ("LMDB lookup (corsproxy/store.py)", ("corsproxy/store.py",)),
    ("CORS decision core (corsproxy/core)", ("corsproxy/core/",)),
    ("corsproxy shell (http/ glue, header copying)", ("corsproxy/",)),
    ("aiohttp Response construction + header write", ("aiohttp/web_response.py", "aiohttp/http_writer.py",
                                                      "aiohttp/helpers.py", "multidict/")),
    ("aiohttp client (upstream request + response)", ("aiohttp/client", "aiohttp/connector.py")),
    ("yarl URL objects", ("yarl/",)),
    ("aiohttp app/router/middleware", ("aiohttp/web_app.py", "aiohttp/web_urldispatcher.py",
                                       "aiohttp/web_middlewares.py")),
    ("aiohttp protocol, parser, request object", ("aiohttp/web_protocol.py", "aiohttp/web_request.py",
                                                  "aiohttp/http_parser.py", "aiohttp/streams.py",
                                                  "aiohttp/base_protocol.py", "aiohttp/")),
    ("asyncio event loop + socket I/O", ("asyncio/", "selectors.py", "socket.py")),
]  # fmt: skip

#: Inclusive views: a sample counts when this function is anywhere on its stack.
INCLUSIVE = [
    ("aiohttp RequestHandler._handle_request (whole request)", "_handle_request", "web_protocol.py"),
    ("aiohttp Application._handle (app + router + handler)", "_handle", "web_app.py"),
    ("aiohttp router resolve", "resolve", "web_urldispatcher.py"),
    ("corsproxy handle (handler, all of it)", "handle", "corsproxy/http/app.py"),
    ("CorsEngine.judge (decision incl. store)", "judge", "corsproxy/core/decision.py"),
    ("OriginStore.find (LMDB)", "find", "corsproxy/store.py"),
    ("as_response (headers + web.Response)", "as_response", "corsproxy/http/app.py"),
    ("web.Response.__init__", "__init__", "aiohttp/web_response.py"),
    ("StreamResponse.prepare/_start (status line + header bytes)", "prepare", "aiohttp/web_response.py"),
    ("RequestHandler.finish_response (write + flush)", "finish_response", "web_protocol.py"),
    ("HttpRequestParser.feed_data via data_received", "data_received", "web_protocol.py"),
]


def parse_raw(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy ``--format raw``: one ``frame;frame;... count`` line per distinct stack, frames ``func (file:line)``."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for frame in stack.split(";"):
            func, _, where = frame.partition(" (")
            frames.append((func, where.rsplit(":", 1)[0]))
        stacks.append((frames, int(count)))
    return stacks


def attribute(stacks: list[tuple[list[tuple[str, str]], int]]) -> tuple[Counter[str], Counter[str], int]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        total += count
        layer = "other" if any(file for _f, file in frames) else "no Python frame (C code, system calls)"
        for _func, file in reversed(frames):
            hit = next((name for name, parts in LAYERS if any(p in file for p in parts)), None)
            if hit:
                layer = hit
                break
        self_time[layer] += count
        for label, func, file in INCLUSIVE:
            if any(f.rsplit(".", 1)[-1] == func and file in path for f, path in frames):
                inclusive[label] += count
    return self_time, inclusive, total


PREFLIGHT = Request("OPTIONS", "/api/items", preflight(ALLOWED), 0, 204)
FORWARDED_GET = Request("GET", "/small.json", {"Origin": ALLOWED})


def profile_live(
    name: str,
    services: Services,
    argv: list[str],
    port: int,
    seconds: float,
    out: Path,
    wrk: str,
    scripts: Path,
    request: Request = PREFLIGHT,
) -> str:
    what = "preflight" if request is PREFLIGHT else "forwarded GET"
    service = services.start(name, argv, port, 1, ready_timeout=300)
    run_wrk(wrk, f"http://127.0.0.1:{port}", request, duration=1, connections=32, script_dir=scripts,
            pin=services.taskset(0))  # warm-up  # fmt: skip
    raw = out / f"pyspy-{name}-{what.replace(' ', '-')}.txt"
    # --subprocesses: a pre-fork ``corsproxy serve`` answers in its worker, not in the arbiter started here
    record = ["record", "-p", str(service.pid), "--subprocesses", "-d", str(int(seconds)), "-r", "200"]
    options = ["--nonblocking", "--full-filenames", "-f", "raw", "-o", str(raw)]
    spy = subprocess.Popen(
        [*services.taskset(0), pyspy(), *record, *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    cpu0 = service.cpu_seconds()
    load = run_wrk(wrk, f"http://127.0.0.1:{port}", request, duration=seconds, connections=32, script_dir=scripts,
                   pin=services.taskset(0))  # fmt: skip
    cpu = service.cpu_seconds() - cpu0
    spy.wait(timeout=seconds + 60)
    us_per_request = cpu / load.requests * 1e6
    lines = [
        f"#### {name}, {what}: {load.requests / load.duration:,.0f}/s under py-spy (200 Hz, non-blocking), "
        f"{us_per_request:.1f} µs of its CPU per {what}",
    ]
    if not raw.exists():
        lines.append(f"(py-spy wrote nothing: {spy.stderr.read().decode()[-500:] if spy.stderr else ''})")
        return "\n".join(lines)
    self_time, inclusive, total = attribute(parse_raw(raw))
    lines += ["", "| layer (self time, innermost frame) | share | µs per request |", "|---|---|---|"]
    for layer, count in self_time.most_common():
        lines.append(f"| {layer} | {count / total:.0%} | {us_per_request * count / total:.1f} |")
    lines += ["", "| function on the stack (inclusive) | share | µs per request |", "|---|---|---|"]
    for label, _func, _file in INCLUSIVE:
        count = inclusive.get(label, 0)
        if count:
            lines.append(f"| {label} | {count / total:.0%} | {us_per_request * count / total:.1f} |")
    lines.append(f"\n({total} samples; raw stacks in {raw})")
    return "\n".join(lines)


def pyspy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        sys.exit("error: py-spy is not installed: `pip install py-spy` (into the same venv) and re-run")
    return found


def micro(config_path: Path, label: str) -> list[str]:
    """In-process timings of the request-path pieces; no sockets, the real config and the real LMDB store."""
    from aiohttp import web

    from corsproxy.config import load_config
    from corsproxy.core.answer import preflight_answer
    from corsproxy.core.decision import CorsRequest, preflight_headers
    from corsproxy.core.origin import lookup_keys, parse_request_origin
    from corsproxy.http.app import as_response
    from corsproxy.origins.writes import reconcile_config
    from corsproxy.store import OriginStore

    config = load_config(config_path)
    engine = config.engine
    store = OriginStore(config.store.path, map_size=config.store.map_size_mb << 20)
    reconcile_config(store, config.origins)
    n = len(store)
    origin = store_origin(n - 12) if n > 20 else ALLOWED  # near the end of the import order
    acrm, acrh = ("POST",), ("content-type",)
    now = time.time()
    # Built once, as the shell builds one per request; what is timed is the engine's judgement.
    allowed_request = CorsRequest("OPTIONS", (origin,), acrm, acrh, "/api/items")
    refused_request = CorsRequest("OPTIONS", (REFUSED,), acrm, acrh, "/api/items")
    allowed = engine.judge(allowed_request, store, now)
    assert allowed.allowed, allowed
    parsed = parse_request_origin(origin)
    assert parsed is not None
    keys = list(lookup_keys(parsed))
    refused = parse_request_origin(REFUSED)
    assert refused is not None
    refused_keys = list(lookup_keys(refused))

    cases: list[tuple[str, Callable[[], object]]] = [
        ("parse_request_origin", lambda: parse_request_origin(origin)),
        ("list(lookup_keys(origin))", lambda: list(lookup_keys(parsed))),
        ("OriginStore.find (hit on 1st key)", lambda: store.find(keys, now)),
        ("OriginStore.find (miss: all keys)", lambda: store.find(refused_keys, now)),
        ("CorsEngine.judge, allowed preflight", lambda: engine.judge(allowed_request, store, now)),
        ("CorsEngine.judge, refused preflight", lambda: engine.judge(refused_request, store, now)),
        ("preflight_headers (list of 7 pairs)", lambda: preflight_headers(engine, allowed)),
        ("as_response(preflight_answer)", lambda: as_response(preflight_answer(engine, allowed))),
        ("web.Response(status=204) alone", lambda: web.Response(status=204)),
        ("time.time()", time.time),
    ]  # fmt: skip
    lines = [
        f"#### micro-timings, {label} ({n:,} entries in the store)",
        "",
        "| operation | µs per call |",
        "|---|---|",
    ]
    for name, fn in cases:
        number = 20000
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6
        lines.append(f"| {name} | {best:.2f} |")
    store.close()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load under py-spy per target")
    parser.add_argument("--size", type=int, default=100_000, help="store size for the second set of micro-timings")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument(
        "--forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also profile the forwarded GET (W3) against the minimal aiohttp forwarder",
    )
    parser.add_argument("--ref", help="profile this git commit of corsproxy instead of the working tree")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wrk = ensure_wrk()
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="corsproxy-profile-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        (work / "lua").mkdir()
        lua = work / "lua"
        env = extract_ref(args.ref, work) if args.ref else None
        services = Services(work / "logs", pin=len(os.sched_getaffinity(0)) >= 2, env=env)
        servers = [PYTHON, str(BENCH_DIR / "servers.py")]
        try:
            upstream = free_port()
            services.start("upstream", [*servers, "upstream", "--port", str(upstream)], upstream, 0)
            config = work / "corsproxy.yaml"
            port = free_port()
            corsproxy_config(config, port, upstream, work / "store.lmdb")
            cors = [PYTHON, "-m", "corsproxy", "serve", "--config", str(config), *serve_flags(services.env)]
            runs = [
                ("corsproxy", cors, port, PREFLIGHT),
                ("bare204", [*servers, "bare204"], 0, PREFLIGHT),
                ("corsproxy", cors, port, FORWARDED_GET),
                ("forwarder", [*servers, "forwarder", "--upstream", f"http://127.0.0.1:{upstream}"], 0, FORWARDED_GET),
            ]
            for name, command, fixed_port, request in runs:
                if request is FORWARDED_GET and not args.forward:
                    continue
                port = fixed_port or free_port()
                argv = command if fixed_port else [*command, "--port", str(port)]
                sections.append(profile_live(name, services, argv, port, args.seconds, args.out, wrk, lua, request))
                services.stop(name)
        finally:
            services.stop_all()
        sections.append("\n".join(micro(config, "10 configured origins")))
        if args.size:
            big = work / "big.yaml"
            corsproxy_config(big, 1, 9, work / "big.lmdb")
            import_origins(big, args.size, work)
            sections.append("\n".join(micro(big, f"{args.size:,} imported origins")))
    text = "\n\n".join(sections)
    print(text)
    (args.out / f"profile-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
