"""The regex importer is bounded (time on the samples, nesting in the pattern) and says when a port widened; the
README's example runs as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corsproxy.core.regex_import import RegexImportError, SampleTimeout, compare_samples, convert_regex
from tests.support.config import REPO, run_cli

WIDENED = "a corsproxy port wildcard :* matches every port"

PORTS = {
    "exactly four digits": (r"^https://app\.example\.com:\d{4}$", ["https://app.example.com:*"], True),
    "one digit": (r"^https://app\.example\.com:[0-9]$", ["https://app.example.com:*"], True),
    "two to five digits": (r"^https://app\.example\.com:\d{2,5}$", ["https://app.example.com:*"], True),
    "optional bounded port": (
        r"^https://app\.example\.com(:\d{4})?$",
        ["https://app.example.com:*", "https://app.example.com"],
        True,
    ),
    "any digits": (r"^https://app\.example\.com:\d+$", ["https://app.example.com:*"], False),
    "any digits, class": (
        r"^https://app\.example\.com(:[0-9]+)?$",
        ["https://app.example.com:*", "https://app.example.com"],
        False,
    ),
    "two or more digits": (r"^https://app\.example\.com:\d{2,}$", ["https://app.example.com:*"], False),
    "a literal port": (r"^https://app\.example\.com:8443$", ["https://app.example.com:8443"], False),
}


@pytest.mark.parametrize(("regex", "entries", "widened"), PORTS.values(), ids=PORTS.keys())
def test_ports_that_widen_say_so(regex: str, entries: list[str], widened: bool) -> None:
    conversion = convert_regex(regex)
    assert conversion.entries == entries
    assert conversion.unconverted == []
    assert any(WIDENED in note for note in conversion.notes) is widened, conversion.notes


def test_deeply_nested_groups_are_a_clear_error() -> None:
    pattern = "^" + "(" * 3000 + r"https://a\.example\.com" + ")" * 3000 + "$"
    with pytest.raises(RegexImportError, match="more than 32 nested groups") as info:
        convert_regex(pattern)
    assert len(str(info.value)) < 300  # the pattern is abbreviated, not echoed whole


def test_nesting_within_the_bound_converts() -> None:
    assert convert_regex("^" + "(" * 30 + r"https://a\.example\.com" + ")" * 30 + "$").entries == [
        "https://a.example.com"
    ]


def test_cli_nested_groups_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    shutil.copy(REPO / "config.example.yaml", config)
    pattern = "^" + "(" * 3000 + r"https://a\.example\.com" + ")" * 3000 + "$"
    result = run_cli("origins", "import-regex", pattern, "-c", str(config))
    assert result.returncode == 2
    assert "more than 32 nested groups" in result.stderr
    assert "Traceback" not in result.stderr


# Catastrophic backtracking: every split of the a's between the .* runs is tried before the match fails.
PATHOLOGICAL = r"^https://.*.*.*.*.*.*.*.*.*.*.*.*x\.com$"
SLOW_SAMPLE = "https://" + "a" * 80 + ".com"


def test_a_pathological_regex_is_stopped_and_the_earlier_samples_kept() -> None:
    samples = ["https://x.com", "https://ax.com", "# a comment", SLOW_SAMPLE, "https://never-reached.com"]
    with pytest.raises(SampleTimeout) as info:
        compare_samples(PATHOLOGICAL, ["https://x.com"], samples, timeout=1.0)
    assert info.value.line == 4 and info.value.origin == SLOW_SAMPLE
    assert info.value.only_regex == ["https://ax.com"]
    assert info.value.only_entries == []
    assert "stopped at sample line 4" in str(info.value)


def test_cli_pathological_regex_with_samples(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    shutil.copy(REPO / "config.example.yaml", config)
    samples = tmp_path / "seen.txt"
    samples.write_text(f"https://ax.com\n{SLOW_SAMPLE}\n")
    result = run_cli(
        "origins",
        "import-regex",
        PATHOLOGICAL,
        "--sample-file",
        str(samples),
        "--sample-timeout",
        "1",
        "-c",
        str(config),
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{samples}: the regex ran for more than 1 s and was stopped at sample line 2" in result.stderr
    assert "regex only: https://ax.com" in result.stderr


def test_an_ordinary_comparison_is_unchanged() -> None:
    only_regex, only_entries = compare_samples(
        r"^https://(www\.)?example\.com$",
        ["https://example.com"],
        ["https://example.com", "https://www.example.com", "https://evil.com", "not an origin"],
    )
    assert (only_regex, only_entries) == (["https://www.example.com"], [])


def _readme_regex_example() -> tuple[list[str], list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```console\n(\$ printf .*?seen-origins\.txt\n.*?)```", text, re.S)
    assert block is not None, "the README's import-regex example"
    lines = block.group(1).splitlines()
    commands = [line[2:] for line in lines if line.startswith("$ ")]
    output = [line for line in lines if not line.startswith("$ ")]
    return commands, output


def test_the_readme_import_regex_example_runs_as_written(tmp_path: Path) -> None:
    """In a copy of the checkout's example config, from a directory holding nothing else."""
    shutil.copy(REPO / "config.example.yaml", tmp_path / "config.example.yaml")
    commands, expected = _readme_regex_example()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORSPROXY_")}
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")  # terminal order
    output: list[str] = []
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout
        output.extend(result.stdout.splitlines())
    assert output == expected
