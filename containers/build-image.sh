#!/usr/bin/env bash
# Builds the minimal SoftHSM2 image the container tests use, if it is not
# there yet: Debian 12 "minbase" (essential packages only) plus softhsm2 and
# p11-kit, and nothing else (no Rust, no build tools, no hsmseal).
#
# There is no container registry here, so the root filesystem is made with
# mmdebstrap from the host's own apt sources (the mirror apt already uses)
# and imported with `podman import`. The image carries a label with the
# hash of this script, so changing the recipe rebuilds it.
#
# Usage: containers/build-image.sh [IMAGE]   (default localhost/hsmseal-softhsm2:test)
set -euo pipefail

image=${1:-localhost/hsmseal-softhsm2:test}
here=$(cd "$(dirname "$0")" && pwd)
recipe=$(sha256sum "$here/build-image.sh" | cut -c1-16)

if podman image exists "$image"; then
    have=$(podman image inspect --format '{{ index .Config.Labels "hsmseal.recipe" }}' "$image" 2>/dev/null || true)
    if [ "$have" = "$recipe" ]; then
        echo "build-image: $image is up to date" >&2
        exit 0
    fi
    echo "build-image: $image was built from another recipe; rebuilding" >&2
fi

# The host's apt sources, so the image comes from the mirror apt already
# uses (deb822 .sources or a classic sources.list); else Debian's default.
sources=()
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sources=(/etc/apt/sources.list.d/debian.sources)
elif [ -s /etc/apt/sources.list ]; then
    sources=(/etc/apt/sources.list)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build-image: mmdebstrap bookworm minbase + softhsm2, p11-kit" >&2
mmdebstrap --quiet --variant=minbase --include=softhsm2,p11-kit \
    bookworm "$work/rootfs.tar" "${sources[@]}"
podman import --quiet \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL hsmseal.recipe=$recipe" \
    "$work/rootfs.tar" "$image" >/dev/null
echo "build-image: built $image" >&2
