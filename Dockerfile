# spineqprep as a BIDS-App image:   docker run --rm -v /data/bids:/bids:ro -v /data/out:/out IMAGE /bids /out participant
#
# Build (BuildKit is required: default since Docker 23, DOCKER_BUILDKIT=1 on Docker 20.10):
#   docker build -t spineqprep .
# Optional inputs that exist at build time only (neither is stored in any layer or in `docker history`):
#   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt   CA bundle for pip behind a TLS proxy
#   --build-arg TORCH_WHEELS=wheels   folder of the build context holding the torch 2.13.0 CPU wheel;
#                                     without it torch comes from the PyTorch CPU index (TORCH_INDEX_URL)
# Same pins as .ci/run (via the Makefile) and singularity.def: torch==2.13.0, then requirements.lock,
# then the package with --no-deps (tests/test_pins.py checks it).

FROM debian:bookworm-slim AS runtime
# Debian bookworm's Python 3.11 is the interpreter of the virtual environment /opt/venv.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

FROM runtime AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ARG TORCH_WHEELS=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180
# The build context is mounted read-write but its writes (pip's in-tree build) are discarded.
RUN --mount=type=secret,id=pip_cert \
    --mount=type=bind,source=.,target=/src,rw \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    ( if [ -n "$TORCH_WHEELS" ]; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS="/src/$TORCH_WHEELS"; \
      else \
        export PIP_INDEX_URL="$TORCH_INDEX_URL"; \
      fi; \
      pip install --no-deps torch==2.13.0 ); \
    pip install -r /src/requirements.lock; \
    pip install --no-deps --no-build-isolation /src; \
    pip check; \
    rm -rf /root/.cache

FROM runtime
LABEL org.opencontainers.image.title="spineqprep" \
      org.opencontainers.image.description="BIDS-App for quantitative MRI of the lumbar spine (T2, T1rho, T2* maps)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/spineqprep/spineqprep"
COPY --from=build /opt/venv /opt/venv
RUN groupadd --gid 1000 spineqprep \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin spineqprep
# Everything a run writes besides /out goes to /tmp (the default work dir is ./work = /tmp/work), so the
# image runs with --read-only and a tmpfs on /tmp, as any user id; nothing is fetched at run time.
ENV PATH=/opt/venv/bin:$PATH \
    SPINEQPREP_CONTAINER=docker \
    LANG=C.UTF-8 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.matplotlib \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    DENO_DIR=/tmp/.deno \
    NUMBA_CACHE_DIR=/tmp/.numba \
    DENO_NO_UPDATE_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 1000:1000
ENTRYPOINT ["spineqprep"]
CMD ["--help"]
