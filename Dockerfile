# kvm-memattr: a small, non-root image serving the API on port 8000.
# The base is a build argument so the image also builds from a locally made base
# (scripts/docker-smoke.sh) where official images cannot be pulled.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY app ./app
# The client's own import name (kvm_memattr_client), mapped onto app/client and app/models.
COPY client/kvm_memattr_client ./client/kvm_memattr_client
# Every dependency pinned (scripts/update-constraints.sh): the same image whenever it is built.
RUN python3 -m venv /opt/kvm-memattr \
    && /opt/kvm-memattr/bin/pip install --no-cache-dir --disable-pip-version-check -c constraints.txt .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kvm-memattr" \
      org.opencontainers.image.description="A virtual KVM memory-attribute controller behind a REST API"
# The state directory exists and belongs to the service, so a named volume mounted there (it takes
# the image's ownership when first created) is writable by uid 10001.
RUN groupadd --system --gid 10001 kvm-memattr \
    && useradd --system --uid 10001 --gid kvm-memattr --home-dir /var/lib/kvm-memattr --create-home kvm-memattr \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/kvm-memattr/state
COPY --from=build /opt/kvm-memattr /opt/kvm-memattr
ENV PATH=/opt/kvm-memattr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KVM_MEMATTR_HOST=0.0.0.0 \
    KVM_MEMATTR_PORT=8000
USER 10001:10001
WORKDIR /var/lib/kvm-memattr
EXPOSE 8000
# Python is already in the image: no curl or wget needed for the check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('KVM_MEMATTR_PORT', '8000')}/healthz\", timeout=2)"]
# One worker: VM state lives in this process. SIGTERM shuts down gracefully.
STOPSIGNAL SIGTERM
ENTRYPOINT ["kvm-memattr", "serve"]
