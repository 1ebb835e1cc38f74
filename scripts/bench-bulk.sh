#!/usr/bin/env bash
# Benchmark of bulk runs over a tree (issue 5): 10,000 small files (1-64 KiB)
# encrypted with `-r DIR` and rotated with `rotate -r DIR`, with --jobs 1 and
# --jobs 2, each REPS times interleaved (median shown); files/s and HSM calls
# from the run's --json summary. Beside them: `cp -r` of the same tree (the
# file-system floor: create, write and close 10,000 files, no fsync) and the
# cost of the audit log, per bulk run and per single-file run.
# Prints a Markdown section on stdout.
#
# Usage: scripts/bench-bulk.sh [HSMSEAL_BINARY]   (env: BENCH_FILES=10000, BENCH_REPS=3)
set -euo pipefail

HSMSEAL=${1:-target/release/hsmseal}
FILES=${BENCH_FILES:-10000}
REPS=${BENCH_REPS:-3}
[[ -x $HSMSEAL ]] || { echo "bench-bulk: $HSMSEAL is not an executable (cargo build --release)" >&2; exit 2; }
HSMSEAL=$(cd "$(dirname "$HSMSEAL")" && pwd)/$(basename "$HSMSEAL")
SOFTHSM_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
command -v softhsm2-util >/dev/null && [[ -f $SOFTHSM_MODULE ]] || {
    echo "bench-bulk: SoftHSM2 missing (scripts/install-deps.sh)" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-bench-bulk.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
cd "$WORK"

unset HSMSEAL_CONFIG HSMSEAL_PIN_FILE HSMSEAL_KEY HSMSEAL_AUDIT_LOG HSMSEAL_JOBS || true
mkdir tokens
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK" > softhsm2.conf
export SOFTHSM2_CONF=$WORK/softhsm2.conf HSMSEAL_PKCS11_MODULE=$SOFTHSM_MODULE
export HSMSEAL_TOKEN=bench-bulk HSMSEAL_PIN=bench-pin-1234
softhsm2-util --init-token --free --label bench-bulk --pin "$HSMSEAL_PIN" --so-pin so-pin-1234 >/dev/null
"$HSMSEAL" -q key create bulk >/dev/null
"$HSMSEAL" -q audit init >/dev/null

# The tree: 100 directories of 100 files, 1-64 KiB of random bytes each.
python3 - "$FILES" <<'PY'
import os, random, sys
n = int(sys.argv[1])
rnd = random.Random(1)
for i in range(n):
    d = f"tree/d{i // 100:03d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i:05d}", "wb") as f:
        f.write(os.urandom(rnd.randint(1024, 65536)))
PY
TREE_MIB=$(du -sm tree | cut -f1)

now() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", (b - a) / 1e9}'; }
# run LABEL ARGS...: one timed hsmseal --json run; records wall s and HSM calls.
run() {
    local label=$1 s e; shift
    sync
    s=$(now)
    "$HSMSEAL" --json "$@" > out.json 2>err.txt || { cat err.txt >&2; echo "bench-bulk: $label failed" >&2; exit 1; }
    e=$(now)
    local calls
    calls=$(tail -1 out.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["summary"]["hsm_calls"])')
    echo "$label|$(secs "$s" "$e")|$calls" >> raw.txt
    echo "bench-bulk: $label $(secs "$s" "$e") s" >&2
}
clean_outputs() { find tree -name '*.hseal' -delete; }

: > raw.txt
for rep in $(seq "$REPS"); do
    rm -rf copy; sync
    s=$(now); cp -r tree copy; e=$(now)
    echo "cp -r (no fsync)|$(secs "$s" "$e")|0" >> raw.txt
    rm -rf copy
    for jobs in 1 2; do
        clean_outputs
        run "encrypt -r, --jobs $jobs" --jobs "$jobs" encrypt --key bulk -r tree
    done
    # Each rotate moves every file to a new key version.
    for jobs in 1 2; do
        "$HSMSEAL" -q key rotate bulk >/dev/null
        run "rotate -r, --jobs $jobs" --jobs "$jobs" rotate -r tree
    done
    # The audit log's cost on a whole bulk run.
    clean_outputs
    run "encrypt -r, --jobs 2, audit log" --jobs 2 --audit-log "$WORK/audit.log" encrypt --key bulk -r tree
done
"$HSMSEAL" -q --audit-log "$WORK/audit.log" audit verify >/dev/null

# Per-run cost of the audit log: 50 single-file verify runs with and without it.
head -c 1024 /dev/urandom > tiny
"$HSMSEAL" -q encrypt --key bulk -o tiny.hseal tiny
per_run() {
    local s e
    s=$(now)
    for _ in $(seq 50); do "$HSMSEAL" -q "$@" verify tiny.hseal >/dev/null; done
    e=$(now)
    awk -v a="$s" -v b="$e" 'BEGIN{printf "%.1f", (b - a) / 1e6 / 50}'
}
PLAIN_MS=$(per_run)
AUDIT_MS=$(per_run --audit-log "$WORK/audit2.log")
PLAIN_MS2=$(per_run)
AUDIT_MS2=$(per_run --audit-log "$WORK/audit2.log")
"$HSMSEAL" -q --audit-log "$WORK/audit2.log" audit verify >/dev/null
AUDIT_LINES=$(wc -l < "$WORK/audit2.log")
AUDIT_BYTES=$(( $(wc -c < "$WORK/audit2.log") / AUDIT_LINES ))

echo "## Bulk runs: $FILES files of 1-64 KiB ($TREE_MIB MiB) in 100 directories"
echo
echo "Produced by \`scripts/bench-bulk.sh\` (part of \`make bench\`). Each row ran $REPS times, interleaved with the"
echo "others; median wall time shown. Whole process: start, PKCS#11 module load, login, directory walk,"
echo "and one fsync per output file (\`cp -r\` does not fsync). HSM calls from the run's \`--json\` summary."
echo "Rotate moves every file to a new key version (\`key rotate\` before each run)."
echo
echo "| run | median wall s | files/s | HSM calls |"
echo "|---|---:|---:|---:|"
python3 - "$FILES" <<'PY'
import statistics, sys
n = int(sys.argv[1])
rows = {}
for line in open("raw.txt"):
    label, wall, calls = line.strip().split("|")
    rows.setdefault(label, []).append((float(wall), int(calls)))
for label, runs in rows.items():
    m = statistics.median(r[0] for r in runs)
    print(f"| {label} | {m:.2f} | {n / m:.0f} | {runs[-1][1]} |")
def med(label):
    return statistics.median(r[0] for r in rows[label])
print()
print(f"--jobs 2 against --jobs 1: encrypt {med('encrypt -r, --jobs 1') / med('encrypt -r, --jobs 2'):.2f}x, "
      f"rotate {med('rotate -r, --jobs 1') / med('rotate -r, --jobs 2'):.2f}x.  ")
a, b = med('encrypt -r, --jobs 2, audit log'), med('encrypt -r, --jobs 2')
print(f"The audit log added {(a - b) * 1000:.0f} ms to a {n}-file run ({(a - b) / b * 100:.1f}%): it writes one line per run, not per file.")
PY
echo
echo "Audit log per run: 50 runs of \`hsmseal verify\` on a 1 KiB file took $PLAIN_MS / $PLAIN_MS2 ms each without the log"
echo "and $AUDIT_MS / $AUDIT_MS2 ms with it (two alternating passes). Each append reads the last line, asks the HSM for"
echo "one HMAC and updates the head record in the HSM; lines average $AUDIT_BYTES bytes."
