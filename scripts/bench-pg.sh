#!/usr/bin/env bash
# `hsmseal pg encrypt` (online, and `--rewrite`) against the dump pipeline and a plain COPY round trip,
# on one table of BENCH_PG_ROWS rows (default 1,000,000) x 3 text columns,
# in one run on a fresh PostgreSQL (as scripts/pg-e2e.sh starts it) and a
# fresh SoftHSM2 token. Prints a markdown section on stdout (scripts/bench.sh
# puts it into docs/PERFORMANCE.md). No thresholds: a measurement.
#
#   scripts/bench-pg.sh [path/to/hsmseal]
# Environment: BENCH_PG_ROWS, BENCH_PG_CHUNK (rows per chunk, default 2000),
# BENCH_PG_PAD=N adds an unencrypted text column of N bytes per row (the
# issue's table shape, ~137 bytes per row, is BENCH_PG_PAD=20).
set -euo pipefail
BIN=$(realpath "${1:-target/release/hsmseal}")
ROWS=${BENCH_PG_ROWS:-1000000}
PAD=${BENCH_PG_PAD:-0}
[[ $PAD =~ ^[0-9]+$ ]] || { echo "bench-pg: BENCH_PG_PAD must be a number of bytes" >&2; exit 2; }
log() { printf 'bench-pg: %s\n' "$*" >&2; }
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[[ -x $PGBIN/initdb ]] || { log "no PostgreSQL (apt-get install postgresql)"; exit 2; }
if [[ $(id -u) -eq 0 ]]; then as_pg() { runuser -u postgres -- "$@"; }; else as_pg() { "$@"; }; fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-bench-pg.XXXXXX")
chmod 755 "$WORK"; mkdir -p "$WORK/pg"
[[ $(id -u) -eq 0 ]] && chown postgres: "$WORK/pg"
STARTED=0
cleanup() {
    [[ $STARTED -eq 1 ]] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$PGBIN/initdb" -D "$WORK/pg/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >/dev/null
STARTED=1
# Durability settings as pg-e2e.sh: the same for every pipeline measured.
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $WORK/pg -c fsync=off -c full_page_writes=off -c max_wal_size=4GB" start >/dev/null
psql_() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }
DSN="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"

mkdir -p "$WORK/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" >"$WORK/softhsm2.conf"
unset HSMSEAL_CONFIG HSMSEAL_PIN_FILE HSMSEAL_KEY || true
export SOFTHSM2_CONF=$WORK/softhsm2.conf HSMSEAL_TOKEN=bench-pg HSMSEAL_PIN=bench-pin-1234
export HSMSEAL_PKCS11_MODULE=${HSMSEAL_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
softhsm2-util --init-token --free --label bench-pg --pin "$HSMSEAL_PIN" --so-pin so-pin-1234 >/dev/null
"$BIN" key create bench >/dev/null

log "creating $ROWS rows"
psql_ <<SQL
CREATE TABLE src (id bigint PRIMARY KEY, name text, email text, ssn text);
INSERT INTO src SELECT g, 'Name ' || g || ' Surname', 'user' || g || '@example.com',
       lpad((g % 1000)::text, 3, '0') || '-' || lpad((g % 100)::text, 2, '0') || '-' || lpad((g % 10000)::text, 4, '0')
  FROM generate_series(1, $ROWS) g;
$( ((PAD > 0)) && echo "ALTER TABLE src ADD COLUMN note text; UPDATE src SET note = rpad('note ' || id, $PAD, '.'); VACUUM FULL src;")
CREATE TABLE plain (LIKE src INCLUDING ALL);
CREATE TABLE dump (LIKE src INCLUDING ALL);
CREATE TABLE direct AS SELECT * FROM src;
ALTER TABLE direct ADD PRIMARY KEY (id);
CREATE TABLE rewr AS SELECT * FROM src;
ALTER TABLE rewr ADD PRIMARY KEY (id);
VACUUM ANALYZE;
SQL
size() { psql_ -At -c "SELECT pg_total_relation_size('$1')"; }
# srvcpu: CPU seconds of the server so far (the postmaster's reaped
# backends plus its live children): what each pipeline costs the server.
PM=$(head -n 1 "$WORK/pg/data/postmaster.pid")
srvcpu() {
    local t=0 c
    for c in $(pgrep -P "$PM"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$c/stat" 2>/dev/null || echo 0))); done
    echo "$(awk '{print $16 + $17}' "/proc/$PM/stat") $t $(getconf CLK_TCK)" | awk '{printf "%.2f", ($1 + $2) / $3}'
}
# settle: the backends of the step before have exited and been reaped,
# and its dirty pages are written (CHECKPOINT, not timed), so every
# pipeline starts from the same clean server rather than paying for the
# write-back of the one before.
settle() { sleep 1; psql_ -c CHECKPOINT; }
now() { date +%s.%N; }
# rss FILE: peak RSS in KiB from /usr/bin/time -f %M output, 0 without it.
TIME=(); [[ -x /usr/bin/time ]] && TIME=(/usr/bin/time -f '%U %S %M' -o)

log "plain COPY TO | COPY FROM"
settle; C0=$(srvcpu)
t0=$(now)
psql_ -c "COPY src TO STDOUT (FORMAT text, HEADER)" | psql_ -c "COPY plain FROM STDIN (FORMAT text, HEADER)"
PLAIN_S=$(echo "$(now) - $t0" | bc)
settle; C1=$(srvcpu); PLAIN_SRV=$(echo "$C1 - $C0" | bc)

log "dump pipeline: COPY TO | columns encrypt | COPY FROM"
t0=$(now)
psql_ -c "COPY src TO STDOUT (FORMAT text, HEADER)" \
    | ${TIME:+"${TIME[@]}" "$WORK/dump.rss"} "$BIN" --json columns encrypt --key bench --format pgcopy \
        --columns name,email,ssn --row-id id --context public.direct 2>"$WORK/dump.json" \
    | psql_ -c "COPY dump FROM STDIN (FORMAT text, HEADER)"
DUMP_S=$(echo "$(now) - $t0" | bc)
settle; C2=$(srvcpu); DUMP_SRV=$(echo "$C2 - $C1" | bc)
DUMP_HSM=$(grep -o '"hsm_calls":[0-9]*' "$WORK/dump.json" | head -1 | cut -d: -f2)

log "pg encrypt"
t0=$(now)
${TIME:+"${TIME[@]}" "$WORK/direct.rss"} "$BIN" --json pg encrypt --dsn "$DSN" --table public.direct \
    --columns name,email,ssn --key bench --chunk-rows "${BENCH_PG_CHUNK:-2000}" >"$WORK/direct.json"
DIRECT_S=$(echo "$(now) - $t0" | bc)
settle; C3=$(srvcpu); DIRECT_SRV=$(echo "$C3 - $C2" | bc)
DIRECT_HSM=$(grep -o '"hsm_calls":[0-9]*' "$WORK/direct.json" | cut -d: -f2)
DIRECT_SIZE_DEAD=$(size direct)
psql_ -c "VACUUM FULL direct"

log "pg encrypt --rewrite"
settle; C3=$(srvcpu)
t0=$(now)
${TIME:+"${TIME[@]}" "$WORK/rewr.rss"} "$BIN" --json pg encrypt --dsn "$DSN" --table public.rewr \
    --columns name,email,ssn --key bench --rewrite >"$WORK/rewr.json"
REWR_S=$(echo "$(now) - $t0" | bc)
settle; C4=$(srvcpu); REWR_SRV=$(echo "$C4 - $C3" | bc)
REWR_HSM=$(grep -o '"hsm_calls":[0-9]*' "$WORK/rewr.json" | cut -d: -f2)
rss() { [[ -f $1 ]] && echo $(( $(tail -n 1 "$1" | awk '{print $3}') / 1024 )) || echo "-"; }
cpu() { [[ -f $1 ]] && tail -n 1 "$1" | awk '{printf "%.1f", $1 + $2}' || echo "-"; }
bpc() { psql_ -At -c "SELECT round(avg(octet_length(t.email)) - avg(octet_length(c.email)), 1) FROM $1 t JOIN src c USING (id)"; }
SRC_SIZE=$(size src)
row() { # NAME SECONDS SIZE HSM RSS BPC HSMSEAL_CPU SERVER_CPU
    awk -v n="$1" -v s="$2" -v size="$3" -v src="$SRC_SIZE" -v rows="$ROWS" -v h="$4" -v r="$5" -v b="$6" -v p="$PLAIN_S" -v hc="$7" -v sc="$8" \
        'BEGIN { printf "| %s | %.1f | %.0f | %.0f | %.1f | %.1f | %.2f | %s | %s | %s | %s | %.1f |\n", n, s, rows/s, 3*rows/s, size/1048576, size/src, s/p, b, h, r, hc, sc }'
}
log "done"
echo "## PostgreSQL tables: ${ROWS} rows x 3 text columns"
echo
echo "One table (id bigint primary key, name, email, ssn$( ((PAD > 0)) && echo ", note of $PAD bytes, not encrypted"): $(( SRC_SIZE / 1048576 )) MiB, $(( SRC_SIZE / ROWS )) bytes per row) on a local PostgreSQL"
echo "$("$PGBIN/postgres" --version | awk '{print $3}') (fsync off), SoftHSM2, one run (\`scripts/bench-pg.sh\`). \"× COPY\" is the"
echo "wall time over a plain \`COPY TO | COPY FROM\` of the same table in the same run; sizes are"
echo "\`pg_total_relation_size\` (for in-place \`pg encrypt\`, after \`VACUUM FULL\`: the UPDATEs leave the old row"
echo "versions, $(( DIRECT_SIZE_DEAD / 1048576 )) MiB before it). Bytes/cell: extra bytes per encrypted email cell."
echo "CPU s: user+system of hsmseal and of the server's backends; load average at the end: $(cut -d" " -f1-3 /proc/loadavg)."
echo
echo "| pipeline | wall s | rows/s | cells/s | table MiB | × size | × COPY | bytes/cell | HSM calls | peak RSS MiB | hsmseal CPU s | server CPU s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
row "plain COPY TO \\| COPY FROM" "$PLAIN_S" "$(size plain)" 0 "-" 0 "-" "$PLAIN_SRV"
row "COPY TO \\| columns encrypt \\| COPY FROM" "$DUMP_S" "$(size dump)" "${DUMP_HSM:--}" "$(rss "$WORK/dump.rss")" "$(bpc dump)" "$(cpu "$WORK/dump.rss")" "$DUMP_SRV"
row "pg encrypt (in place, chunks of ${BENCH_PG_CHUNK:-2000})" "$DIRECT_S" "$(size direct)" "${DIRECT_HSM:--}" "$(rss "$WORK/direct.rss")" "$(bpc direct)" "$(cpu "$WORK/direct.rss")" "$DIRECT_SRV"
row "pg encrypt --rewrite (offline, one transaction)" "$REWR_S" "$(size rewr)" "${REWR_HSM:--}" "$(rss "$WORK/rewr.rss")" "$(bpc rewr)" "$(cpu "$WORK/rewr.rss")" "$REWR_SRV"
