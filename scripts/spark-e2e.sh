#!/usr/bin/env bash
# End-to-end test of hsmseal as a stage of an Apache Spark job (README
# "Running on Spark"), in Spark local mode against a fresh SoftHSM2 token:
#
#   1,000,000 JSON Lines rows (id, name, email, ssn)
#     Spark encrypt job: 4 partitions, local[2,2] (2 cores, 2 attempts per
#       task), each partition piped through its own `hsmseal columns encrypt`
#       (scripts/spark/hsmseal_spark.py), tokens bound to the context
#       spark.e2e.users and the row id; the first attempt of partition 1 is
#       SIGKILLed mid-stream (a lost executor) and Spark retries it
#     Spark decrypt job: rows first reshuffled to partition (id*7919) mod 4,
#       so every row is opened by another process than the one that sealed it
#   checks: the round trip equals the input byte for byte (sorted by id); every
#   selected cell is a distinct token, never its plaintext; the tokens open
#   with the plain CLI too (one process, the whole dataset); per partition,
#   batches = ceil(cells / batch size) and one HSM call per batch, summed
#   against rows / batch size; a swapped cell and a wrong context fail with
#   exit 3; one tampered token makes the Spark decrypt job fail (non-zero,
#   hsmseal's "authentication failed" as the cause, no part file and no
#   _SUCCESS left in its output).
#
# Usage: scripts/spark-e2e.sh [HSMSEAL_BINARY]     (default: target/release/hsmseal)
# Environment: SPARK_E2E_ROWS (default 1000000), SPARK_E2E_KEEP=1 keeps the
#   temp dir, SPARK_E2E_CACHE (default .cache under the repo) holds the venv,
#   SPARK_E2E_PYSPARK (default 4.0.1) the PySpark version.
#
# Installs what it needs, idempotently: OpenJDK headless from Debian (if no
# Java 17+ is on PATH; root or sudo) and PySpark from PyPI into a venv under
# the cache dir, reused when it already has that version. Prints the time the
# installs took and the whole run's. Exits non-zero on any difference.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HSMSEAL=${1:-target/release/hsmseal}
ROWS=${SPARK_E2E_ROWS:-1000000}
BATCH=10000
[[ -x $HSMSEAL ]] || { echo "spark-e2e: $HSMSEAL is not an executable (build it: cargo build --release)" >&2; exit 2; }
HSMSEAL=$(cd "$(dirname "$HSMSEAL")" && pwd)/$(basename "$HSMSEAL")
T_START=$(date +%s)

log() { printf 'spark-e2e: %s\n' "$*" >&2; }

# shellcheck source=scripts/spark/setup.sh
. "$ROOT/scripts/spark/setup.sh"
spark_setup        # sets PY (the venv's python) and exports JAVA_HOME, PYSPARK_PYTHON
T_DEPS=$(date +%s)
log "dependencies ready in $((T_DEPS - T_START)) s ($SPARK_SETUP_NOTE)"

SOFTHSM_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
if ! command -v softhsm2-util >/dev/null || [[ ! -f $SOFTHSM_MODULE ]]; then
    "$ROOT/scripts/install-deps.sh"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-spark-e2e.XXXXXX")
cleanup() {
    local rc=$?
    if [[ ${SPARK_E2E_KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    if [[ $rc -eq 0 ]]; then log "PASS in $(($(date +%s) - T_START)) s"; else log "FAIL (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A fresh SoftHSM2 token of our own, in the temp dir. The PIN reaches every
# hsmseal through the environment the Spark executors inherit, never argv.
mkdir -p "$WORK/tokens" "$WORK/spark-local"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" >"$WORK/softhsm2.conf"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
softhsm2-util --init-token --free --label hsmseal-spark-e2e --pin 4321 --so-pin 87654321 >/dev/null
unset HSMSEAL_CONFIG HSMSEAL_PIN_FILE HSMSEAL_KEY HSMSEAL_JOBS HSMSEAL_AUDIT_LOG || true
export HSMSEAL_PKCS11_MODULE=$SOFTHSM_MODULE HSMSEAL_TOKEN=hsmseal-spark-e2e HSMSEAL_PIN=4321
"$HSMSEAL" key create pii >/dev/null

check() { "$PY" "$ROOT/scripts/spark/check.py" "$@"; }
# job NAME ARGS...: one Spark job (its own driver JVM); Spark's log goes to
# $WORK/NAME.log, shown when the job fails unexpectedly.
job() {
    local name=$1; shift
    "$PY" "$ROOT/scripts/spark/job.py" "$@" --hsmseal "$HSMSEAL" --batch-size "$BATCH" \
        --local-dir "$WORK/spark-local" >"$WORK/$name.log" 2>&1
}
job_or_die() {
    local name=$1
    if ! job "$@"; then
        tail -n 40 "$WORK/$name.log" >&2
        log "Spark job $name failed"
        exit 1
    fi
    grep '^job:' "$WORK/$name.log" >&2 || true
}

"$PY" "$ROOT/scripts/spark/selftest.py" "$HSMSEAL"
check gen "$ROWS" "$WORK/users.jsonl"

log "encrypt: Spark local[2,2], 4 partitions, partition 1's first attempt killed mid-stream"
T0=$(date +%s)
job_or_die encrypt encrypt "$WORK/users.jsonl" "$WORK/enc" --stats "$WORK/enc.json" --kill-after 1:1000
T1=$(date +%s)
[[ -f $WORK/enc/_SUCCESS ]] || { log "encrypt: no _SUCCESS"; exit 1; }
check tokens "$WORK/users.jsonl" "$WORK/enc"

log "decrypt: Spark, rows reshuffled across partitions first"
job_or_die decrypt decrypt "$WORK/enc" "$WORK/dec" --stats "$WORK/dec.json" --reshuffle
T2=$(date +%s)
check same "$WORK/users.jsonl" "$WORK/dec"
retried=$(check stats "$WORK/enc.json" "$WORK/dec.json" "$BATCH")
echo "$retried" >&2
grep -q "retried partitions: \[1\]" <<<"$retried" \
    || { log "partition 1 was not retried (the fault injection did not happen?)"; exit 1; }

log "plain CLI: the Spark job's tokens, all in one process"
cat "$WORK"/enc/part-* | "$HSMSEAL" columns decrypt -f jsonl -c name,email,ssn --row-id id \
    --context spark.e2e.users >"$WORK/cli.jsonl"
check same "$WORK/users.jsonl" "$WORK/cli.jsonl"

# expect_fail WANT_RC WHAT CMD...: CMD must exit WANT_RC.
expect_fail() {
    local want=$1 what=$2 rc=0; shift 2
    "$@" >/dev/null 2>"$WORK/err.txt" || rc=$?
    [[ $rc -eq $want ]] || { cat "$WORK/err.txt" >&2; log "$what: exit $rc, expected $want"; exit 1; }
    log "$what: exit $rc as expected: $(head -n 1 "$WORK/err.txt")"
}
check swap "$WORK/enc" "$WORK/swapped.jsonl"
expect_fail 3 "two rows' ssn tokens swapped" \
    "$HSMSEAL" columns decrypt -f jsonl -c name,email,ssn --row-id id --context spark.e2e.users -i "$WORK/swapped.jsonl"
check pick "$WORK/enc" 100 "$WORK/some.jsonl"
expect_fail 3 "another context" \
    "$HSMSEAL" columns decrypt -f jsonl -c name,email,ssn --row-id id --context spark.e2e.other -i "$WORK/some.jsonl"
"$HSMSEAL" columns decrypt -f jsonl -c name,email,ssn --row-id id --context spark.e2e.users -i "$WORK/some.jsonl" >/dev/null

log "tampered: one token changed; the Spark decrypt job must fail"
bad_id=$(check tamper "$WORK/enc" "$WORK/enc-bad")
rc=0
job tampered decrypt "$WORK/enc-bad" "$WORK/dec-bad" --stats "$WORK/dec-bad.json" || rc=$?
if [[ $rc -eq 0 ]]; then log "the decrypt job over a tampered token (row $bad_id) succeeded"; exit 1; fi
cause=$(grep '^job:' "$WORK/tampered.log" || true)
log "tampered token in row $bad_id: job exit $rc: $cause"
grep -q "hsmseal exited 3 .*authentication failed" <<<"$cause" \
    || { tail -n 40 "$WORK/tampered.log" >&2; log "the job failed, but not on the tampered token"; exit 1; }
if [[ -e $WORK/dec-bad/_SUCCESS || -e $WORK/dec-bad.json ]] || compgen -G "$WORK/dec-bad/part-*" >/dev/null; then
    ls -la "$WORK/dec-bad" >&2 || true
    log "the failed job left output behind"; exit 1
fi

log "times: install $((T_DEPS - T_START)) s, encrypt job $((T1 - T0)) s (with one retried task), decrypt job $((T2 - T1)) s"
