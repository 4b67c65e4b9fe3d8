#!/usr/bin/env bash
# Stand-in base images for building the Dockerfiles where no registry can be pulled from (CI).
#
#   .ci/images/standin.sh python   # -> localhost/standin-python:<key>   (for python:3.11-slim-bookworm)
#   .ci/images/standin.sh torch    # -> localhost/standin-torch:<key>    (python + CPU torch, for the torch bases)
#
# Prints the image name. A minimal Debian bookworm from debootstrap with python3.11, pip and venv,
# laid out like python:3.11-slim (python and pip on PATH, pip allowed to install system-wide), with
# this host's CA bundle (pip inside a build reaches the registry through it). The torch stand-in adds
# the torch wheel `pip install $TORCH` takes on this host (pip's find-links hold it on disk).
# Images are named by a digest of this script and $TORCH, so buildah's storage (which the CI machine
# keeps) caches them; the debootstrapped tree is cached under $STANDIN_CACHE as a tarball, keyed by its
# recipe (make_rootfs), so a change to the rest of this script does not debootstrap again.
set -euo pipefail
kind="${1:?usage: standin.sh python|torch}"
TORCH="${TORCH:-torch==2.13.0}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${STANDIN_CACHE:-/var/cache/nanogpt-images}"

make_rootfs() {  # make_rootfs DIR: the python:3.11-slim stand-in's files
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$1" "$MIRROR" >&2
  # python:3.11-slim's layout: `python`/`pip` on PATH and no PEP 668 marker.
  rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf /usr/bin/python3 "$1/usr/local/bin/python"
  ln -sf /usr/bin/pip3 "$1/usr/local/bin/pip"
  cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*
}

# The debootstrapped tree is keyed by its recipe alone, the images by this whole script.
rootfs_key="$( (declare -f make_rootfs; echo "$MIRROR") | sha256sum | cut -c1-12)"
key="$(cat "$0" <(echo "$TORCH $MIRROR") | sha256sum | cut -c1-12)"
image="localhost/standin-$kind:$key"
python_image="localhost/standin-python:$key"

if buildah inspect --type image "$image" >/dev/null 2>&1; then
  echo "$image"; exit 0
fi
mkdir -p "$CACHE"
rootfs_tar="$CACHE/bookworm-python-$rootfs_key.tar"
if [ ! -s "$rootfs_tar" ]; then
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  make_rootfs "$root"
  tar -C "$root" -cf "$rootfs_tar.part" . && mv "$rootfs_tar.part" "$rootfs_tar"
  rm -rf "$root"; trap - EXIT
fi

if ! buildah inspect --type image "$python_image" >/dev/null 2>&1; then
  ctr="$(buildah from scratch)"
  buildah add "$ctr" "$rootfs_tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$ctr"
  buildah commit --rm "$ctr" "$python_image" >/dev/null
fi
if [ "$kind" = torch ]; then
  wheels="$(mktemp -d)"
  trap 'rm -rf "$wheels"' EXIT
  # From this host's pip (its find-links or cache) so the stand-in needs no multi-GB download.
  "${PYTHON:-python3}" -m pip download "$TORCH" --no-deps -d "$wheels" >&2
  ctr="$(buildah from "$python_image")"
  buildah copy "$ctr" "$wheels" /tmp/wheels >/dev/null
  # torch's own dependencies (filelock, sympy, ...) come from the registry.
  buildah run --isolation chroot "$ctr" -- sh -c 'pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels' >&2
  buildah commit --rm "$ctr" "$image" >/dev/null
fi
echo "$image"
