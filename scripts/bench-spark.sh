#!/usr/bin/env bash
# Benchmark of hsmseal as a Spark stage (issue 15): Spark local mode on all
# cores (local[N], 4 partitions, one hsmseal --jobs 1 per partition, as
# scripts/spark-e2e.sh runs it) against the single-process CLI on the same
# 1,000,000-row JSON Lines file (id, name, email, ssn; 3 columns encrypted,
# row id bound). Also a Spark job piping through `hsmseal columns passthrough`
# (parse and rewrite, no crypto): what Spark and the Python pipe cost by
# themselves. Prints a Markdown section on stdout. Not a test: no thresholds.
#
# Usage: scripts/bench-spark.sh [HSMSEAL_BINARY]     (`BENCH_ONLY=spark make bench`
#        writes its output to bench-out/spark.md; not part of the default bench:
#        it downloads PySpark and runs for minutes)
# Environment: BENCH_ROWS (default 1000000), BENCH_SPARK_REPS (default 3).
#
# Spark job times are the action's wall time (textFile -> mapPartitions ->
# saveAsTextFile), measured in the driver; the driver JVM's start (a few
# seconds, once per application) is shown apart. CLI times are whole-process
# wall times (/usr/bin/time), reading the file and writing a file.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HSMSEAL=${1:-target/release/hsmseal}
ROWS=${BENCH_ROWS:-1000000}
REPS=${BENCH_SPARK_REPS:-3}
[[ -x $HSMSEAL ]] || { echo "bench-spark: $HSMSEAL is not an executable (cargo build --release)" >&2; exit 2; }
HSMSEAL=$(cd "$(dirname "$HSMSEAL")" && pwd)/$(basename "$HSMSEAL")
"$ROOT/scripts/install-deps.sh" time
# shellcheck source=scripts/spark/setup.sh
. "$ROOT/scripts/spark/setup.sh"
spark_setup
echo "bench-spark: $SPARK_SETUP_NOTE" >&2

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-bench-spark.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$WORK/tokens" "$WORK/spark-local"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" >"$WORK/softhsm2.conf"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
softhsm2-util --init-token --free --label hsmseal-bench --pin 4321 --so-pin 87654321 >/dev/null
unset HSMSEAL_CONFIG HSMSEAL_PIN_FILE HSMSEAL_KEY HSMSEAL_JOBS HSMSEAL_AUDIT_LOG || true
export HSMSEAL_PKCS11_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so} HSMSEAL_TOKEN=hsmseal-bench HSMSEAL_PIN=4321
"$HSMSEAL" key create pii >/dev/null
"$PY" "$ROOT/scripts/spark/check.py" gen "$ROWS" "$WORK/users.jsonl" >&2
CORES=$(nproc)
COLS=name,email,ssn
CTX=(--row-id id --context spark.bench.users)

# raw.txt: case|rep|wall s|cells|hsm calls|hsmseal seconds (summed)|driver start s
: >"$WORK/raw.txt"
cli() {
    local name=$1 out=$2; shift 2
    /usr/bin/time -f '%e' -o "$WORK/time.txt" "$HSMSEAL" --json "$@" -f jsonl -c "$COLS" \
        -i "$WORK/$([[ $name == *decrypt* ]] && echo users.enc.jsonl || echo users.jsonl)" \
        -o "$out" --force 2>"$WORK/cli.json"
    "$PY" - "$name" "$rep" "$(cat "$WORK/time.txt")" "$WORK/cli.json" >>"$WORK/raw.txt" <<'PY'
import json, sys
name, rep, wall, path = sys.argv[1:]
s = [json.loads(l) for l in open(path) if l.startswith("{")][-1]
print(f"{name}|{rep}|{wall}|{s['cells']}|{s['hsm_calls']}|{s['seconds']}|0")
PY
}
spark() {
    local name=$1 action=$2 input=$3 t0 t1
    rm -rf "$WORK/out"
    t0=$(date +%s.%N)
    "$PY" "$ROOT/scripts/spark/job.py" "$action" "$input" "$WORK/out" --stats "$WORK/stats.json" \
        --master "local[$CORES]" --partitions 4 --hsmseal "$HSMSEAL" --columns "$COLS" \
        --context spark.bench.users --local-dir "$WORK/spark-local" >"$WORK/spark.log" 2>&1 \
        || { tail -n 30 "$WORK/spark.log" >&2; echo "bench-spark: $name failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    "$PY" - "$name" "$rep" "$WORK/stats.json" "$t0" "$t1" >>"$WORK/raw.txt" <<'PY'
import json, sys
name, rep, path, t0, t1 = sys.argv[1:]
j = json.load(open(path))
s = j["summaries"]
cells = sum(x["cells"] for x in s)
print(f"{name}|{rep}|{j['wall_seconds']:.3f}|{cells}|{sum(x['hsm_calls'] for x in s)}|"
      f"{sum(x['seconds'] for x in s):.3f}|{float(t1) - float(t0) - j['wall_seconds']:.2f}")
PY
}

# The sealed input for the decrypt cases, and the Spark decrypt input (the
# same file: both decrypt exactly the same bytes).
"$HSMSEAL" -q columns encrypt -f jsonl -c "$COLS" "${CTX[@]}" -k pii -i "$WORK/users.jsonl" -o "$WORK/users.enc.jsonl"
for rep in $(seq "$REPS"); do
    cli "CLI passthrough, --jobs $CORES" "$WORK/pass.jsonl" columns passthrough --row-id id
    cli "CLI encrypt, --jobs 1" "$WORK/enc1.jsonl" columns encrypt -k pii "${CTX[@]}" --jobs 1
    cli "CLI encrypt, --jobs $CORES" "$WORK/enc.jsonl" columns encrypt -k pii "${CTX[@]}"
    cli "CLI decrypt, --jobs $CORES" "$WORK/dec.jsonl" columns decrypt "${CTX[@]}"
    cmp "$WORK/users.jsonl" "$WORK/dec.jsonl"
    spark "Spark passthrough" passthrough "$WORK/users.jsonl"
    spark "Spark encrypt" encrypt "$WORK/users.jsonl"
    spark "Spark decrypt" decrypt "$WORK/users.enc.jsonl"
    echo "bench-spark: round $rep of $REPS done" >&2
done
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

"$PY" - "$WORK/raw.txt" "$ROWS" "$CORES" "$REPS" "$LOAD" "$(java_major)" \
    "$("$PY" -c 'import pyspark; print(pyspark.__version__)')" <<'PY'
import statistics, sys
path, rows, cores, reps, load, java, spark = sys.argv[1:]
runs = {}
for line in open(path):
    name, rep, wall, cells, calls, hs, start = line.strip().split("|")
    runs.setdefault(name, []).append((float(wall), int(cells), int(calls), float(hs), float(start)))
print(f"## Spark: {int(rows):,} JSON Lines rows through a Spark stage and through the CLI")
print()
print(f"`BENCH_ONLY=spark make bench` (`scripts/bench-spark.sh`): PySpark {spark} on Java {java}, Spark local[{cores}]")
print(f"({cores} cores), 4 partitions, each piped through one `hsmseal --jobs 1` (scripts/spark/hsmseal_spark.py,")
print(f"as in `make spark-e2e`); the CLI reads and writes the same file. Columns name, email, ssn encrypted")
print(f"(row id bound, context set); {reps} interleaved rounds, medians; load average at the end: {load}.")
print("Spark wall = the job's action in the driver (read, pipe, write part files); hsmseal s = the")
print("hsmseal processes' own pipeline seconds, summed over partitions.")
print()
print("| run | wall s (median) | cells | cells/s | HSM calls | hsmseal s | driver start s |")
print("|---|---:|---:|---:|---:|---:|---:|")
med = {}
for name, r in runs.items():
    w = statistics.median(x[0] for x in r)
    med[name] = (w, r[0][1])
    print(f"| {name} | {w:.2f} | {r[0][1]:,} | {r[0][1] / w:,.0f} | {r[0][2]} | "
          f"{statistics.median(x[3] for x in r):.2f} | {statistics.median(x[4] for x in r):.1f} |")
def rate(n):
    w, c = med[n]
    return c / w
print()
c = f"CLI encrypt, --jobs {cores}"
print(f"Spark encrypt / CLI encrypt --jobs {cores}: {rate('Spark encrypt') / rate(c):.2f}x the cells/s; "
      f"Spark decrypt / CLI decrypt: {rate('Spark decrypt') / rate(f'CLI decrypt, --jobs {cores}'):.2f}x; "
      f"Spark passthrough (no crypto) / Spark encrypt: {rate('Spark passthrough') / rate('Spark encrypt'):.2f}x.")
PY
