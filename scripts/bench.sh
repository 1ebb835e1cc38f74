#!/usr/bin/env bash
# `make bench`: hsmseal side by side with its peers, in one run, on this
# machine; writes docs/PERFORMANCE.md. Never used as a test: no thresholds.
#
#   scripts/bench.sh [path/to/hsmseal]      (env: BENCH_SIZE_MIB=1024, BENCH_BIG_MIB=4096,
#                                            BENCH_REPS=5, BENCH_ONLY=files|spark|parquet)
#
# Files: a 1 GiB file from the page cache to a file, encrypted and decrypted by
# hsmseal (default settings), age (X25519 recipient), openssl enc -aes-256-ctr
# (no authentication at all) and gpg --symmetric AES256 without compression,
# next to `cp + sync` (the disk's own limit for writing the same bytes
# durably) and `age ... && sync`; stdin -> /dev/null next to `cat`. Wall time,
# CPU time and peak RSS from /usr/bin/time, the load average with each round.
# Then hsmseal's peak RSS on a 4 GiB file. BENCH_ONLY=files stops there and
# writes bench-out/files.md instead of docs/PERFORMANCE.md. Then bulk runs over a tree of 10,000 small files
# (scripts/bench-bulk.sh) and the column benchmarks (scripts/bench-columns.sh).
set -euo pipefail
# BENCH_ONLY=recipients: only the 10,000-file --recipient vs AES KWK case.
if [ "${BENCH_ONLY:-}" = recipients ]; then
    exec "$(dirname "$0")/bench-recipients.sh" "$@"
fi
BIN=$(realpath "${1:-target/release/hsmseal}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
BIG_MIB=${BENCH_BIG_MIB:-4096}
OUT="$ROOT/bench-out"
# rage (the Rust age), if installed or named: BENCH_RAGE=path.
RAGE=${BENCH_RAGE:-$(command -v rage || true)}
# BENCH_ONLY=spark: only the Spark stage against the CLI (scripts/bench-spark.sh,
# into bench-out/spark.md); not in the default run: it downloads PySpark and
# takes minutes.
# BENCH_ONLY=parquet: only the Parquet column case (scripts/bench-parquet.sh,
# into bench-out/parquet.md; 1 M and 4 M rows, pyarrow in target/pyarrow-venv).
if [ "${BENCH_ONLY:-}" = parquet ]; then
    mkdir -p "$OUT"
    "$ROOT/scripts/bench-parquet.sh" "$BIN" > "$OUT/parquet.md"
    echo "bench: wrote $OUT/parquet.md" >&2
    exit 0
fi
if [ "${BENCH_ONLY:-}" = spark ]; then
    mkdir -p "$OUT"
    "$ROOT/scripts/bench-spark.sh" "$BIN" > "$OUT/spark.md"
    echo "bench: wrote $OUT/spark.md" >&2
    exit 0
fi
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

# measure TOOL OP CMD...: runs CMD under /usr/bin/time, appends a raw result
# (with the round number, for paired ratios, and the 1-minute load average).
measure() {
    local tool=$1 op=$2; shift 2
    sync
    /usr/bin/time -f '%e %U %S %M' -o time.txt "$@" >/dev/null 2>err.txt || { cat err.txt >&2; echo "bench: $tool $op failed" >&2; exit 1; }
    read -r wall user sys rss < time.txt
    echo "$tool|$op|$wall|$user|$sys|$rss|${rep:-0}|$(cut -d' ' -f1 /proc/loadavg)" >> raw.txt
    echo "$tool $op: ${wall}s wall" >&2
}

# Disk write speed on these machines varies a lot from second to second, and
# other work shares the cores, so every case runs REPS times, interleaved
# (one round runs each case once), and the tables show medians; the ratios
# are medians of the per-round ratios (paired: the two runs were seconds apart).
REPS=${BENCH_REPS:-5}
: > raw.txt
for rep in $(seq "$REPS"); do
    rm -f enc.hseal enc.age enc.ossl enc.gpg out.cp
    measure "cp + sync" copy sh -c 'cp input.bin out.cp && sync out.cp'
    rm -f out.cp
    measure hsmseal encrypt "$BIN" encrypt --key bench -o enc.hseal input.bin
    measure hsmseal decrypt "$BIN" decrypt --force -o dec.hsmseal.bin enc.hseal
    cmp input.bin dec.hsmseal.bin
    rm -f dec.hsmseal.bin
    measure "age (X25519)" encrypt age -r "$AGE_RECIPIENT" -o enc.age input.bin
    measure "age (X25519)" decrypt age -d -i age.key -o dec.age.bin enc.age
    cmp input.bin dec.age.bin
    rm -f enc.age dec.age.bin
    measure "age && sync" encrypt sh -c "age -r '$AGE_RECIPIENT' -o enc.age input.bin && sync enc.age"
    measure "age && sync" decrypt sh -c 'age -d -i age.key -o dec.age.bin enc.age && sync dec.age.bin'
    rm -f dec.age.bin
    measure "openssl enc -aes-256-ctr" encrypt openssl enc -aes-256-ctr -K "$KEYHEX" -iv "$IVHEX" -in input.bin -out enc.ossl
    measure "openssl enc -aes-256-ctr" decrypt openssl enc -d -aes-256-ctr -K "$KEYHEX" -iv "$IVHEX" -in enc.ossl -out dec.ossl.bin
    cmp input.bin dec.ossl.bin
    rm -f dec.ossl.bin
    measure "gpg --symmetric AES256" encrypt gpg --batch --yes --pinentry-mode loopback --passphrase-file gpg.pass --symmetric --cipher-algo AES256 --compress-algo none -o enc.gpg input.bin
    measure "gpg --symmetric AES256" decrypt gpg --batch --yes --pinentry-mode loopback --passphrase-file gpg.pass -d -o dec.gpg.bin enc.gpg
    cmp input.bin dec.gpg.bin
    rm -f dec.gpg.bin
    measure cat plain sh -c 'cat < input.bin > /dev/null'
    measure "hsmseal stdin" encrypt sh -c "'$BIN' -q encrypt --key bench < input.bin > /dev/null"
    measure cat sealed sh -c 'cat < enc.hseal > /dev/null'
    measure "hsmseal stdin" decrypt sh -c "'$BIN' -q decrypt < enc.hseal > /dev/null"
    if [ -n "$RAGE" ]; then
        measure "rage && sync" encrypt sh -c "'$RAGE' -r '$AGE_RECIPIENT' -o enc.rage input.bin && sync enc.rage"
        measure "rage && sync" decrypt sh -c "'$RAGE' -d -i age.key -o dec.rage.bin enc.rage && sync dec.rage.bin"
        cmp input.bin dec.rage.bin
        rm -f enc.rage dec.rage.bin
    fi
done
LOAD_RANGE=$(awk -F'|' '{print $8}' raw.txt | sort -n | sed -n '1p;$p' | paste -sd- -)
FILE_TABLE=$(python3 - "$SIZE_MIB" <<'PY'
import sys, statistics
size = int(sys.argv[1])
rows, by_rep = {}, {}
for line in open("raw.txt"):
    tool, op, wall, user, sys_, rss, rep, load = line.strip().split("|")
    rows.setdefault((tool, op), []).append((float(wall), float(user), float(sys_), int(rss)))
    by_rep[(tool, op, rep)] = float(wall)
med = {}
print("| tool | operation | median wall s | fastest wall s | user s | system s | MiB/s (median) | peak MiB |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for (tool, op), runs in rows.items():
    walls = sorted(r[0] for r in runs)
    m = statistics.median(walls)
    med[(tool, op)] = m
    print(f"| {tool} | {op} | {m:.2f} | {walls[0]:.2f} | {statistics.median(r[1] for r in runs):.2f} | "
          f"{statistics.median(r[2] for r in runs):.2f} | {size / m:.0f} | {max(r[3] for r in runs) // 1024} |")

def ratio(a, b):
    reps = sorted({k[2] for k in by_rep})
    rs = [by_rep[a + (r,)] / by_rep[b + (r,)] for r in reps if a + (r,) in by_rep and b + (r,) in by_rep]
    return statistics.median(rs) if rs else float("nan")

print()
print("| case | ratio (median of paired runs) | goal |")
print("|---|---:|---:|")
cases = [
    ("encrypt file→file / `cp + sync`", ("hsmseal", "encrypt"), ("cp + sync", "copy"), "≤ 1.2"),
    ("decrypt file→file / `cp + sync`", ("hsmseal", "decrypt"), ("cp + sync", "copy"), "≤ 1.2"),
    ("encrypt file→file / `age … && sync`", ("hsmseal", "encrypt"), ("age && sync", "encrypt"), ""),
    ("decrypt file→file / `age … && sync`", ("hsmseal", "decrypt"), ("age && sync", "decrypt"), ""),
    ("encrypt file→file / age (no sync)", ("hsmseal", "encrypt"), ("age (X25519)", "encrypt"), ""),
    ("encrypt stdin → /dev/null / `cat`", ("hsmseal stdin", "encrypt"), ("cat", "plain"), "≤ 1.25"),
    ("decrypt stdin → /dev/null / `cat`", ("hsmseal stdin", "decrypt"), ("cat", "sealed"), "≤ 1.25"),
    ("encrypt file→file / `rage … && sync`", ("hsmseal", "encrypt"), ("rage && sync", "encrypt"), ""),
]
for name, a, b, goal in cases:
    if b in med:
        print(f"| {name} | {ratio(a, b):.2f} | {goal} |")
PY
)
rm -f enc.age enc.ossl enc.gpg

# Peak memory on a much bigger file (flat memory claim).
head -c $((BIG_MIB * 1024 * 1024)) /dev/zero > big.bin
/usr/bin/time -f '%e %M' -o time.txt "$BIN" encrypt --key bench -o big.hseal big.bin
read -r BIG_ENC_WALL BIG_ENC_RSS < time.txt
/usr/bin/time -f '%e %M' -o time.txt "$BIN" decrypt -o big.out big.hseal
read -r BIG_DEC_WALL BIG_DEC_RSS < time.txt
cmp big.bin big.out
rm -f big.bin big.hseal big.out

RAGE_VERSION=""
[ -z "$RAGE" ] || RAGE_VERSION="$("$RAGE" --version 2>&1 | head -1) (rage), "
files_md() {
    echo "## Files: ${SIZE_MIB} MiB from the page cache to a file"
    echo
    echo "Input: ${SIZE_MIB} MiB of random bytes, read once before timing so it is in the page cache; output to a file on the same disk."
    echo "hsmseal with its default settings (\`--jobs\` = cores), fsync of the output and its directory included, as always."
    echo "\`cp + sync\` = \`cp input out && sync out\`: the disk's own limit for writing the same bytes durably."
    echo "\`cat\` = the input (plain, or sealed for decrypt) read into /dev/null; \`hsmseal stdin\` reads stdin and writes to /dev/null."
    echo "Peak = maximum resident set size."
    echo
    echo "Each case ran $REPS times, interleaved with the others (load average $LOAD_RANGE during the runs, on $(nproc) cores); median and fastest wall time shown."
    echo
    echo "$FILE_TABLE"
    echo
    echo "Versions: $(age --version 2>&1 | head -1) (age), $RAGE_VERSION$(openssl version), $(gpg --version | head -1)."
    if [ -z "$RAGE" ]; then
        echo "rage: not installed (\`cargo install rage\` takes minutes of compiling; set BENCH_RAGE=path to include it)."
    fi
    echo "openssl enc -aes-256-ctr does not authenticate anything; age and gpg do; hsmseal authenticates every 16 KiB chunk and makes one HSM call per file."
    echo "Neither openssl nor gpg nor plain age fsyncs its output."
    echo
    echo "## Memory on a ${BIG_MIB} MiB file"
    echo
    echo "| operation | wall s | peak MiB |"
    echo "|---|---:|---:|"
    echo "| hsmseal encrypt | $BIG_ENC_WALL | $((BIG_ENC_RSS / 1024)) |"
    echo "| hsmseal decrypt | $BIG_DEC_WALL | $((BIG_DEC_RSS / 1024)) |"
    echo
    cat "$ROOT/scripts/bench-files-notes.md"
}
FILES_MD=$(files_md)
if [ "${BENCH_ONLY:-}" = files ]; then
    echo "$FILES_MD" > "$OUT/files.md"
    rm -f input.bin enc.hseal
    echo "bench: wrote $OUT/files.md" >&2
    exit 0
fi

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
    echo "$FILES_MD"
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
    if [ -n "$COLUMNS_MD" ]; then
        echo "$COLUMNS_MD"
    fi
    if [ -x "$ROOT/scripts/bench-pg.sh" ]; then echo; "$ROOT/scripts/bench-pg.sh" "$BIN"; fi
} > "$OUT/PERFORMANCE.new.md"
# Sections this run did not regenerate (BENCH_ONLY runs, per-issue analyses)
# are kept, marked as such, rather than silently dropped.
python3 "$ROOT/scripts/perf-merge.py" "$ROOT/docs/PERFORMANCE.md" "$OUT/PERFORMANCE.new.md" > "$OUT/PERFORMANCE.merged.md"
mv "$OUT/PERFORMANCE.merged.md" "$ROOT/docs/PERFORMANCE.md"
rm -f input.bin
echo "bench: wrote docs/PERFORMANCE.md" >&2
