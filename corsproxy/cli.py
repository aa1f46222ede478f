"""The ``corsproxy`` command: serve, check, explain, demo and origin-store management.

Owns argument parsing, exit codes and what the operator reads on the terminal. Exit codes: 0 success; 1 a check or
explain that says no, or an import with refused lines; 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from corsproxy.config import Config, ConfigError, load_config
from corsproxy.origin_lines import format_line, parse_entry, parse_lines
from corsproxy.store import (
    OriginRecord,
    OriginStore,
    StoreError,
    StoreSpaceError,
    check_location,
    reconcile_config,
)

__all__ = ["main"]

log = logging.getLogger("corsproxy")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config


def _open_store(config: Config) -> OriginStore:
    """The store, reconciled with ``cors.allow_origins`` as the server would on start (a no-op when in sync)."""
    store = OriginStore(
        config.store.path, map_size=config.store.map_size_mb << 20, audit_retention=config.store.audit_retention
    )
    try:
        reconcile_config(store, config.origins)
    except StoreSpaceError as exc:
        # This command may be the one that frees space (remove, prune): go on; the config's removals were applied.
        print(f"warning: cors.allow_origins not applied to the store: {exc}", file=sys.stderr)
    except BaseException:
        store.close()
        raise
    return store


# -- commands -----------------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    # What serving would trip over, found without serving: the store's directory, the disk under it, the store.
    map_size = config.store.map_size_mb << 20
    errors, warnings = check_location(config.store.path, map_size)
    if errors:
        raise ConfigError(errors, config.source)
    if Path(config.store.path, "data.mdb").exists():
        try:
            with OriginStore(config.store.path, map_size=map_size, readonly=True) as store:
                warnings.extend(f"store.map_size_mb: {problem}" for problem in store.usage().problems())
        except StoreError as exc:
            raise ConfigError([f"store.path: {exc}"], config.source) from None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if Path(config.store.path, "data.mdb").exists():
        # Entries added through the CLI, the admin API or the origins file were checked against the policies of
        # their day; the engine re-checks every match against today's, and this lists the ones it now refuses.
        from corsproxy.config import check_origin_entry
        from corsproxy.origin import EntryError, parse_origin_entry

        refused: list[str] = []
        with OriginStore(config.store.path, readonly=True) as store:
            for key, record in store.iter_all():
                if record.source == "config":
                    continue
                flags = config.safety.get(record.policy)
                if flags is None:
                    refused.append(f"{key} names policy {record.policy!r}, which this config does not define")
                    continue
                try:
                    errors, _ = check_origin_entry(parse_origin_entry(key), flags)
                except EntryError as exc:
                    errors = [str(exc)]
                refused.extend(f"{key} (source {record.source}): {error}" for error in errors)
        for line in refused[:20]:
            print(f"warning: store entry refused at request time: {line}", file=sys.stderr)
        if len(refused) > 20:
            print(f"warning: ... and {len(refused) - 20} more such entries", file=sys.stderr)
    print(
        f"{config.source}: OK — {len(config.origins)} configured origin(s), "
        f"{len(config.engine.policies)} polic{'y' if len(config.engine.policies) == 1 else 'ies'}, "
        f"{len(config.engine.routes)} route(s), upstream {config.upstream.url}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from corsproxy.server import default_workers, serve

    config = _load(args)
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    return serve(config, workers)


def cmd_demo(args: argparse.Namespace) -> int:
    from corsproxy.server import run_demo

    path = Path(args.config)
    if not path.is_file():
        print(
            f"error: {path} not found — run `corsproxy demo` from the corsproxy checkout, or pass --config FILE",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="corsproxy-demo-") as tmp:
        env = {**os.environ, "CORSPROXY_UPSTREAM": "http://127.0.0.1:1"}  # replaced by the demo upstream
        config = load_config(path, env=env)
        config = replace(
            config,
            listen=replace(config.listen, host="127.0.0.1", port=args.port or config.listen.port),
            store=replace(config.store, path=str(Path(tmp) / "origins.lmdb")),
        )
        asyncio.run(run_demo(config))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from corsproxy.explain import explain

    config = _load(args)
    with _open_store(config) as store:
        result = explain(config, store, args.origin, args.method, args.headers or "", args.path)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(result.text())
    return 0 if result.allowed else 1


def cmd_origins_add(args: argparse.Namespace) -> int:
    config = _load(args)
    try:
        entry, warnings = parse_entry(
            args.origin, config.safety, policy=args.policy, expires=args.expires, ttl=args.ttl, note=args.note or ""
        )
    except ValueError as exc:
        print(f"error: {args.origin!r} refused: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    with _open_store(config) as store:
        record = OriginRecord(entry.policy, entry.expires, "cli", 0.0, entry.note)
        created = store.put(entry.key, record, _actor())
    print(f"{'added' if created else 'replaced'} {entry.key} (policy {entry.policy})")
    return 0


def cmd_origins_remove(args: argparse.Namespace) -> int:
    from corsproxy.origin import EntryError, parse_origin_entry

    config = _load(args)
    try:
        key = parse_origin_entry(args.origin).key
    except EntryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with _open_store(config) as store:
        old = store.remove(key, _actor())
    if old is None:
        print(f"error: {key} is not in the store (see `corsproxy origins list`)", file=sys.stderr)
        return 1
    if old.source == "config":
        print(f"warning: {key} is listed in {config.source}; it comes back on the next start", file=sys.stderr)
    print(f"removed {key}")
    return 0


def cmd_origins_list(args: argparse.Namespace) -> int:
    config = _load(args)
    now = time.time()
    with _open_store(config) as store:
        for key, record in store.items(contains=args.filter or ""):
            state = " (expired)" if record.is_expired(now) else ""
            expires = (
                time.strftime(" expires %Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires)) if record.expires else ""
            )
            note = f" — {record.note}" if record.note else ""
            print(f"{key}\tpolicy={record.policy}\tsource={record.source}{expires}{state}{note}")
    return 0


def cmd_origins_import(args: argparse.Namespace) -> int:
    config = _load(args)
    stream: TextIO = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    with stream:
        parsed = parse_lines(stream, config.safety)
    for number, reason in parsed.errors:
        print(f"{args.file}:{number}: refused: {reason}", file=sys.stderr)
    for number, warning in parsed.warnings:
        print(f"{args.file}:{number}: warning: {warning}", file=sys.stderr)
    with _open_store(config) as store:
        added, replaced = store.put_many(
            ((key, OriginRecord(e.policy, e.expires, "cli", 0.0, e.note)) for key, e in parsed.entries.items()),
            _actor(),
        )
    print(f"imported {added + replaced} origin(s) ({added} new, {replaced} replaced), refused {len(parsed.errors)}")
    return 1 if parsed.errors else 0


def cmd_origins_export(args: argparse.Namespace) -> int:
    config = _load(args)
    out: TextIO = sys.stdout if args.file == "-" else open(args.file, "w", encoding="utf-8")  # noqa: SIM115
    with _open_store(config) as store, out:
        for key, record in store.iter_all():
            out.write(format_line(key, record.policy, record.expires, record.note) + "\n")
    return 0


def cmd_origins_history(args: argparse.Namespace) -> int:
    config = _load(args)
    with _open_store(config) as store:
        for event in store.history(origin=args.origin, limit=args.limit):
            print(json.dumps(event.as_json(), separators=(",", ":")))
    return 0


def cmd_origins_prune(args: argparse.Namespace) -> int:
    config = _load(args)
    with _open_store(config) as store:
        removed = store.prune_expired(time.time(), _actor())
    for key in removed:
        print(f"removed expired {key}")
    print(f"pruned {len(removed)} expired origin(s)")
    return 0


def cmd_store_compact(args: argparse.Namespace) -> int:
    from corsproxy.store import compact

    config = _load(args)
    before, after = compact(config.store.path)
    print(f"compacted {config.store.path}: {before / (1 << 20):.1f} MiB -> {after / (1 << 20):.1f} MiB")
    return 0


def cmd_origins_import_regex(args: argparse.Namespace) -> int:
    from corsproxy.regex_import import RegexImportError, compare_samples, convert_regex

    config = _load(args)
    try:
        conversion = convert_regex(args.regex)
    except RegexImportError as exc:
        print(f"error: cannot convert: {exc}", file=sys.stderr)
        return 2
    accepted: list[str] = []
    for key in conversion.entries:
        try:
            entry, warnings = parse_entry(key, config.safety, policy=args.policy)
        except ValueError as exc:
            print(f"refused: {key}: {exc}", file=sys.stderr)
            continue
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        accepted.append(entry.key)
        print(format_line(entry.key, entry.policy, None, ""))
    for note in conversion.notes:
        print(f"note: {note}", file=sys.stderr)
    for item in conversion.unconverted:
        print(f"not converted: {item}", file=sys.stderr)
    if args.sample_file:
        with open(args.sample_file, encoding="utf-8") as samples:
            only_regex, only_entries = compare_samples(args.regex, accepted, samples)
        print(
            f"sample: {len(only_regex)} origin(s) the regex accepted that the entries refuse"
            + (" (usually the holes):" if only_regex else ""),
            file=sys.stderr,
        )
        for origin in only_regex:
            print(f"  regex only: {origin}", file=sys.stderr)
        for origin in only_entries:
            print(f"  entries only: {origin}", file=sys.stderr)
    if args.apply and accepted:
        with _open_store(config) as store:
            added, replaced = store.put_many(
                (
                    (key, OriginRecord(args.policy or "default", None, "cli", 0.0, f"from regex {args.regex}"))
                    for key in accepted
                ),
                _actor(),
            )
        print(f"applied: {added} new, {replaced} replaced", file=sys.stderr)
    return 1 if conversion.unconverted or len(accepted) < len(conversion.entries) else 0


# -- parser -------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corsproxy", description="A CORS-enforcing reverse proxy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            "-c",
            help="YAML config file (default: $CORSPROXY_CONFIG, then /etc/corsproxy/config.yaml)",
        )
        return p

    serve = with_config(commands.add_parser("serve", help="run the proxy"))
    serve.add_argument(
        "--workers",
        "-w",
        type=int,
        default=int(os.environ["CORSPROXY_WORKERS"]) if os.environ.get("CORSPROXY_WORKERS", "").isdigit() else None,
        help="worker processes (default: $CORSPROXY_WORKERS, else one per core)",
    )
    serve.set_defaults(func=cmd_serve)
    with_config(commands.add_parser("check", help="validate the config and exit")).set_defaults(func=cmd_check)

    demo = commands.add_parser("demo", help="run the proxy in front of a built-in echo upstream")
    demo.add_argument("--config", default="config.example.yaml", help="config to use (default: %(default)s)")
    demo.add_argument("--port", type=int, help="listen port (default: the config's)")
    demo.set_defaults(func=cmd_demo)

    ex = with_config(commands.add_parser("explain", help="say whether a request would be allowed, and why"))
    ex.add_argument("--origin", required=True, help="the Origin header value")
    ex.add_argument("--method", help="a preflight for this method (default: an actual GET)")
    ex.add_argument("--headers", help="requested headers, comma-separated")
    ex.add_argument("--path", default="/", help="request path (routes are matched on it)")
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.set_defaults(func=cmd_explain)

    origins = commands.add_parser("origins", help="manage the origin store").add_subparsers(
        dest="origins_command", required=True, metavar="ACTION"
    )
    add = with_config(origins.add_parser("add", help="allow an origin or pattern"))
    add.add_argument("origin")
    add.add_argument("--policy", help="named policy (default: the cors block)")
    when = add.add_mutually_exclusive_group()
    when.add_argument("--ttl", help="expire after this long, e.g. 7d, 12h")
    when.add_argument("--expires", help="expire at this time, e.g. 2026-12-31T00:00:00Z")
    add.add_argument("--note", help="free text kept with the entry")
    add.set_defaults(func=cmd_origins_add)

    remove = with_config(origins.add_parser("remove", help="stop allowing an origin or pattern"))
    remove.add_argument("origin")
    remove.set_defaults(func=cmd_origins_remove)

    listing = with_config(origins.add_parser("list", help="list the store"))
    listing.add_argument("--filter", help="only entries containing this text")
    listing.set_defaults(func=cmd_origins_list)

    imp = with_config(origins.add_parser("import", help="add origins from a file, one per line (- for stdin)"))
    imp.add_argument("file")
    imp.set_defaults(func=cmd_origins_import)

    exp = with_config(origins.add_parser("export", help="write the store in the import format"))
    exp.add_argument("file", nargs="?", default="-")
    exp.set_defaults(func=cmd_origins_export)

    hist = with_config(origins.add_parser("history", help="the audit trail, one JSON object per line"))
    hist.add_argument("--origin", help="only this origin")
    hist.add_argument("--limit", type=int, default=100)
    hist.set_defaults(func=cmd_origins_history)

    regex = with_config(
        origins.add_parser("import-regex", help="convert an origin regex into exact entries and safe patterns")
    )
    regex.add_argument("regex", help="the regex, e.g. '^https://(www\\.)?example\\.com$'")
    regex.add_argument("--sample-file", help="real origins, one per line: show which ones the regex accepted only")
    regex.add_argument("--policy", help="policy for the entries (default: the cors block)")
    regex.add_argument("--apply", action="store_true", help="write the entries to the store (default: print them)")
    regex.set_defaults(func=cmd_origins_import_regex)

    prune = with_config(origins.add_parser("prune", help="remove expired entries"))
    prune.set_defaults(func=cmd_origins_prune)

    store = commands.add_parser("store", help="maintain the origin store").add_subparsers(
        dest="store_command", required=True, metavar="ACTION"
    )
    with_config(
        store.add_parser(
            "compact",
            help="shrink the store's file to its live data (stop corsproxy first: refused while the store is open)",
        )
    ).set_defaults(func=cmd_store_compact)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`corsproxy origins list | head`): stop quietly, as a command killed by SIGPIPE
        # would, and point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # by number: `origins export` may already have closed sys.stdout
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
