"""corsproxy: a CORS-enforcing reverse proxy.

The public API is small on purpose: the CLI is the product, these names are for embedding and tests.

The names are imported on first use, so that importing a pure module (``corsproxy.core.*``) does not drag in the
configuration loader and its YAML parser through this package's ``__init__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corsproxy.config import ConfigError, load_config, parse_config
    from corsproxy.core.decision import CorsEngine, Decision, Kind, Reason
    from corsproxy.core.origin import parse_origin_entry, parse_request_origin
    from corsproxy.core.settings import Config

__all__ = [
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
]

__version__ = "0.1.0"

_HOMES = {
    "Config": "corsproxy.core.settings",
    "ConfigError": "corsproxy.config",
    "load_config": "corsproxy.config",
    "parse_config": "corsproxy.config",
    "CorsEngine": "corsproxy.core.decision",
    "Decision": "corsproxy.core.decision",
    "Kind": "corsproxy.core.decision",
    "Reason": "corsproxy.core.decision",
    "parse_origin_entry": "corsproxy.core.origin",
    "parse_request_origin": "corsproxy.core.origin",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'corsproxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
