#!/usr/bin/env bash
# Build a local Debian base image for the Dockerfile's BASE_IMAGE build argument, for machines that
# reach Debian's and PyPI's package registries but no container registry (no python:*-slim pull).
#
#   tests/deploy/make_base_image.sh [TAG]     (default TAG: localhost/jaxllm-test-base:bookworm)
#
# The base holds what python:3.x-slim provides to the Dockerfile: python3 with venv and pip, CA
# certificates, useradd. This host's CA bundle replaces the image's (and pip is pointed at it) so a
# TLS-inspecting egress proxy this machine trusts is trusted inside the build too. Needs root,
# debootstrap and podman.
set -euo pipefail

TAG="${1:-localhost/jaxllm-test-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if podman image exists "$TAG"; then
    echo "base image $TAG exists"
    exit 0
fi
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install $tool)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$MIRROR"

cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
# Apt caches and docs are not needed to build or run the image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
       "$rootfs"/usr/share/man/*

tar -C "$rootfs" -cf "$work/rootfs.tar" .
podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$work/rootfs.tar" "$TAG"
echo "built base image $TAG"
