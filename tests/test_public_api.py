"""The package's public API is small and explicit: exactly these names, each importable."""

from __future__ import annotations

import corsproxy

PUBLIC = {
    "Config",
    "ConfigError",
    "CorsEngine",
    "Decision",
    "Kind",
    "Reason",
    "__version__",
    "load_config",
    "parse_config",
    "parse_origin_entry",
    "parse_request_origin",
}


def test_public_names() -> None:
    assert set(corsproxy.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(corsproxy, name) is not None


def test_pure_core_imports_neither_aiohttp_nor_lmdb() -> None:
    """STYLE: the decision core is plain functions and dataclasses, testable without sockets or a store."""
    import subprocess
    import sys

    code = (
        "import sys; import corsproxy.origin, corsproxy.header_list, corsproxy.decision, corsproxy.config, "
        "corsproxy.explain, corsproxy.origin_lines, corsproxy.regex_import, corsproxy.forwarding; "
        "print(sorted(m for m in ('aiohttp', 'lmdb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == "[]"
