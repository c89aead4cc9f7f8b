# syntax=docker/dockerfile:1
# tlsrelay: one image for the three services (deploy/k8s runs `tlsrelay ingest|policy|deliver`).
#   docker build -t tlsrelay:dev .
#   docker run --rm tlsrelay:dev --help
# Stage 1 builds the wheel and a virtualenv; stage 2 copies the virtualenv onto a clean
# python:3.11-slim (same base, so the venv's interpreter path holds), with no build tools, and
# runs as uid 10001. The Kubernetes manifests mount the config, certificates, an emptyDir for
# data_dir (/var/lib/tlsrelay) and /tmp, and keep the root filesystem read-only.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/tlsrelay
# Dependencies first, every one pinned with its hash by the runtime lock (a layer that changes
# only with the lock), then the code, built with the locked setuptools and installed without
# dependencies: the image holds exactly what tests/test_install.py installs and tests.
COPY requirements/runtime.lock ./requirements/
RUN /opt/tlsrelay/bin/pip install --require-hashes -r requirements/runtime.lock
COPY pyproject.toml ./
COPY services ./services
RUN /opt/tlsrelay/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/tlsrelay/bin/pip install --no-deps /wheels/tlsrelay-*.whl \
 && /opt/tlsrelay/bin/python -m compileall -q /opt/tlsrelay/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tlsrelay" \
      org.opencontainers.image.description="Multi-tenant mail relay: opportunistic TLS by default, enforced TLS by rule"
# A fixed, non-root identity (the manifests' runAsUser/fsGroup 10001), and the directories
# the config expects, owned by it for plain `docker run`.
RUN groupadd --system --gid 10001 tlsrelay \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/tlsrelay --shell /usr/sbin/nologin tlsrelay \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/tlsrelay \
 && install -d -m 0755 /etc/tlsrelay
COPY --from=builder /opt/tlsrelay /opt/tlsrelay
ENV PATH=/opt/tlsrelay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/tlsrelay
USER 10001:10001
# 2525 SMTP, 2587 submission, 2526 inter-region relay; 9101-9103 metrics of ingest/policy/deliver.
EXPOSE 2525 2587 2526 9101 9102 9103
ENTRYPOINT ["tlsrelay"]
CMD ["--help"]
