#!/usr/bin/env bash
# `make bench`: hsmseal side by side with its peers, in one run, on this
# machine; writes docs/PERFORMANCE.md. Never used as a test: no thresholds.
#
#   scripts/bench.sh [path/to/hsmseal]      (env: BENCH_SIZE_MIB=1024, BENCH_BIG_MIB=4096)
#
# Files: a 1 GiB file from the page cache to a file, encrypted and decrypted by
# hsmseal, age (X25519 recipient), openssl enc -aes-256-ctr (no
# authentication at all) and gpg --symmetric AES256 without compression;
# wall time, CPU time and peak RSS from /usr/bin/time. Then hsmseal's peak RSS
# on a 4 GiB file. Then bulk runs over a tree of 10,000 small files
# (scripts/bench-bulk.sh) and the column benchmarks (scripts/bench-columns.sh).
set -euo pipefail
BIN=$(realpath "${1:-target/release/hsmseal}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
BIG_MIB=${BENCH_BIG_MIB:-4096}
OUT="$ROOT/bench-out"
"$ROOT/scripts/install-deps.sh" age gnupg openssl time
rm -rf "$OUT"; mkdir -p "$OUT"; cd "$OUT"

# A private SoftHSM2 token for the benchmark.
unset HSMSEAL_CONFIG HSMSEAL_PKCS11_MODULE HSMSEAL_TOKEN HSMSEAL_PIN HSMSEAL_PIN_FILE HSMSEAL_KEY || true
mkdir tokens
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$OUT" > softhsm2.conf
export SOFTHSM2_CONF=$OUT/softhsm2.conf HSMSEAL_TOKEN=bench HSMSEAL_PIN=bench-pin-1234
softhsm2-util --init-token --free --label bench --pin "$HSMSEAL_PIN" --so-pin so-pin-1234 >/dev/null
"$BIN" key create bench >/dev/null

head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > input.bin
cat input.bin > /dev/null   # into the page cache

age-keygen -o age.key 2>/dev/null
AGE_RECIPIENT=$(age-keygen -y age.key)
KEYHEX=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
IVHEX=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "bench-passphrase" > gpg.pass
export GNUPGHOME=$OUT/gnupg; mkdir -m 700 "$GNUPGHOME"

# measure TOOL OP CMD...: runs CMD under /usr/bin/time, appends a raw result.
measure() {
    local tool=$1 op=$2; shift 2
    sync
    /usr/bin/time -f '%e %U %S %M' -o time.txt "$@" >/dev/null 2>err.txt || { cat err.txt >&2; echo "bench: $tool $op failed" >&2; exit 1; }
    read -r wall user sys rss < time.txt
    echo "$tool|$op|$wall|$user|$sys|$rss" >> raw.txt
    echo "$tool $op: ${wall}s wall" >&2
}

# Disk write speed on these machines varies a lot from second to second, so
# every tool runs REPS times, interleaved, and the table shows the median.
REPS=${BENCH_REPS:-3}
: > raw.txt
for rep in $(seq "$REPS"); do
    rm -f enc.hseal enc.age enc.ossl enc.gpg
    measure hsmseal encrypt "$BIN" encrypt --key bench -o enc.hseal input.bin
    measure hsmseal decrypt "$BIN" decrypt --force -o dec.hsmseal.bin enc.hseal
    cmp input.bin dec.hsmseal.bin
    measure "age (X25519)" encrypt age -r "$AGE_RECIPIENT" -o enc.age input.bin
    measure "age (X25519)" decrypt age -d -i age.key -o dec.age.bin enc.age
    cmp input.bin dec.age.bin
    measure "openssl enc -aes-256-ctr" encrypt openssl enc -aes-256-ctr -K "$KEYHEX" -iv "$IVHEX" -in input.bin -out enc.ossl
    measure "openssl enc -aes-256-ctr" decrypt openssl enc -d -aes-256-ctr -K "$KEYHEX" -iv "$IVHEX" -in enc.ossl -out dec.ossl.bin
    cmp input.bin dec.ossl.bin
    measure "gpg --symmetric AES256" encrypt gpg --batch --yes --pinentry-mode loopback --passphrase-file gpg.pass --symmetric --cipher-algo AES256 --compress-algo none -o enc.gpg input.bin
    measure "gpg --symmetric AES256" decrypt gpg --batch --yes --pinentry-mode loopback --passphrase-file gpg.pass -d -o dec.gpg.bin enc.gpg
    cmp input.bin dec.gpg.bin
    rm -f dec.*.bin
done
FILE_TABLE=$(python3 - "$SIZE_MIB" <<'PY'
import sys, statistics
size = int(sys.argv[1])
rows = {}
for line in open("raw.txt"):
    tool, op, wall, user, sys_, rss = line.strip().split("|")
    rows.setdefault((tool, op), []).append((float(wall), float(user) + float(sys_), int(rss)))
med = {}
for (tool, op), runs in rows.items():
    walls = sorted(r[0] for r in runs)
    m = statistics.median(walls)
    cpu = statistics.median(r[1] for r in runs)
    med[(tool, op)] = m
    print(f"| {tool} | {op} | {m:.2f} | {walls[0]:.2f} | {cpu:.2f} | {size / m:.0f} | {max(r[2] for r in runs) // 1024} |")
h = {op: med[("hsmseal", op)] for op in ("encrypt", "decrypt")}
print()
for op in ("encrypt", "decrypt"):
    print(f"hsmseal {op} is {med[('age (X25519)', op)] / h[op]:.2f}x as fast as age and "
          f"{med[('openssl enc -aes-256-ctr', op)] / h[op]:.2f}x as fast as openssl enc -aes-256-ctr (median wall times).  ")
PY
)
rm -f enc.age enc.ossl enc.gpg

# Rotation: header-only rewrap costs the same for 1 MiB and 1 GiB; compare
# with --reencrypt (decrypt + encrypt with a fresh data key) on 1 GiB.
"$BIN" key create bench2 >/dev/null
head -c $((1024 * 1024)) /dev/urandom > small.bin
"$BIN" -q encrypt --key bench -o small.hseal small.bin
# Wall seconds of a command, from a nanosecond clock (/usr/bin/time has 10 ms steps).
timed() {
    local s e
    s=$(date +%s%N)
    "$@" >/dev/null 2>err.txt || { cat err.txt >&2; exit 1; }
    e=$(date +%s%N)
    awk -v a="$s" -v b="$e" 'BEGIN{printf "%.4f", (b - a) / 1e9}'
}
# Median of 9 rotations, moving the file between two keys each time.
median_rotate() {
    local f=$1 k t=()
    for i in 1 2 3 4 5 6 7 8 9; do
        if [ $((i % 2)) -eq 1 ]; then k=bench2; else k=bench; fi
        t+=("$(timed "$BIN" -q rotate --key "$k" "$f")")
    done
    printf '%s\n' "${t[@]}" | sort -n | sed -n 5p
}
ROT_1M=$(median_rotate small.hseal)
ROT_1G=$(median_rotate enc.hseal)
REENC_1G=$(timed "$BIN" -q rotate --reencrypt --key bench enc.hseal)
"$BIN" -q verify enc.hseal small.hseal
rm -f enc.hseal small.hseal small.bin

# Peak memory on a much bigger file (flat memory claim).
head -c $((BIG_MIB * 1024 * 1024)) /dev/zero > big.bin
/usr/bin/time -f '%e %M' -o time.txt "$BIN" encrypt --key bench -o big.hseal big.bin
read -r BIG_ENC_WALL BIG_ENC_RSS < time.txt
/usr/bin/time -f '%e %M' -o time.txt "$BIN" decrypt -o big.out big.hseal
read -r BIG_DEC_WALL BIG_DEC_RSS < time.txt
cmp big.bin big.out
rm -f big.bin big.hseal big.out

BULK_MD=$("$ROOT/scripts/bench-bulk.sh" "$BIN")
COLUMNS_MD=""
if [ -x "$ROOT/scripts/bench-columns.sh" ]; then
    COLUMNS_MD=$("$ROOT/scripts/bench-columns.sh" "$BIN")
fi

CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
    echo "# Performance"
    echo
    echo "Produced by \`make bench\` (\`scripts/bench.sh target/release/hsmseal\`) on $(date -u +%Y-%m-%d):"
    echo "$(nproc) cores ($CPU_MODEL), $(free -g | awk '/Mem:/{print $2}') GiB RAM, SoftHSM2 $(softhsm2-util --version)."
    echo "All tools ran in the same run on the same input. Disk writes on these machines vary widely from run to run"
    echo "(the same openssl command took 1.3 s to 2.3 s within minutes), so compare medians within one run only."
    echo
    echo "## Files: ${SIZE_MIB} MiB from the page cache to a file"
    echo
    echo "Input: ${SIZE_MIB} MiB of random bytes, read once before timing so it is in the page cache; output to a file on the same disk."
    echo "CPU = user + system seconds. Peak = maximum resident set size."
    echo
    echo "Each tool ran $REPS times, interleaved with the others; median and fastest wall time shown."
    echo
    echo "| tool | operation | median wall s | fastest wall s | CPU s | MiB/s (median) | peak MiB |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    echo "$FILE_TABLE"
    echo
    echo "Versions: $(age --version 2>&1 | head -1) (age), $(openssl version), $(gpg --version | head -1)."
    echo "openssl enc -aes-256-ctr does not authenticate anything; age and gpg do; hsmseal authenticates every 16 KiB chunk and makes one HSM call per file."
    echo
    echo "## Rotation"
    echo
    echo "\`hsmseal rotate\` rewrites the 1024-byte header only (it authenticates the data key against the payload's"
    echo "commitment and final chunk, then writes and fsyncs the new envelope and clears the old one)."
    echo "\`--reencrypt\` decrypts and re-encrypts the whole payload under a new data key. Whole-process wall times,"
    echo "process start, PKCS#11 module load and token login included (a few milliseconds of every run)."
    echo
    echo "| operation | wall s |"
    echo "|---|---:|"
    echo "| rotate a 1 MiB file (median of 9) | $ROT_1M |"
    echo "| rotate a ${SIZE_MIB} MiB file (median of 9) | $ROT_1G |"
    echo "| rotate --reencrypt a ${SIZE_MIB} MiB file | $REENC_1G |"
    echo
    echo "Ratio rotate / re-encrypt on ${SIZE_MIB} MiB: $(awk -v a="$ROT_1G" -v b="$REENC_1G" 'BEGIN{ if (b > 0) printf "%.4f", a/b; else print "-" }')."
    echo
    echo "$BULK_MD"
    echo
    echo "## Memory on a ${BIG_MIB} MiB file"
    echo
    echo "| operation | wall s | peak MiB |"
    echo "|---|---:|---:|"
    echo "| hsmseal encrypt | $BIG_ENC_WALL | $((BIG_ENC_RSS / 1024)) |"
    echo "| hsmseal decrypt | $BIG_DEC_WALL | $((BIG_DEC_RSS / 1024)) |"
    echo
    if [ -n "$COLUMNS_MD" ]; then
        echo "$COLUMNS_MD"
    fi
    if [ -x "$ROOT/scripts/bench-pg.sh" ]; then echo; "$ROOT/scripts/bench-pg.sh" "$BIN"; fi
} > "$ROOT/docs/PERFORMANCE.md"
rm -f input.bin
echo "bench: wrote docs/PERFORMANCE.md" >&2
