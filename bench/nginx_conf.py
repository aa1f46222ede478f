"""nginx configurations for the benchmark: the static upstream, and the baseline that answers preflights and proxies.

Both are written to be fair to nginx ("carefully configured"): one worker (one core), access log off, keep-alive to
the client and to the upstream, an exact-match ``map`` for origins (a hash lookup, like corsproxy's store), sendfile
for static files, no disk buffering of proxied bodies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["NGINX", "proxy_conf", "upstream_conf"]

NGINX = "/usr/sbin/nginx"


def _main(prefix: Path, http: str) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""  # the temp dirs are private to the benchmark's user
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "\n".join(f"    {kind}_temp_path {prefix / (kind + '_temp')};" for kind in kinds)
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    server_tokens off;
{temp}
{http}
}}
"""


def upstream_conf(prefix: Path, port: int, docroot: Path, sink_port: int) -> str:
    """Static files from ``docroot``; ``/upload`` goes to the aiohttp sink, which reads the whole body before it
    answers (nginx's own ``return`` would answer before the body has arrived)."""
    return _main(
        prefix,
        f"""    upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {docroot};
        default_type application/json;
        location = /upload {{
            client_max_body_size 0;
            client_body_buffer_size 512k;
            proxy_request_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://sink;
        }}
    }}""",
    )


def proxy_conf(
    prefix: Path, preflight_port: int, proxy_port: int, upstream_port: int, origins: Sequence[str], methods: str
) -> str:
    """Port ``preflight_port`` answers preflights like corsproxy (204 + the same headers, 403 for a refused origin);
    ``proxy_port`` forwards to the upstream, adding the actual-response CORS headers for an allowed origin."""
    entries = "\n".join(f'        "{origin}" $http_origin;' for origin in origins)
    return _main(
        prefix,
        f"""    map $http_origin $cors_allow_origin {{
        default "";
{entries}
    }}
    upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{preflight_port} backlog=1024;
        location / {{
            add_header Vary "Origin, Access-Control-Request-Method, Access-Control-Request-Headers" always;
            add_header Access-Control-Allow-Origin $cors_allow_origin always;
            add_header Access-Control-Allow-Credentials $cors_allow_credentials always;
            add_header Access-Control-Allow-Methods $cors_allow_methods always;
            add_header Access-Control-Allow-Headers $cors_allow_headers always;
            add_header Access-Control-Max-Age $cors_max_age always;
            set $cors_allow_credentials "";
            set $cors_allow_methods "";
            set $cors_allow_headers "";
            set $cors_max_age "";
            if ($cors_allow_origin = "") {{ return 403; }}
            set $cors_allow_credentials true;
            set $cors_allow_methods "{methods}";
            set $cors_allow_headers $http_access_control_request_headers;
            set $cors_max_age 600;
            return 204;
        }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port} backlog=1024;
        client_max_body_size 0;
        client_body_buffer_size 512k;  # with proxy_request_buffering off: larger reads and writes of an upload
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering on;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
            proxy_hide_header Access-Control-Allow-Origin;
            add_header Vary Origin always;
            add_header Access-Control-Allow-Origin $cors_allow_origin always;
        }}
    }}""",
    )
