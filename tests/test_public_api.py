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
