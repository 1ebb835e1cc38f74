#!/usr/bin/env bash
# Installs what hsmseal's build, demo and tests need on a fresh Debian machine:
# SoftHSM2 (the development HSM) and OpenSC's pkcs11-tool (for inspecting
# tokens by hand; tests/cli_backup.rs reads restored keys' attributes with it). Extra Debian packages can be named as arguments
# (the PostgreSQL test and the benchmarks add theirs).
# Idempotent: installs only what is missing.
set -euo pipefail

want=(softhsm2 opensc "$@")
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
