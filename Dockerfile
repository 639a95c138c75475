# Keybearer container image.
#
#   docker build -t keybearer .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#     -v "$PWD/config/example.yaml:/etc/keybearer/config.yaml:ro" \
#     -v "$PWD/salt:/run/secrets/keybearer/salt:ro" -e KEYBEARER_SALT_FILE=/run/secrets/keybearer/salt \
#     -e KEYBEARER_LISTEN=0.0.0.0:8080 -e KEYBEARER_ALLOW_UNAUTHENTICATED_LISTEN=true keybearer
#
# The config file is mounted at /etc/keybearer/config.yaml; everything else is
# KEYBEARER_* environment (secrets as KEYBEARER_*_FILE, e.g. a mounted Secret).
# The image listens on loopback by default, which suits a sidecar (same pod,
# same network namespace). To serve other hosts, set KEYBEARER_LISTEN=0.0.0.0:8080;
# without inbound authentication that also takes the explicit
# KEYBEARER_ALLOW_UNAUTHENTICATED_LISTEN=true. See docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtualenv holding Keybearer and its dependencies ------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/keybearer
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# A wheel, then the wheel installed (not an editable or source-tree install).
# Every dependency ships binary wheels, so no compiler is needed even here.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/keybearer/bin/pip install /wheels/keybearer-*.whl \
    && /opt/keybearer/bin/keybearer --help >/dev/null

# --- runtime: the virtualenv on a clean slim base, as a non-root user ---------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="keybearer" \
      org.opencontainers.image.description="Auth sidecar and reverse proxy for MCP servers" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 keybearer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/keybearer --shell /usr/sbin/nologin keybearer \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/keybearer \
    && install -d -m 0755 /etc/keybearer
COPY --from=builder /opt/keybearer /opt/keybearer
ENV PATH=/opt/keybearer/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KEYBEARER_LISTEN=127.0.0.1:8080 \
    KEYBEARER_DATABASE_URL=sqlite:////var/lib/keybearer/keybearer.db
WORKDIR /var/lib/keybearer
USER 10001:10001
EXPOSE 8080
# /ping on the port KEYBEARER_LISTEN names (slim has no curl); no proxy env applies.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; h, _, p = os.environ.get('KEYBEARER_LISTEN', '127.0.0.1:8080').rpartition(':'); h = h.strip('[]'); h = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = '[' + h + ']' if ':' in h else h; u.build_opener(u.ProxyHandler({})).open(f'http://{h}:{p}/ping', timeout=4)"]
ENTRYPOINT ["keybearer"]
CMD ["serve", "--config", "/etc/keybearer/config.yaml"]
