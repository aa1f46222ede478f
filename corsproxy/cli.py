"""The ``corsproxy`` command: serve, check, explain, demo and origin-store management.

Owns argument parsing, exit codes and what the operator reads on the terminal. Exit codes: 0 success; 1 a check or
explain that says no, or an import with refused lines; 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import io
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import yaml

from corsproxy.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_config, store_path_problem
from corsproxy.core.origin_lines import (
    KEEP,
    EntryEdit,
    _quote,
    format_line,
    parse_edits,
    parse_entry,
    parse_expires_field,
)
from corsproxy.core.problems import Problem, ProblemError
from corsproxy.core.settings import Admin, Config
from corsproxy.origins.writes import (
    Declarations,
    WriteReport,
    WriteTarget,
    prune_expired,
    reconcile_config,
    remove_entry,
    write_entries,
)
from corsproxy.store import OriginRecord, OriginStore, StoreError, StoreSpaceError, check_location

__all__ = ["main"]

log = logging.getLogger("corsproxy")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _load(args: argparse.Namespace, *, warn: bool = False) -> Config:
    """The config. Its warnings (a credentialed wildcard, an opt-in...) are about serving it: ``serve`` and ``check``
    say them; the store and explain commands would only repeat them on every call."""
    config = load_config(args.config)
    if warn:
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
    config = _load(args, warn=True)
    # What serving would trip over, found without serving: the store's directory, the disk under it, the store.
    map_size = config.store.map_size_mb << 20
    errors, warnings = check_location(config.store.path, map_size)
    if errors:
        raise ConfigError([store_path_problem(error) for error in errors], config.source)
    if Path(config.store.path, "data.mdb").exists():
        try:
            with OriginStore(config.store.path, map_size=map_size, readonly=True) as store:
                warnings.extend(f"store.map_size_mb: {problem}" for problem in store.usage().problems())
        except StoreError as exc:
            raise ConfigError([store_path_problem(str(exc))], config.source) from None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if Path(config.store.path, "data.mdb").exists():
        # Entries added through the CLI, the admin API or the origins file were checked against the policies of
        # their day; the engine re-checks every match against today's, and this lists the ones it now refuses.
        from corsproxy.core.origin import EntryError, parse_origin_entry
        from corsproxy.core.safety import check_origin_entry

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
                    problems, _ = check_origin_entry(parse_origin_entry(key), flags)
                except EntryError as exc:
                    problems = list(exc.problems)
                refused.extend(f"{key} (source {record.source}): {problem.message}" for problem in problems)
        for line in refused[:20]:
            print(f"warning: store entry refused at request time: {line}", file=sys.stderr)
        if len(refused) > 20:
            print(f"warning: ... and {len(refused) - 20} more such entries", file=sys.stderr)
    if config.store.postgresql is not None:
        _check_fleet(config)
    print(
        f"{config.source}: OK — {len(config.origins)} configured origin(s), "
        f"{len(config.engine.policies)} polic{'y' if len(config.engine.policies) == 1 else 'ies'}, "
        f"{len(config.engine.routes)} route(s), upstream {config.upstream.url}"
    )
    return 0


def _check_fleet(config: Config) -> None:
    """Fleet mode: PostgreSQL's schema, this host's replica (position, last contact) and the rows it refused."""
    from corsproxy.ops.server import check_source_of_truth
    from corsproxy.origins.sync import read_status, replica_state

    source = config.store.postgresql
    assert source is not None
    if (unavailable := check_source_of_truth(config, "corsproxy-check")) is not None:
        print(f"warning: store.postgresql: {unavailable}", file=sys.stderr)
    if not Path(config.store.path, "data.mdb").exists():
        print(f"fleet: {source.display}; this host's replica at {config.store.path} is not created yet")
        return
    with OriginStore(config.store.path, readonly=True) as store:
        state = replica_state(store, with_refused=True)
    status = read_status(Path(config.store.path))
    if state.synced:
        seen = status.get("caught_up_at")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen)) if seen else "never"
        print(f"fleet: {source.display}; replica at change {state.position}, last caught up {when}")
    else:
        print(f"warning: fleet: the replica at {config.store.path} has not completed its first sync", file=sys.stderr)
    if status.get("error"):
        print(f"warning: fleet: the syncer's last error: {status['error']}", file=sys.stderr)
    for origin, refusal in state.refused:
        print(
            f"warning: PostgreSQL row {origin!r} refused (change {refusal.get('seq')}, by {refusal.get('actor')}), "
            f"not applied on this host: {refusal.get('reason')}",
            file=sys.stderr,
        )


WORKERS_ENV = "CORSPROXY_WORKERS"


def cmd_serve(args: argparse.Namespace) -> int:
    from corsproxy.ops.server import default_workers, serve

    workers = args.workers
    if workers is None and os.environ.get(WORKERS_ENV, "").strip():
        text = os.environ[WORKERS_ENV].strip()
        if not text.isdigit() or int(text) < 1:
            print(
                f"error: {WORKERS_ENV}={text!r}: must be a whole number >= 1 (or unset: one per core)", file=sys.stderr
            )
            return 2
        workers = int(text)
    if workers is not None and workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    config = _load(args, warn=True)
    return serve(config, workers or default_workers())


#: The demo's configuration ships inside the package, so ``corsproxy demo`` runs from any installation.
DEMO_CONFIG = "demo.yaml"


def cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import as_file, files

    from corsproxy.ops.demo import run_demo
    from corsproxy.ops.server import _listen_socket

    with contextlib.ExitStack() as stack:
        if args.config is None:
            path = stack.enter_context(as_file(files("corsproxy").joinpath(DEMO_CONFIG)))
        else:
            path = Path(args.config)
        env = {**os.environ, "CORSPROXY_UPSTREAM": "http://127.0.0.1:1"}  # replaced by the demo upstream
        env.pop("CORSPROXY_PORT", None)  # the demo's port is --port's or the demo config's
        config = load_config(path, env=env)
        port = config.listen.port if args.port is None else args.port
        try:
            # Bound before anything starts: a taken port is one line, with no half-started demo to clean up.
            listener = _listen_socket(args.host, port)
        except OSError as exc:
            print(
                f"error: corsproxy demo cannot listen on {args.host}:{port}: {exc.strerror or exc} — pick another "
                "port with --port N",
                file=sys.stderr,
            )
            return 2
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="corsproxy-demo-"))
        config = replace(
            config,
            listen=replace(config.listen, host=args.host, port=listener.getsockname()[1]),
            store=replace(config.store, path=str(Path(tmp) / "origins.lmdb")),
        )
        asyncio.run(run_demo(config, listener))
    return 0


def _admin_settings(args: argparse.Namespace) -> tuple[Admin, str]:
    """The admin listener and token source, even from a config that does not validate: a reload after a bad edit
    must still reach the server, which then answers with every problem (and keeps its running configuration)."""
    try:
        config = load_config(args.config)
        return config.admin, config.source
    except ConfigError as exc:
        refused = exc
    path = Path(args.config or os.environ.get("CORSPROXY_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise refused from None
    if not isinstance(data, dict):
        raise refused
    admin_only = {"admin": data.get("admin"), "listen": {"port": 0}, "upstream": {"url": "http://127.0.0.1:1"}}
    try:
        admin = parse_config(admin_only, source=str(path), base_dir=path.resolve().parent).admin
    except ConfigError:
        raise refused from None
    return admin, str(path)


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running server to reload, through its admin API, and report what it answered.

    The admin API rather than a signal: it works from another container or host that can reach the admin port, is
    authenticated by the admin token, and answers with the validation result (a signal reports nothing back).
    """
    import urllib.error
    import urllib.request

    from corsproxy.ops.admin import load_tokens

    admin, source = _admin_settings(args)
    if admin.port is None:
        print(
            f"error: {source} has no admin.listen: `corsproxy reload` uses the admin API — configure "
            "admin.listen (and a token), or send SIGHUP to the arbiter (the pid in serve's start-up log)",
            file=sys.stderr,
        )
        return 2
    try:
        tokens = load_tokens(admin)
    except (OSError, ValueError) as exc:
        print(f"error: admin token: {exc}", file=sys.stderr)
        return 2
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(admin.host, admin.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{admin.port}/reload"
    request = urllib.request.Request(url, method="POST", data=b"")
    if tokens:
        request.add_header("Authorization", f"Bearer {next(iter(tokens))}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {}
        why = body.get("reason") or body.get("error") or exc.reason
        print(f"error: reload refused by {url} ({exc.code}): {why}", file=sys.stderr)
        for problem in body.get("problems") or []:
            # The server's Problem objects, printed as `corsproxy check` prints its own: path: message.
            if isinstance(problem, dict) and problem.get("path"):
                print(f"  - {problem['path']}: {problem.get('message', '')}", file=sys.stderr)
            elif isinstance(problem, dict):
                print(f"  - {problem.get('message', '')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"error: no corsproxy admin API answered at {url}: {reason} — is `corsproxy serve` running?",
            file=sys.stderr,
        )
        return 2
    for warning in body.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    config_file = body.get("config", source)
    if body.get("status") == "applied":
        print(f"reloaded {config_file}: new workers serve it, the old ones finish their requests and exit")
    else:  # the arbiter gave no verdict in time: the reload goes on, its outcome is in the server's log
        print(f"reloading {config_file}: no verdict yet, see the server's log for 'reloaded' or 'reload refused'")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from corsproxy.core.explain import explain

    if args.origin and args.origin_option and args.origin != args.origin_option:
        print("error: two different origins given (positional and --origin): give one", file=sys.stderr)
        return 2
    origin = args.origin or args.origin_option
    if not origin:
        print("error: which origin? e.g. corsproxy explain https://app.example.com --method PUT", file=sys.stderr)
        return 2
    config = _load(args)
    with _open_store(config) as store:
        result = explain(config, store, origin, args.method, args.headers or "", args.path)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(result.text())
    return 0 if result.allowed else 1


def _messages(problems: Sequence[Problem]) -> str:
    """One import line's problems, as its one ``refused:`` line says them."""
    return "; ".join(problem.message for problem in problems)


def _describe(record: OriginRecord | None) -> str:
    if record is None:
        return ""
    out = f" (policy {record.policy})"
    if record.expires is not None:
        out += time.strftime(" expires %Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires))
    if record.note:
        out += f" note {_quote(record.note)}"  # printable only: a note is text anyone with a write path chose
    return out


def _target(config: Config, store: OriginStore) -> WriteTarget:
    """Where a write goes: this host's store, or in fleet mode PostgreSQL (every replica applies it from there;
    when PostgreSQL is unreachable the command fails with "source of truth unavailable", nothing written)."""
    if config.store.postgresql is None:
        return store
    from corsproxy.origins.postgres import PostgresOrigins

    return PostgresOrigins(config.store.postgresql, config.origins)


def _stored(target: WriteTarget, store: OriginStore, key: str) -> OriginRecord | None:
    written: dict[str, OriginRecord | None] | None = getattr(target, "written", None)
    return store.get(key) if written is None else written.get(key)


def _write(config: Config, store: OriginStore, edits: list[EntryEdit], **options: bool) -> WriteReport:
    """Every CLI write goes through the one write service (ownership and validation rules)."""
    return write_entries(
        _target(config, store),
        edits,
        safety=config.safety,
        declarations=Declarations.of(config),
        actor=_actor(),
        owner="cli",
        **options,
    )


#: Where a problem of each field was given on the command line (``origins add``): what the CLI names as its path.
_ARGUMENTS = {"origin": "origin", "policy": "--policy", "note": "--note", "expires": "--expires", "ttl": "--ttl"}


def _refused(problems: Sequence[Problem]) -> int:
    """Print each problem as ``error: ARGUMENT: message`` (the message is the config's and the admin API's)."""
    for problem in problems:
        print(f"error: {problem.at(_ARGUMENTS.get(problem.field, problem.field))}", file=sys.stderr)
    return 2


def cmd_origins_add(args: argparse.Namespace) -> int:
    from corsproxy.core.origin import parse_origin_entry

    config = _load(args)
    try:
        entry = parse_origin_entry(args.origin)
        expires, _ = parse_expires_field(args.expires, args.ttl, time.time(), allow_past=False)
    except ProblemError as exc:
        return _refused(exc.problems)
    with _open_store(config) as store:
        target = _target(config, store)
        report = write_entries(
            target,
            [EntryEdit(entry, args.policy, expires, args.note)],
            safety=config.safety,
            declarations=Declarations.of(config),
            actor=_actor(),
            owner="cli",
        )
        stored = _stored(target, store, entry.key)
    for _, warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.refused:
        return _refused(report.refused[0][1])
    verb = "added" if report.added else "updated" if report.updated else "unchanged"
    print(f"{verb} {entry.key}{_describe(stored)}")
    return 0


def cmd_origins_remove(args: argparse.Namespace) -> int:
    from corsproxy.core.origin import parse_origin_entry

    config = _load(args)
    try:
        key = parse_origin_entry(args.origin).key
        with _open_store(config) as store:
            old = remove_entry(_target(config, store), key, declarations=Declarations.of(config), actor=_actor())
    except ProblemError as exc:  # a bad origin, or one declared elsewhere
        return _refused(exc.problems)
    if old is None:
        print(f"error: {key} is not in the store (see `corsproxy origins list`)", file=sys.stderr)
        return 1
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
            # Raw, a note could erase or forge lines on the operator's terminal ("\r\x1b[2K", "\n"), or hold a lone
            # surrogate that stdout cannot encode: non-printable notes are shown quoted and escaped, as exported.
            note = f" — {record.note if record.note.isprintable() else _quote(record.note)}" if record.note else ""
            print(f"{key}\tpolicy={record.policy}\tsource={record.source}{expires}{state}{note}")
    return 0


def cmd_origins_import(args: argparse.Namespace) -> int:
    config = _load(args)
    # Lines end at "\n" only, as the admin API's import and the origins file read them: a "\r" inside a quoted note
    # must not split one entry into two here and not there (universal newlines would).
    if args.file == "-":
        stream: TextIO = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n")
    else:
        stream = open(args.file, encoding="utf-8", newline="\n")  # noqa: SIM115
    with stream:
        parsed = parse_edits(stream)
    with _open_store(config) as store:
        report = _write(config, store, parsed.edits, batch=True)
    refused = sorted([*parsed.errors, *((edit.line or 0, _messages(why)) for edit, why in report.refused)])
    warnings = sorted([*parsed.warnings, *((edit.line or 0, why) for edit, why in report.warnings)])
    for number, reason in refused:
        print(f"{args.file}:{number}: refused: {reason}", file=sys.stderr)
    for number, warning in warnings:
        print(f"{args.file}:{number}: warning: {warning}", file=sys.stderr)
    if report.declared:
        print(
            f"{len(report.declared)} line(s) match entries declared in the config or the origins file: left to them",
            file=sys.stderr,
        )
    done = len(report.added) + len(report.updated) + len(report.unchanged)
    unchanged = f", {len(report.unchanged)} unchanged" if report.unchanged else ""
    print(
        f"imported {done} origin(s) ({len(report.added)} new, {len(report.updated)} replaced{unchanged}), "
        f"refused {len(refused)}"
    )
    return 1 if refused else 0


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
        removed = prune_expired(_target(config, store), _actor())
    for key in removed:
        print(f"removed expired {key}")
    print(f"pruned {len(removed)} expired origin(s)")
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from corsproxy.origins.postgres import SCHEMA_VERSION, migrate

    config = _load(args)
    source = config.store.postgresql
    if source is None:
        print(
            f"error: {config.source} sets no store.postgresql (or CORSPROXY_DATABASE_URL): no database", file=sys.stderr
        )
        return 2
    before, after = migrate(source)
    if before == after:
        print(f"{source.display}: corsproxy schema version {after} is current; nothing to do")
    else:
        print(
            f"{source.display}: corsproxy schema migrated from version {before} to {after} (current: {SCHEMA_VERSION})"
        )
    return 0


def cmd_store_compact(args: argparse.Namespace) -> int:
    from corsproxy.store import compact

    config = _load(args)
    before, after = compact(config.store.path)
    print(f"compacted {config.store.path}: {before / (1 << 20):.1f} MiB -> {after / (1 << 20):.1f} MiB")
    return 0


def cmd_origins_import_regex(args: argparse.Namespace) -> int:
    from corsproxy.core.regex_import import RegexImportError, SampleTimeout, compare_samples, convert_regex

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
            print(f"warning: {warning.message}", file=sys.stderr)
        accepted.append(entry.key)
        print(format_line(entry.key, entry.policy, None, ""))
    for note in conversion.notes:
        print(f"note: {note}", file=sys.stderr)
    for item in conversion.unconverted:
        print(f"not converted: {item}", file=sys.stderr)
    stopped = False
    if args.sample_file:
        with open(args.sample_file, encoding="utf-8") as samples:
            try:
                only_regex, only_entries = compare_samples(args.regex, accepted, samples, timeout=args.sample_timeout)
            except SampleTimeout as exc:
                print(f"error: {args.sample_file}: {exc}", file=sys.stderr)
                only_regex, only_entries, stopped = exc.only_regex, exc.only_entries, True
            except RegexImportError as exc:
                print(f"error: {args.sample_file}: {exc}", file=sys.stderr)
                return 2
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
        from corsproxy.core.origin import parse_origin_entry

        note = f"from regex {args.regex}"
        edits = [EntryEdit(parse_origin_entry(key), args.policy, KEEP, note) for key in accepted]
        with _open_store(config) as store:
            report = _write(config, store, edits, batch=True)
        for _, problems in report.refused:
            print(f"refused: {_messages(problems)}", file=sys.stderr)
        print(f"applied: {len(report.added)} new, {len(report.updated)} replaced", file=sys.stderr)
    return 1 if stopped or conversion.unconverted or len(accepted) < len(conversion.entries) else 0


# -- parser -------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from corsproxy import __version__

    config_help = "YAML config file (default: $CORSPROXY_CONFIG, then /etc/corsproxy/config.yaml)"
    parser = argparse.ArgumentParser(prog="corsproxy", description="A CORS-enforcing reverse proxy.")
    parser.add_argument("--version", action="version", version=f"corsproxy {__version__}")
    parser.add_argument("--config", "-c", help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # Accepted after the verb too; SUPPRESS keeps a --config given before the verb when none follows it.
        p.add_argument("--config", "-c", default=argparse.SUPPRESS, help=config_help)
        return p

    serve = with_config(commands.add_parser("serve", help="run the proxy"))
    serve.add_argument(
        "--workers",
        "-w",
        type=int,
        help=f"worker processes (default: ${WORKERS_ENV}, else one per core this process may use)",
    )
    serve.set_defaults(func=cmd_serve)
    with_config(commands.add_parser("check", help="validate the config and exit")).set_defaults(func=cmd_check)

    reload = commands.add_parser("reload", help="make the running server re-read its config (through the admin API)")
    wait = "seconds to wait for the server's verdict; it waits up to 60 for new workers (default: %(default)s)"
    with_config(reload).add_argument("--timeout", type=float, default=90.0, help=wait)
    reload.set_defaults(func=cmd_reload)

    demo = commands.add_parser("demo", help="run the proxy in front of a built-in echo upstream")
    demo.add_argument(
        "--config",
        "-c",
        default=argparse.SUPPRESS,
        help="config to use instead of the demo's own (its store is a temporary one)",
    )
    demo.add_argument("--port", type=int, help="listen port (default: the config's, 8080)")
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="listen address (default: %(default)s; 0.0.0.0 in a container, to reach it through a published port)",
    )
    demo.set_defaults(func=cmd_demo)

    ex = with_config(commands.add_parser("explain", help="say whether a request would be allowed, and why"))
    ex.add_argument("origin", nargs="?", help="the Origin header value, e.g. https://app.example.com")
    ex.add_argument("--origin", dest="origin_option", metavar="ORIGIN", help="the same, as an option")
    ex.add_argument("--method", help="a preflight for this method (default: an actual GET)")
    ex.add_argument("--headers", help="requested headers, comma-separated")
    ex.add_argument("--path", default="/", help="request path (routes are matched on it; default: /)")
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.set_defaults(func=cmd_explain)

    origins = commands.add_parser("origins", help="manage the origin store").add_subparsers(
        dest="origins_command", required=True, metavar="ACTION"
    )
    add = with_config(origins.add_parser("add", help="allow an origin or pattern"))
    add.add_argument("origin", help="an origin or pattern: https://app.example.com, https://*.example.com, ...")
    add.add_argument("--policy", help="named policy (default: the cors block)")
    when = add.add_mutually_exclusive_group()
    when.add_argument("--ttl", help="expire after this long, e.g. 7d, 12h")
    when.add_argument("--expires", help="expire at this time, e.g. 2026-12-31T00:00:00Z ('never' clears it)")
    add.add_argument("--note", help="free text kept with the entry ('' clears it)")
    add.set_defaults(func=cmd_origins_add)

    # The actions whose arguments are a plain list: (name, help, [(flags, options)], handler).
    plain: list[tuple[str, str, list[tuple[tuple[str, ...], dict[str, Any]]], Callable[[argparse.Namespace], int]]] = [
        (
            "remove",
            "stop allowing an origin or pattern",
            [(("origin",), {"help": "the origin or pattern, as added"})],
            cmd_origins_remove,
        ),
        ("list", "list the store", [(("--filter",), {"help": "only entries containing this text"})], cmd_origins_list),
        (
            "import",
            "add origins from a file, one per line (- for stdin)",
            [(("file",), {"help": "the file, in the line format of `origins export`; - reads stdin"})],
            cmd_origins_import,
        ),
        (
            "export",
            "write the store in the import format",
            [(("file",), {"nargs": "?", "default": "-", "help": "where to write (default: stdout)"})],
            cmd_origins_export,
        ),
        (
            "history",
            "the audit trail, one JSON object per line",
            [
                (("--origin",), {"help": "only this origin"}),
                (
                    ("--limit",),
                    {"type": int, "default": 100, "help": "the newest N events, printed oldest first (default: 100)"},
                ),
            ],
            cmd_origins_history,
        ),
    ]
    for name, summary, arguments, handler in plain:
        action = with_config(origins.add_parser(name, help=summary))
        for flags, options in arguments:
            action.add_argument(*flags, **options)
        action.set_defaults(func=handler)

    regex = with_config(
        origins.add_parser("import-regex", help="convert an origin regex into exact entries and safe patterns")
    )
    regex.add_argument("regex", help="the regex, e.g. '^https://(www\\.)?example\\.com$'")
    regex.add_argument("--sample-file", help="real origins, one per line: show which ones the regex accepted only")
    regex.add_argument(
        "--sample-timeout",
        type=float,
        default=10.0,
        help="seconds the regex may run over the whole sample file before it is stopped (default: %(default)s)",
    )
    regex.add_argument("--policy", help="policy for the entries (default: the cors block)")
    regex.add_argument("--apply", action="store_true", help="write the entries to the store (default: print them)")
    regex.set_defaults(func=cmd_origins_import_regex)

    prune = with_config(origins.add_parser("prune", help="remove expired entries"))
    prune.set_defaults(func=cmd_origins_prune)

    db = commands.add_parser("db", help="fleet mode: the PostgreSQL source of truth").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    with_config(
        db.add_parser("migrate", help="create or upgrade corsproxy's schema in store.postgresql (idempotent)")
    ).set_defaults(func=cmd_db_migrate)

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
    except (ConfigError, StoreError) as exc:
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
