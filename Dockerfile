# syntax=docker/dockerfile:1
# overlay-vici: one image for the master, the agent, report-lease and charon (strongSwan
# 5.9.8 from Debian 12).   docker build -t overlay-vici:0.1.0 .
# scripts/image builds it from a Debian base made locally with debootstrap instead
# (--build-arg BASE=localhost/overlay-vici-base:...), then runs the smoke test tests/image/.
# The master runs as the image's non-root user; the agent pod's charon, agent and modules
# containers run as root with only the capabilities deploy/overlay-vici.yaml grants.

# Any Debian 12 (bookworm) root filesystem: Docker Hub's by default.
ARG BASE=debian:bookworm-slim

# --- build: the package's wheel and every dependency's, for an offline install below ---
FROM ${BASE} AS build
# Debian stable gets security updates under the same release: pin the release (the base
# image), not package versions that the archive drops after each update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /build/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY overlay_vici/ overlay_vici/
COPY templates/ templates/
# Wheels only for the dependencies: the final stage has no compiler, and neither does this.
# Behind a TLS-inspecting proxy, give pip its CA bundle for PyPI as a build secret
# (--secret id=ca-bundle,src=FILE; scripts/image passes the machine's own): a secret is
# never stored in a layer, and this stage is not part of the image anyway.
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && /build/venv/bin/pip wheel --no-cache-dir --wheel-dir /wheels --only-binary=:all: \
        --no-binary=overlay-vici '.[master]'

# --- final ---
FROM ${BASE}
LABEL org.opencontainers.image.title="overlay-vici" \
      org.opencontainers.image.description="IPsec for Calico IPIP traffic: agent, master and strongSwan charon" \
      org.opencontainers.image.licenses="Apache-2.0"
# strongswan-charon: /usr/lib/ipsec/charon; libstrongswan-standard-plugins: openssl and gcm
# (AES-GCM proposals fail without it); kmod: modprobe for the modules init container;
# iptables (iptables-nft by default) and iproute2 for the agent's netfilter work and for
# operators; python3-venv for the virtualenv below (no compiler comes with it).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv \
        strongswan-charon strongswan-swanctl libstrongswan-standard-plugins \
        kmod iptables iproute2 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/overlay-vici/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The wheel installs its templates under the venv's prefix (share/overlay-vici/templates,
# see pyproject.toml); rendering proves they are found.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/overlay-vici \
    && /opt/overlay-vici/bin/pip install --no-cache-dir --no-index --find-links=/wheels \
        'overlay-vici[master]' \
    && overlay-vici render strongswan --vici-socket /run/overlay-vici/charon.vici >/dev/null \
    && overlay-vici mtu 1500
# swanctl's default VICI URI is unix:///var/run/charon.vici (/var/run is /run here); the
# agent pod's charon listens on /run/overlay-vici/charon.vici, the emptyDir it shares with
# the agent. This link serves a plain `docker run`; in Kubernetes /run is an emptyDir and
# the charon container sets STRONGSWAN_CONF (swanctl.socket) and recreates the link.
RUN mkdir -p /run/overlay-vici \
    && ln -s /run/overlay-vici/charon.vici /run/charon.vici \
    && groupadd --system --gid 65532 overlay-vici \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin overlay-vici
# Numeric, so that kubelet can verify runAsNonRoot.
USER 65532:65532
ENTRYPOINT ["overlay-vici"]
CMD ["--help"]
