#!/usr/bin/env bash
# `BENCH_ONLY=recipients scripts/bench.sh` (or this script directly): bulk
# encrypt of 10,000 small files with `--recipient` (RSA-OAEP on the host,
# no token) against the same with an AES KWK (one C_Encrypt per file), and
# decrypt of both (C_Decrypt with AES-GCM, resp. RSA-OAEP, in SoftHSM2);
# and the same with an ec-p256 recipient (ECDH on the host; C_DeriveKey
# with CKM_ECDH1_DERIVE in SoftHSM2 to decrypt).
# Prints a Markdown table of medians of BENCH_REPS (default 3) interleaved
# rounds. Never used as a test: no thresholds.
#
#   scripts/bench-recipients.sh [path/to/hsmseal]   (env: BENCH_FILES=10000,
#                                                    BENCH_REPS=3, BENCH_JOBS)
set -euo pipefail
BIN=$(realpath "${1:-target/release/hsmseal}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/bench-out/recipients"
N=${BENCH_FILES:-10000}
REPS=${BENCH_REPS:-3}
JOBS=${BENCH_JOBS:-$(nproc)}
rm -rf "$OUT"; mkdir -p "$OUT/tokens" "$OUT/tree"; cd "$OUT"
unset HSMSEAL_CONFIG HSMSEAL_PKCS11_MODULE HSMSEAL_TOKEN HSMSEAL_PIN HSMSEAL_PIN_FILE HSMSEAL_KEY || true
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$OUT" > softhsm2.conf
export SOFTHSM2_CONF=$OUT/softhsm2.conf HSMSEAL_TOKEN=bench HSMSEAL_PIN=bench-pin-1234
softhsm2-util --init-token --free --label bench --pin "$HSMSEAL_PIN" --so-pin so-pin-1234 >/dev/null
"$BIN" key create bench >/dev/null
"$BIN" key create dr --type rsa-oaep >/dev/null
"$BIN" key export-public dr > dr.pub
"$BIN" key create ec --type ec-p256 >/dev/null
"$BIN" key export-public ec > ec.pub
# 10,000 files of 1-4 KiB.
for i in $(seq "$N"); do head -c $((1024 + (i % 4) * 1024)) /dev/urandom > "tree/f$i"; done

: > raw.txt
run() { # NAME CMD...
    local name=$1; shift
    local t0 t1
    t0=$(date +%s.%N); "$@" >/dev/null 2>err.txt || { cat err.txt >&2; exit 1; }; t1=$(date +%s.%N)
    echo "$name $(echo "$t1 - $t0" | bc)" >> raw.txt
    echo "$name: $(echo "$t1 - $t0" | bc)s" >&2
}
for rep in $(seq "$REPS"); do
    rm -rf aes rcp ecp dec-aes dec-rcp dec-ecp
    run "encrypt-aes" "$BIN" --jobs "$JOBS" encrypt --key bench -r tree --output-dir aes
    # Recipient only: no module, token or PIN in the environment.
    run "encrypt-recipient" env -u HSMSEAL_PIN -u HSMSEAL_TOKEN -u SOFTHSM2_CONF \
        HSMSEAL_PKCS11_MODULE=/nonexistent.so "$BIN" --jobs "$JOBS" encrypt --recipient dr.pub -r tree --output-dir rcp
    run "encrypt-ec" env -u HSMSEAL_PIN -u HSMSEAL_TOKEN -u SOFTHSM2_CONF \
        HSMSEAL_PKCS11_MODULE=/nonexistent.so "$BIN" --jobs "$JOBS" encrypt --recipient ec.pub -r tree --output-dir ecp
    run "decrypt-aes" "$BIN" --jobs "$JOBS" decrypt -r aes --output-dir dec-aes
    run "decrypt-recipient" "$BIN" --jobs "$JOBS" decrypt -r rcp --output-dir dec-rcp
    run "decrypt-ec" "$BIN" --jobs "$JOBS" decrypt -r ecp --output-dir dec-ecp
done
median() { grep "^$1 " raw.txt | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ea=$(median encrypt-aes); er=$(median encrypt-recipient)
da=$(median decrypt-aes); dr=$(median decrypt-recipient)
ee=$(median encrypt-ec); de=$(median decrypt-ec)
echo "| $N files, --jobs $JOBS | AES KWK (s) | --recipient RSA-3072 (s) | ratio | --recipient EC-P256 (s) | ratio |"
echo "|---|---:|---:|---:|---:|---:|"
echo "| encrypt | $ea | $er | $(echo "scale=2; $er / $ea" | bc) | $ee | $(echo "scale=2; $ee / $ea" | bc) |"
echo "| decrypt | $da | $dr | $(echo "scale=2; $dr / $da" | bc) | $de | $(echo "scale=2; $de / $da" | bc) |"
