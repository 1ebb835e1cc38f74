#!/usr/bin/env bash
# Counts every PKCS#11 call hsmseal makes, per operation, for docs/SCALE.md:
# each run goes through OpenSC's pkcs11-spy (a logging PKCS#11 module in
# front of SoftHSM2), and the calls in its log are counted by function.
# On a network HSM each of these calls is (at most) one round trip, so this is
# what a fleet asks of its HSM. Prints a Markdown table on stdout.
#
# Usage: scripts/spark/hsm-ops.sh [HSMSEAL_BINARY]     (env: HSM_OPS_ROWS=1000000)
#
# Columns: "crypto operations" = C_EncryptInit + C_DecryptInit + C_SignInit,
# one per wrap, unwrap or derivation (what `hsm_calls` in the --json summary
# counts); "crypto calls" = those plus their C_Encrypt/C_Decrypt/C_Sign calls
# (two per operation: the first asks for the output size); "setup" =
# everything else (module and session set-up, login, key lookup, attribute
# checks: once per process or per worker, not per file or cell).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HSMSEAL=${1:-$ROOT/target/release/hsmseal}
HSMSEAL=$(realpath "$HSMSEAL")
ROWS=${HSM_OPS_ROWS:-1000000}
SPY=""
for p in /usr/lib/x86_64-linux-gnu/pkcs11-spy.so /usr/lib/*/pkcs11-spy.so /usr/lib/pkcs11-spy.so; do
    [[ -f $p ]] && { SPY=$p; break; }
done
if [[ -z $SPY ]]; then
    "$ROOT/scripts/install-deps.sh" opensc
    SPY=$(ls /usr/lib/*/pkcs11-spy.so | head -n 1)
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-hsm-ops.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tokens" "$WORK/tree"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" >"$WORK/softhsm2.conf"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
softhsm2-util --init-token --free --label ops --pin 4321 --so-pin 87654321 >/dev/null
unset HSMSEAL_CONFIG HSMSEAL_PIN_FILE HSMSEAL_KEY HSMSEAL_JOBS HSMSEAL_AUDIT_LOG || true
export HSMSEAL_TOKEN=ops HSMSEAL_PIN=4321
export HSMSEAL_PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so
"$HSMSEAL" key create pii >/dev/null
for d in $(seq 10); do
    mkdir -p "$WORK/tree/d$d"
    for f in $(seq 10); do head -c 4096 /dev/urandom >"$WORK/tree/d$d/f$f"; done
done
head -c $((64 * 1024 * 1024)) /dev/zero >"$WORK/big.bin"
python3 "$ROOT/scripts/spark/check.py" gen "$ROWS" "$WORK/users.jsonl" >/dev/null
COLS=(-f jsonl -c name,email,ssn --row-id id --context ops.users)

# spy NAME CMD...: runs CMD through pkcs11-spy, prints one table row.
spy() {
    local name=$1; shift
    rm -f "$WORK/spy.log"
    PKCS11SPY=/usr/lib/softhsm/libsofthsm2.so PKCS11SPY_OUTPUT=$WORK/spy.log HSMSEAL_PKCS11_MODULE=$SPY \
        "$@" >/dev/null 2>"$WORK/err.txt" || { cat "$WORK/err.txt" >&2; echo "hsm-ops: $name failed" >&2; exit 1; }
    grep -oE '^[0-9]+: C_[A-Za-z]+' "$WORK/spy.log" | awk '{print $2}' | sort | uniq -c \
        | awk -v name="$name" '
            { total += $1
              if ($2 ~ /^C_(Encrypt|Decrypt|Sign)Init$/) ops += $1
              if ($2 ~ /^C_(Encrypt|Decrypt|Sign)(Init)?$/) crypto += $1; else setup += $1
              if ($2 == "C_Login") login += $1
              if ($2 == "C_OpenSession") sessions += $1 }
            END { printf "| %s | %d | %d | %d | %d | %d | %d |\n", name, total, ops + 0, crypto + 0, setup + 0, sessions + 0, login + 0 }'
}

echo "| run | PKCS#11 calls | crypto operations | crypto calls | setup calls | C_OpenSession | C_Login |"
echo "|---|---:|---:|---:|---:|---:|---:|"
spy "encrypt 1 file (64 MiB)" "$HSMSEAL" -q encrypt -k pii -o "$WORK/big.hseal" "$WORK/big.bin"
spy "encrypt -r 100 files (4 KiB), --jobs 1" "$HSMSEAL" -q --jobs 1 encrypt -k pii -r "$WORK/tree"
spy "verify -r 100 files, --jobs 2" "$HSMSEAL" -q --jobs 2 verify -r "$WORK/tree"
"$HSMSEAL" -q key rotate pii >/dev/null
spy "rewrap -r 100 files, --jobs 1" "$HSMSEAL" -q --jobs 1 rewrap -r "$WORK/tree"
spy "rewrap -r 100 files again (all current)" "$HSMSEAL" -q --jobs 1 rewrap -r "$WORK/tree"
spy "key rotate --if-older-than 30d (not due)" "$HSMSEAL" -q key rotate pii --if-older-than 30d
spy "columns encrypt $ROWS rows x 3, --jobs 1" "$HSMSEAL" -q --jobs 1 columns encrypt "${COLS[@]}" -k pii \
    -i "$WORK/users.jsonl" -o "$WORK/users.enc.jsonl"
spy "columns encrypt $ROWS rows x 3, --jobs 2" "$HSMSEAL" -q --jobs 2 columns encrypt "${COLS[@]}" -k pii \
    -i "$WORK/users.jsonl" -o /dev/null
spy "columns decrypt $ROWS rows x 3, --jobs 1" "$HSMSEAL" -q --jobs 1 columns decrypt "${COLS[@]}" \
    -i "$WORK/users.enc.jsonl" -o /dev/null
