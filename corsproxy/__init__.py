"""corsproxy: a CORS-enforcing reverse proxy.

The public API is small on purpose: the CLI is the product, these names are for embedding and tests.
"""

from corsproxy.config import Config, ConfigError, load_config, parse_config
from corsproxy.decision import CorsEngine, Decision, Kind, Reason
from corsproxy.origin import parse_origin_entry, parse_request_origin

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
