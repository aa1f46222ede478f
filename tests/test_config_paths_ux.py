"""Every path in the config file resolves against the config file's directory, never the working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from corsproxy.config import load_config
from corsproxy.ops.admin import load_tokens
from tests.support.config import BASE_CONFIG, merge

TOKEN = "relative-token-0123456789abcdef"


def _layout(tmp_path: Path) -> Path:
    """A config directory holding the config and every file it names, by relative path; returns the config."""
    conf = tmp_path / "etc"
    (conf / "tls").mkdir(parents=True)
    (conf / "tls" / "cert.pem").write_text("cert")
    (conf / "tls" / "key.pem").write_text("key")
    (conf / "ca.pem").write_text("ca")
    (conf / "admin-token").write_text(f"ops:{TOKEN}\n")
    (conf / "origins.txt").write_text("https://file.example.com\n")
    data = merge(
        BASE_CONFIG,
        {
            "listen": {"tls_cert": "tls/cert.pem", "tls_key": "./tls/key.pem"},
            "upstream": {"url": "https://127.0.0.1:9", "ca_bundle": "ca.pem"},
            "admin": {"listen": {"host": "127.0.0.1", "port": 0}, "token_file": "admin-token"},
            "store": {"path": "var/origins.lmdb"},
            "origins_file": {"path": "origins.txt"},
        },
    )
    path = conf / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_path = _layout(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config("../etc/config.yaml", env={})
    conf = config_path.parent.resolve()
    assert config.listen.tls_cert == str(conf / "tls/cert.pem")
    assert config.listen.tls_key == str(conf / "tls/key.pem")
    assert config.upstream.ca_bundle == str(conf / "ca.pem")
    assert config.admin.token_file == str(conf / "admin-token")
    assert config.store.path == str(conf / "var/origins.lmdb")
    assert config.origins_file.path == str(conf / "origins.txt")
    assert load_tokens(config.admin, env={}) == {TOKEN: "ops"}


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config_path = _layout(tmp_path)
    data = yaml.safe_load(config_path.read_text())
    data["admin"]["token_file"] = str(config_path.parent / "admin-token")
    config_path.write_text(yaml.safe_dump(data))
    assert load_config(config_path, env={}).admin.token_file == str(config_path.parent / "admin-token")


def test_check_from_another_directory(tmp_path: Path) -> None:
    config_path = _layout(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "corsproxy", "check", "--config", str(config_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "CORSPROXY_ADMIN_TOKEN"},
    )
    assert result.returncode == 0, result.stderr
