#!/usr/bin/env bash
# Parquet column benchmark (issue 15 "Benchmarks"; BENCH_ONLY=parquet
# scripts/bench.sh): N rows (default 1,000,000) x 3 encrypted string
# columns plus an int64 id, written by pyarrow (snappy, 128 Ki rows per row
# group), through `columns passthrough` (read + rewrite with the same
# reader and writer settings, no crypto: the baseline), `columns encrypt`
# and `columns decrypt`, single process. Then the same at 4x the rows, to
# show peak RSS is bounded by a row group, not the file. Prints a Markdown
# section: wall time, cells/s, peak RSS, file sizes. Load average printed:
# the machine is shared.
#
# Usage: scripts/bench-parquet.sh [HSMSEAL_BINARY]
# Environment: BENCH_PARQUET_ROWS (default 1000000), PARQUET_PYARROW_VENV.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/hsmseal}
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
ROWS=${BENCH_PARQUET_ROWS:-1000000}
VENV=${PARQUET_PYARROW_VENV:-$ROOT/target/pyarrow-venv}
if ! "$VENV/bin/python" -c 'import pyarrow' 2>/dev/null; then
    rm -rf "$VENV"; python3 -m venv "$VENV"
    PIP_NO_CACHE_DIR=1 "$VENV/bin/pip" install -q --disable-pip-version-check pyarrow
fi
[[ -x /usr/bin/time ]] || "$ROOT/scripts/install-deps.sh" time
W=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-bench-parquet.XXXXXX")
trap 'rm -rf "$W"' EXIT
cd "$W"
mkdir tokens
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$W" > softhsm2.conf
unset HSMSEAL_CONFIG HSMSEAL_PIN_FILE HSMSEAL_KEY HSMSEAL_AUDIT_LOG || true
export SOFTHSM2_CONF=$W/softhsm2.conf HSMSEAL_PKCS11_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
export HSMSEAL_TOKEN=bench HSMSEAL_PIN=bench-pin-1234
softhsm2-util --init-token --free --label bench --pin "$HSMSEAL_PIN" --so-pin so-pin-1234 >/dev/null
"$BIN" key create bench >/dev/null

gen() { # gen ROWS FILE
    "$VENV/bin/python" - "$1" "$2" <<'PY'
import sys, pyarrow as pa, pyarrow.parquet as pq
n, path = int(sys.argv[1]), sys.argv[2]
w = None
step = 131072
for start in range(0, n, step):
    ids = range(start, min(n, start + step))
    t = pa.table({
        "id": pa.array(ids, pa.int64()),
        "name": pa.array([f"Customer {i} Doe" for i in ids]),
        "email": pa.array([f"user{i}@example.com" for i in ids]),
        "ssn": pa.array([f"{i % 1000:03d}-{i % 100:02d}-{i % 10000:04d}" for i in ids]),
    })
    if w is None:
        w = pq.ParquetWriter(path, t.schema, compression="snappy")
    w.write_table(t, row_group_size=step)
w.close()
PY
}

COLS=name,email,ssn
# run LABEL CMD...: wall seconds and peak RSS (KiB) of one run.
run() {
    local label=$1; shift
    /usr/bin/time -f '%e %M' -o "$W/time.$label" "$@" >/dev/null 2>"$W/err.$label" || {
        cat "$W/err.$label" >&2; exit 1; }
    read -r SECS RSS < "$W/time.$label"
}
echo "## Parquet: $ROWS rows x 3 encrypted string columns (issue 15)"
echo
echo "\`BENCH_ONLY=parquet scripts/bench.sh\` (scripts/bench-parquet.sh), $(nproc) cores, load average at start $(cut -d' ' -f1-3 /proc/loadavg); one process, \`--batch-size 10000\`; input written by pyarrow (snappy, 131,072 rows per row group, plus an int64 id column); output with the input's codec. passthrough = read and rewrite with the same reader and writer, no crypto."
echo
echo "| rows | run | seconds | cells/s | peak RSS | output size |"
echo "|---:|---|---:|---:|---:|---:|"
for mult in 1 4; do
    n=$((ROWS * mult))
    gen "$n" "in$mult.parquet"
    cells=$((n * 3))
    insize=$(stat -c %s "in$mult.parquet")
    echo "| $n | input (pyarrow) | | | | $((insize / 1024)) KiB |"
    run pass "$BIN" columns passthrough --format parquet --columns "$COLS" "in$mult.parquet" -o "pass$mult.parquet"
    echo "| $n | passthrough | $SECS | $(awk -v c=$cells -v s=$SECS 'BEGIN{printf "%.2f M", c/s/1e6}') | $((RSS / 1024)) MiB | $(( $(stat -c %s "pass$mult.parquet") / 1024)) KiB |"
    run enc "$BIN" columns encrypt --key bench --format parquet --columns "$COLS" --context bench.users "in$mult.parquet" -o "enc$mult.parquet"
    echo "| $n | encrypt | $SECS | $(awk -v c=$cells -v s=$SECS 'BEGIN{printf "%.2f M", c/s/1e6}') | $((RSS / 1024)) MiB | $(( $(stat -c %s "enc$mult.parquet") / 1024)) KiB |"
    run dec "$BIN" columns decrypt --format parquet --columns "$COLS" --context bench.users "enc$mult.parquet" -o "dec$mult.parquet"
    echo "| $n | decrypt | $SECS | $(awk -v c=$cells -v s=$SECS 'BEGIN{printf "%.2f M", c/s/1e6}') | $((RSS / 1024)) MiB | $(( $(stat -c %s "dec$mult.parquet") / 1024)) KiB |"
    rm -f ./*"$mult".parquet
done
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
