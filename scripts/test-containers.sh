#!/usr/bin/env bash
# `make test-containers`: the tests whose SoftHSM2 tokens come from
# containers, and the release binary run in a minimal image (README "Tests
# in containers"). Runs as root on Debian 12 (podman rootful; no Docker
# engine or registry needed):
#
# 1. installs podman, runc, mmdebstrap (with their recommended packages);
# 2. builds the image localhost/hsmseal-softhsm2:test if missing
#    (containers/build-image.sh: mmdebstrap + podman import);
# 3. starts podman's Docker-compatible API on a private socket and points
#    DOCKER_HOST (testcontainers) at it;
# 4. builds the release binary without the test feature (the one that
#    ships) for the fresh-image check, then runs tests/containers.rs and,
#    with HSMSEAL_TEST_TOKENS=containers, the HSM tests named in
#    HSMSEAL_CONTAINER_SUITES (every token from its own container);
# 5. on any exit: stops the service by its PID, fails if a test container
#    was left behind (and removes it), removes the socket directory.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
IMAGE=${HSMSEAL_TEST_IMAGE:-localhost/hsmseal-softhsm2:test}
# Host-token suites also run with container tokens (the seam in
# tests/support/token.rs); `HSMSEAL_CONTAINER_SUITES=` runs none.
SUITES=${HSMSEAL_CONTAINER_SUITES-hsm cli_keys cli_files columns_bin}

# 1. Packages. podman's recommended packages are kept (containers-common's
# configuration, catatonit, ...): install-deps.sh installs without them.
./scripts/install-deps.sh
want=(podman uidmap slirp4netns passt fuse-overlayfs runc mmdebstrap)
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || { echo "test-containers: need root to install and run podman: ${missing[*]}" >&2; exit 1; }
    echo "test-containers: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ "$(id -u)" -eq 0 ] || { echo "test-containers: run as root (podman rootful)" >&2; exit 1; }

# Ulimits and runtime this machine needs (see the file).
export CONTAINERS_CONF=$PWD/containers/containers.conf

# 2. The image.
HSMSEAL_TEST_IMAGE=$IMAGE ./containers/build-image.sh "$IMAGE"
export HSMSEAL_TEST_IMAGE=$IMAGE

# 3. podman's API on a socket of our own; stopped by PID on any exit.
run=$(mktemp -d /tmp/hsmseal-podman.XXXXXX)
service_pid=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$service_pid" ]; then
        kill "$service_pid" 2>/dev/null || true
        wait "$service_pid" 2>/dev/null || true
    fi
    # Every test container is removed by the test that started it; one
    # left here is a bug (and is removed so the next run starts clean).
    left=$(podman ps -a -q --filter label=hsmseal.test)
    if [ -n "$left" ]; then
        echo "test-containers: FAIL: containers left behind: $left" >&2
        podman rm -f $left >/dev/null || true
        rc=1
    fi
    if [ "$rc" -ne 0 ] && [ -s "$run/service.log" ]; then
        echo "test-containers: podman service log (last lines):" >&2
        tail -n 20 "$run/service.log" >&2
    fi
    rm -rf "$run"
    [ "$rc" -ne 0 ] || echo "test-containers: ok (service stopped, no container left)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Its log (one "Stopping logger" line per removed container) is shown only
# on failure.
podman system service --time=0 "unix://$run/podman.sock" 2>"$run/service.log" &
service_pid=$!
export DOCKER_HOST=unix://$run/podman.sock
for _ in $(seq 1 200); do
    [ -S "$run/podman.sock" ] && podman --url "$DOCKER_HOST" version >/dev/null 2>&1 && break
    kill -0 "$service_pid" 2>/dev/null || { echo "test-containers: podman system service exited" >&2; exit 1; }
    sleep 0.1
done
podman --url "$DOCKER_HOST" version >/dev/null || { echo "test-containers: podman API did not come up at $DOCKER_HOST" >&2; exit 1; }

# 4. The shipped binary (default features) for the fresh-image check: a
# copy, because the feature build below writes target/release/hsmseal too.
$CARGO build --release --locked
cp target/release/hsmseal "$run/hsmseal"
export HSMSEAL_FRESH_BINARY=$run/hsmseal

$CARGO test --release --locked --features containers --test containers
if [ -n "$SUITES" ]; then
    args=()
    for s in $SUITES; do args+=(--test "$s"); done
    HSMSEAL_TEST_TOKENS=containers $CARGO test --release --locked --features containers "${args[@]}"
fi
