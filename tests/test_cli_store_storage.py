"""The CLI when the store runs out of room or cannot be used, ``corsproxy store compact``, and output to a closed pipe.

Real subprocesses against real LMDB stores in ``tmp_path``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.config import REPO, run_cli
from tests.support.fs import tmpfs


def _lines(path: Path, count: int, note: str = "n" * 60) -> Path:
    path.write_text("".join(f"https://h{i}.example.com note={note}\n" for i in range(count)))
    return path


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_a_full_store_is_one_clear_line_and_removal_still_works(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = str(write_config(store={"map_size_mb": 1}))
    assert run_cli("origins", "import", str(_lines(tmp_path / "some.txt", 1000)), "--config", config).returncode == 0
    big = run_cli("origins", "import", str(_lines(tmp_path / "many.txt", 5000)), "--config", config)
    _one_line_error(big, "store.map_size_mb", "Nothing was written")
    # Fill the rest one batch at a time, until an addition is refused.
    for start in range(1000, 6000, 100):
        batch = tmp_path / "batch.txt"
        batch.write_text("".join(f"https://b{i}.example.com note={'n' * 60}\n" for i in range(start, start + 100)))
        result = run_cli("origins", "import", str(batch), "--config", config)
        if result.returncode != 0:
            break
    else:
        pytest.fail("the 1 MiB store never filled up")
    _one_line_error(result, "store.map_size_mb")
    # The config gains origins the full store cannot take: every command reconciles first, and must still run.
    extra = [f"https://config{i}.example.com" for i in range(300)]
    config = str(write_config(store={"map_size_mb": 1}, cors={"allow_origins": extra}))
    removed = run_cli("origins", "remove", "https://h1.example.com", "--config", config)
    assert removed.returncode == 0 and removed.stdout == "removed https://h1.example.com\n", removed.stderr
    assert "warning: cors.allow_origins not applied to the store: " in removed.stderr
    pruned = run_cli("origins", "prune", "--config", config)
    assert pruned.returncode == 0, pruned.stderr
    check = run_cli("check", "--config", config)
    assert check.returncode == 0, check.stderr
    assert "warning: store.map_size_mb: the origin store is full" in check.stderr


def test_check_refuses_a_store_path_that_cannot_be_a_directory(write_config: Callable[..., Path]) -> None:
    result = run_cli("check", "--config", str(write_config(store={"path": "/dev/null/store"})))
    assert result.returncode == 2, result.stdout
    assert "store.path: /dev/null/store: /dev/null is not a directory" in result.stderr
    assert "set store.path to a directory" in result.stderr
    assert "OK" not in result.stdout


def test_check_refuses_a_store_it_cannot_open(write_config: Callable[..., Path], tmp_path: Path) -> None:
    store = tmp_path / "origins.lmdb"
    store.mkdir()
    (store / "data.mdb").write_bytes(b"not an LMDB file" * 512)
    result = run_cli("check", "--config", str(write_config()))
    assert result.returncode == 2, result.stdout
    assert "store.path: cannot open the origin store at" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_warns_when_the_map_is_larger_than_the_disk(tiny_fs: Path, write_config: Callable[..., Path]) -> None:
    result = run_cli("check", "--config", str(write_config(store={"path": str(tiny_fs / "store")})))
    assert result.returncode == 0, result.stderr
    assert "warning: store.map_size_mb: 1024 MiB, but the filesystem holding store.path has" in result.stderr
    assert not (tiny_fs / "store").exists()  # check creates nothing


def test_serve_refuses_a_store_path_that_cannot_be_a_directory(write_config: Callable[..., Path]) -> None:
    result = run_cli("serve", "--config", str(write_config(store={"path": "/dev/null/store"})), timeout=30)
    assert result.returncode == 2
    assert "store.path: /dev/null/store: /dev/null is not a directory" in result.stderr


def test_store_compact(write_config: Callable[..., Path], tmp_path: Path) -> None:
    config = str(write_config())
    assert run_cli("origins", "import", str(_lines(tmp_path / "some.txt", 3000)), "--config", config).returncode == 0
    listed = run_cli("origins", "list", "--config", config).stdout
    result = run_cli("store", "compact", "--config", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"compacted {tmp_path / 'origins.lmdb'}: ")
    assert run_cli("origins", "list", "--config", config).stdout == listed


def test_store_compact_is_refused_while_the_store_is_open(
    store_held_open: Path, write_config: Callable[..., Path]
) -> None:
    result = run_cli("store", "compact", "--config", str(write_config(store={"path": str(store_held_open)})))
    _one_line_error(result, "open in another process", "stop corsproxy")


@pytest.fixture
def many_origins(write_config: Callable[..., Path], tmp_path: Path) -> Iterator[str]:
    config = str(write_config())
    result = run_cli("origins", "import", str(_lines(tmp_path / "many.txt", 3000)), "--config", config)
    assert result.returncode == 0, result.stderr
    yield config


@pytest.mark.parametrize("command", [["origins", "list"], ["origins", "export"], ["origins", "history"]])
def test_output_to_a_closed_pipe_ends_quietly(many_origins: str, command: list[str]) -> None:
    """`corsproxy origins list | head -1`: the reader leaves after one line; the command stops without a message,
    with the status a command killed by SIGPIPE has (128 + 13)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corsproxy",
            *command,
            "--config",
            many_origins,
            *(["--limit", "3000"] * (command[-1] == "history")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(30) == 128 + signal.SIGPIPE, stderr
    assert all(line.startswith("warning: ") for line in stderr.splitlines()), stderr  # the config's, if any


def test_check_refuses_a_store_on_a_read_only_filesystem(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        check = run_cli("check", "--config", str(write_config(store={"path": str(mount / "store")})))
    assert check.returncode == 2, check.stdout
    assert f"store.path: {mount} is on a read-only filesystem" in check.stderr
