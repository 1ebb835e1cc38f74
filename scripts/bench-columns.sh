#!/usr/bin/env bash
# Benchmark of `hsmseal columns` (the "columns" target of the brief):
# a 1,000,000-row, 6-column CSV with 3 columns encrypted (row id bound),
# file to file, against a fresh SoftHSM2 token. Prints a Markdown table:
# cells/s for encrypt and decrypt beside a plain parse-and-rewrite of the same
# file with no crypto (`columns passthrough`, the ceiling), HSM calls, token
# overhead in bytes per cell, the dump's size blow-up (v2 tokens, and about
# what v1 tokens would have cost: a v1 token is about 145 characters longer,
# 213 against 68 for an 11-byte value under `pii`; the exact difference
# varies by a few characters with the value's length and the cell index)
# and peak memory (/usr/bin/time -v). `encrypt-null`
# writes to /dev/null (the issue's "into /dev/null" goal).
#
# Usage: scripts/bench-columns.sh [HSMSEAL_BINARY]   (default: target/release/hsmseal)
# Environment: BENCH_ROWS (default 1000000), BENCH_JOBS (default: all cores).
set -euo pipefail

HSMSEAL=${1:-target/release/hsmseal}
ROWS=${BENCH_ROWS:-1000000}
[[ -x $HSMSEAL ]] || { echo "bench-columns: $HSMSEAL is not an executable (cargo build --release)" >&2; exit 2; }
HSMSEAL=$(cd "$(dirname "$HSMSEAL")" && pwd)/$(basename "$HSMSEAL")
SOFTHSM_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
if ! command -v softhsm2-util >/dev/null || [[ ! -f $SOFTHSM_MODULE ]] || [[ ! -x /usr/bin/time ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq softhsm2 time >/dev/null
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-bench-columns.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" >"$WORK/softhsm2.conf"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
softhsm2-util --init-token --free --label hsmseal-bench --pin 4321 --so-pin 87654321 >/dev/null
export HSMSEAL_PKCS11_MODULE=$SOFTHSM_MODULE HSMSEAL_TOKEN=hsmseal-bench HSMSEAL_PIN=4321
"$HSMSEAL" key create pii >/dev/null

# Realistic rows: names with commas and quotes, emails, national ids, notes
# with newlines, some NULLs (unquoted empty) and empty strings ("").
python3 - "$ROWS" >"$WORK/users.csv" <<'PY'
import random, sys
rows = int(sys.argv[1])
rnd = random.Random(42)
first = ["Anna", "Jean-Luc", "Zoë", 'Mary "Mae"', "李小龙", "O'Neil", "Ana María", "Dmitri"]
last = ["Smith", "Dupont, Jr.", "Ångström", "García", "Nguyen", "Müller", "D'Arcy"]

def q(v):
    # As PostgreSQL writes CSV: NULL unquoted empty, "" quoted, quotes when needed.
    if v is None:
        return ""
    v = str(v)
    if v == "" or any(c in v for c in ',"\r\n'):
        return '"' + v.replace('"', '""') + '"'
    return v

out = ["id,name,email,national_id,notes,created_at\n"]
for i in range(1, rows + 1):
    r = rnd.random()
    notes = None if r < 0.2 else "called twice,\nleft a message" if r < 0.3 else f"customer since {2000 + i % 24}"
    row = [i, f"{rnd.choice(first)} {rnd.choice(last)}",
           "" if i % 50 == 0 else f"user{i}@example.com",
           f"{rnd.randrange(1000):03}-{rnd.randrange(100):02}-{rnd.randrange(10000):04}",
           notes, f"2024-{1 + i % 12:02}-{1 + i % 28:02} 12:{i % 60:02}:00+00"]
    out.append(",".join(q(v) for v in row) + "\n")
    if len(out) > 10000:
        sys.stdout.write("".join(out)); out = []
sys.stdout.write("".join(out))
PY

COLS=email,national_id,notes
JOBS=()
[[ -n ${BENCH_JOBS:-} ]] && JOBS=(--jobs "$BENCH_JOBS")

# run NAME ARGS...: runs hsmseal under /usr/bin/time, keeps the --json stats.
run() {
    local name=$1; shift
    # The --json summary (JSON schema 1) is the last JSON line of the run's
    # output (stdout, or stderr when the data goes to stdout).
    /usr/bin/time -v -o "$WORK/$name.time" "$HSMSEAL" --json "$@" "${JOBS[@]}" >"$WORK/$name.json" 2>&1
}
field() { python3 -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')][-1][sys.argv[2]])" "$1" "$2"; }
rss_mib() { awk -F: '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }
# Whole-process wall time (start-up, key login, fsync and rename included).
wall() { awk '/Elapsed \(wall clock\)/ {n = split($NF, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s}' "$1"; }

run passthrough columns passthrough --columns "$COLS" --row-id id -i "$WORK/users.csv" -o "$WORK/pass.csv"
cmp "$WORK/users.csv" "$WORK/pass.csv"
run encrypt columns encrypt --key pii --columns "$COLS" --row-id id --context app.users \
    -i "$WORK/users.csv" -o "$WORK/users.enc.csv"
run encrypt-null columns encrypt --key pii --columns "$COLS" --row-id id --context app.users \
    -i "$WORK/users.csv" -o /dev/null
run decrypt columns decrypt --columns "$COLS" --row-id id --context app.users \
    -i "$WORK/users.enc.csv" -o "$WORK/users.dec.csv"
cmp "$WORK/users.csv" "$WORK/users.dec.csv"
# Rotation: a new KWK version, then every v2 token re-encrypted under it.
"$HSMSEAL" key rotate pii >/dev/null
run rotate columns rotate --key pii --columns "$COLS" --row-id id --context app.users \
    -i "$WORK/users.enc.csv" -o "$WORK/users.rot.csv"
"$HSMSEAL" columns decrypt --columns "$COLS" --row-id id --context app.users \
    -i "$WORK/users.rot.csv" -o "$WORK/users.dec2.csv" 2>/dev/null
cmp "$WORK/users.csv" "$WORK/users.dec2.csv"

in_bytes=$(stat -c %s "$WORK/users.csv")
enc_bytes=$(stat -c %s "$WORK/users.enc.csv")
cells=$(field "$WORK/encrypt.json" cells)
printf '\nColumns benchmark: %s rows, 6 columns, 3 encrypted (%s cells, %s NULLs), %s cores, %.1f MiB CSV\n\n' \
    "$ROWS" "$cells" "$(field "$WORK/encrypt.json" nulls)" "$(nproc)" "$(awk "BEGIN {print $in_bytes / 1048576}")"
echo "| run | seconds (pipeline) | cells/s (pipeline) | seconds (process) | cells/s (process) | HSM calls | batches | peak RSS (MiB) |"
echo "|---|---|---|---|---|---|---|---|"
for r in passthrough encrypt encrypt-null decrypt rotate; do
    s=$(field "$WORK/$r.json" seconds)
    c=$(field "$WORK/$r.json" cells)
    w=$(wall "$WORK/$r.time")
    printf '| %s | %.3f | %.0f | %.2f | %.0f | %s | %s | %s |\n' "$r" "$s" "$(awk "BEGIN {print $c / $s}")" \
        "$w" "$(awk "BEGIN {print $c / $w}")" \
        "$(field "$WORK/$r.json" hsm_calls)" "$(field "$WORK/$r.json" batches)" "$(rss_mib "$WORK/$r.time")"
done
printf '\nToken overhead: %.1f bytes per encrypted cell (%s -> %s bytes).\n' \
    "$(awk "BEGIN {print ($enc_bytes - $in_bytes) / $cells}")" "$in_bytes" "$enc_bytes"
printf 'Dump size: %s -> %s bytes (%.2fx) with v2 tokens; v1 tokens would give about %s bytes (%.2fx).\n' \
    "$in_bytes" "$enc_bytes" "$(awk "BEGIN {print $enc_bytes / $in_bytes}")" \
    "$((enc_bytes + 145 * cells))" "$(awk "BEGIN {print ($enc_bytes + 145 * $cells) / $in_bytes}")"
