#!/usr/bin/env bash
# pyarrow round trip of `hsmseal columns --format parquet` (issue 15 item 1;
# scripts/parquet-pyarrow-check.py says what is checked) against a fresh
# SoftHSM2 token in a temp dir. pyarrow comes from PyPI into a venv under
# target/pyarrow-venv, reused when pyarrow already imports there.
#
# Usage: scripts/parquet-pyarrow.sh [HSMSEAL_BINARY]   (default: target/release/hsmseal)
# Environment: PARQUET_PYARROW_VENV (default target/pyarrow-venv).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HSMSEAL=${1:-target/release/hsmseal}
[[ -x $HSMSEAL ]] || { echo "parquet-pyarrow: $HSMSEAL is not an executable (build it: cargo build --release)" >&2; exit 2; }
HSMSEAL=$(cd "$(dirname "$HSMSEAL")" && pwd)/$(basename "$HSMSEAL")
VENV=${PARQUET_PYARROW_VENV:-$ROOT/target/pyarrow-venv}
T_START=$(date +%s)

if ! "$VENV/bin/python" -c 'import pyarrow' 2>/dev/null; then
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        "$ROOT/scripts/install-deps.sh" python3-venv
        python3 -m venv "$VENV"
    fi
    PIP_NO_CACHE_DIR=1 "$VENV/bin/pip" install -q --disable-pip-version-check pyarrow
fi

SOFTHSM_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
if ! command -v softhsm2-util >/dev/null || [[ ! -f $SOFTHSM_MODULE ]]; then
    "$ROOT/scripts/install-deps.sh"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-pyarrow.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" >"$WORK/softhsm2.conf"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
softhsm2-util --init-token --free --label hsmseal-pyarrow --pin 4321 --so-pin 87654321 >/dev/null
unset HSMSEAL_CONFIG HSMSEAL_PIN_FILE HSMSEAL_KEY HSMSEAL_JOBS HSMSEAL_AUDIT_LOG || true
export HSMSEAL_PKCS11_MODULE=$SOFTHSM_MODULE HSMSEAL_TOKEN=hsmseal-pyarrow HSMSEAL_PIN=4321
"$HSMSEAL" key create pii >/dev/null
(cd "$WORK" && "$VENV/bin/python" "$ROOT/scripts/parquet-pyarrow-check.py" "$HSMSEAL" "$WORK")
echo "parquet-pyarrow: PASS in $(($(date +%s) - T_START)) s" >&2
