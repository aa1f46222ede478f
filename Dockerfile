# corsproxy container image: non-root, read-only-root-filesystem friendly, SIGTERM-draining PID 1.
#
#   docker build -t corsproxy .
#   docker run --read-only --tmpfs /tmp -v corsproxy-data:/var/lib/corsproxy \
#     -e CORSPROXY_UPSTREAM=http://api:8000 -e CORSPROXY_ADMIN_TOKEN=$(openssl rand -hex 32) \
#     -p 8080:8080 -p 127.0.0.1:9090:9090 --stop-timeout 40 corsproxy
#
# With podman: `podman build --format docker -t corsproxy .` (the default OCI format has no health check: it is
# dropped).
#
# Writable at run time: /var/lib/corsproxy (the LMDB store, a volume) and /tmp (gunicorn's heartbeat files and the
# Prometheus multiprocess directory; mount a tmpfs there with a read-only root). Everything else may be read-only.

FROM python:3.11-slim AS build
WORKDIR /src
# Dependencies come from pyproject.toml; lmdb and the rest install from wheels, so no compiler is needed. The speed
# extra brings uvloop, which `serve` runs its workers on when present: without it the image would serve on asyncio.
COPY pyproject.toml README.md ./
COPY corsproxy ./corsproxy
RUN python -m venv /opt/corsproxy \
    && /opt/corsproxy/bin/pip install --no-cache-dir --disable-pip-version-check ".[speed]" \
    && /opt/corsproxy/bin/python -m compileall -q /opt/corsproxy

FROM python:3.11-slim
LABEL org.opencontainers.image.title="corsproxy" \
      org.opencontainers.image.description="A CORS-enforcing reverse proxy"
RUN groupadd --system --gid 10001 corsproxy \
    && useradd --system --uid 10001 --gid corsproxy --no-create-home --home-dir /var/lib/corsproxy corsproxy \
    && mkdir -p /etc/corsproxy /var/lib/corsproxy \
    && chown corsproxy:corsproxy /var/lib/corsproxy
COPY --from=build /opt/corsproxy /opt/corsproxy
COPY deploy/config.yaml /etc/corsproxy/config.yaml

ENV PATH="/opt/corsproxy/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    CORSPROXY_CONFIG=/etc/corsproxy/config.yaml

USER 10001:10001
WORKDIR /var/lib/corsproxy
VOLUME ["/var/lib/corsproxy"]
# 8080: the proxied port. 9090: the admin API (/healthz, /readyz, /metrics; the rest needs the admin token).
EXPOSE 8080 9090

# /healthz needs no token; python is already in the image, so no curl.
HEALTHCHECK --interval=15s --timeout=4s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=3).status != 200)"]

# Exec form: the gunicorn arbiter is PID 1 and gets SIGTERM itself; it stops accepting, lets every worker finish its
# in-flight requests for up to limits.drain_timeout, then exits 0. Give `docker stop` more than that (--stop-timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["corsproxy"]
CMD ["serve", "--config", "/etc/corsproxy/config.yaml"]
