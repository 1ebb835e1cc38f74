#!/usr/bin/env bash
# End-to-end test of `hsmseal columns` against a real PostgreSQL and a fresh
# SoftHSM2 token:
#
#   users (100,000 realistic rows)
#     \copy ... to stdout csv header | columns encrypt | \copy users_enc from stdin csv header
#     \copy users_enc to stdout csv header | columns decrypt   == first export, byte for byte
#   and the same through COPY ... TO STDOUT / FROM STDIN (text format, pgcopy).
#   Failed runs (issue 9): `columns decrypt` meeting a damaged token at row
#   20,000 of 30,000, `columns encrypt` meeting a NULL row id at the last
#   row, and a run refused before any output, piped into `psql -1 -c "\copy
#   ... FROM pstdin"` and plain `psql -c` for CSV, TSV (read as CSV with a
#   tab delimiter) and COPY text with HEADER: hsmseal exits non-zero, psql
#   fails on the abort marker, and the target table is left untouched.
#
# Usage: scripts/pg-e2e.sh [HSMSEAL_BINARY]      (default: target/release/hsmseal)
# Environment: PG_E2E_ROWS (default 100000), PG_E2E_KEEP=1 keeps the temp dir.
#
# Installs PostgreSQL and SoftHSM2 from Debian's packages if they are missing.
# initdb and the server refuse to run as root, so as root they run as the
# `postgres` system user the package creates. Everything lives in one temp
# directory: the cluster (on a loopback port), the SoftHSM2 token and the
# dumps; the server is stopped and the directory removed on exit, also on
# failure or interrupt.
set -euo pipefail

HSMSEAL=${1:-target/release/hsmseal}
ROWS=${PG_E2E_ROWS:-100000}
[[ -x $HSMSEAL ]] || { echo "pg-e2e: $HSMSEAL is not an executable (build it: cargo build --release)" >&2; exit 2; }
HSMSEAL=$(cd "$(dirname "$HSMSEAL")" && pwd)/$(basename "$HSMSEAL")

log() { printf 'pg-e2e: %s\n' "$*" >&2; }

apt_install() {
    log "installing $* from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "$@" >/dev/null
}

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

PGBIN=$(pg_bindir || true)
if [[ -z $PGBIN || ! -x $PGBIN/initdb || ! -x $PGBIN/pg_ctl ]]; then
    apt_install postgresql
    PGBIN=$(pg_bindir)
fi
SOFTHSM_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
if ! command -v softhsm2-util >/dev/null || [[ ! -f $SOFTHSM_MODULE ]]; then
    apt_install softhsm2
fi

# initdb/postgres refuse root: run them as the postgres user when we are root.
if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || { log "no postgres system user (is the postgresql package installed?)"; exit 2; }
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmseal-pg-e2e.XXXXXX")
PGHOME=$WORK/pg          # owned by the server's user: data, socket, log
PGDATA=$PGHOME/data
PGLOG=$PGHOME/server.log
STARTED=0
cleanup() {
    local rc=$?
    if [[ $STARTED -eq 1 ]]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [[ $rc -ne 0 && -f $PGLOG ]]; then
        log "server log (last lines):"
        tail -n 20 "$PGLOG" >&2 || true
    fi
    if [[ ${PG_E2E_KEEP:-0} == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    if [[ $rc -eq 0 ]]; then log "PASS"; else log "FAIL (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The postgres user must reach its directory inside ours.
chmod 755 "$WORK"
mkdir -p "$PGHOME"
if [[ $(id -u) -eq 0 ]]; then chown postgres: "$PGHOME"; fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log "PostgreSQL from $PGBIN on 127.0.0.1:$PORT in $WORK"
as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres -E UTF8 --locale=C --no-sync >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; exit 1; }
STARTED=1
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGLOG" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGHOME -c fsync=off -c full_page_writes=off" start >/dev/null

export PGTZ=UTC PGCLIENTENCODING=UTF8
psql_() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }

# A fresh SoftHSM2 token of our own, in the temp dir.
mkdir -p "$WORK/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$WORK/tokens" >"$WORK/softhsm2.conf"
export SOFTHSM2_CONF=$WORK/softhsm2.conf
softhsm2-util --init-token --free --label hsmseal-pg-e2e --pin 4321 --so-pin 87654321 >/dev/null
export HSMSEAL_PKCS11_MODULE=$SOFTHSM_MODULE HSMSEAL_TOKEN=hsmseal-pg-e2e HSMSEAL_PIN=4321
"$HSMSEAL" key create pii >/dev/null

log "creating users with $ROWS rows"
psql_ <<SQL
CREATE TABLE users (
    id          bigint PRIMARY KEY,
    full_name   text,
    email       text,
    national_id text,
    notes       text,
    created_at  timestamptz,
    balance     numeric(12,2),
    active      boolean
);
INSERT INTO users
SELECT g,
       (ARRAY['Anna','Jean-Luc','Zoë','Mary "Mae"','李小龙','O''Neil','Ana María','Dmitri','Ærøskøbing'])[1 + g % 9]
         || ' ' ||
       (ARRAY['Smith','Dupont, Jr.','Ångström','García','Nguyen','Müller','D''Arcy "DJ"'])[1 + (g * 7) % 7],
       CASE WHEN g % 13 = 0 THEN NULL
            WHEN g % 17 = 0 THEN ''
            ELSE 'user' || g || '@example.' || (ARRAY['com','org','de','co.uk'])[1 + g % 4] END,
       CASE WHEN g % 11 = 0 THEN NULL
            ELSE lpad((g * 7919 % 1000)::text, 3, '0') || '-' || lpad((g % 100)::text, 2, '0')
                 || '-' || lpad((g * 31 % 10000)::text, 4, '0') END,
       CASE g % 10
            WHEN 0 THEN NULL
            WHEN 1 THEN E'called twice,\nleft a "message"'
            WHEN 2 THEN E'tab\there, back\\\\slash and \\\\N'
            WHEN 3 THEN ''
            WHEN 4 THEN E'CRLF\r\nline'
            WHEN 5 THEN '\.'
            WHEN 6 THEN E'bell\x07, del\x7f, emoji 😀'
            ELSE 'customer since ' || (2000 + g % 24) END,
       timestamptz '2024-01-01 00:00:00+00' + make_interval(mins => g),
       (g * 37 % 100000) / 100.0,
       g % 3 = 0
FROM generate_series(1, $ROWS) AS g;
CREATE TABLE users_enc (id text, full_name text, email text, national_id text,
                        notes text, created_at text, balance text, active text);
CREATE TABLE users_enc_copy (LIKE users_enc);
SQL

COLS=full_name,email,national_id,notes
STATS=(--stats)

# --- CSV: \copy ... csv header ---------------------------------------------
log "CSV: export, encrypt, load"
psql_ -c "\\copy (SELECT * FROM users ORDER BY id) TO '$WORK/orig.csv' CSV HEADER"
psql_ -c "\\copy (SELECT * FROM users ORDER BY id) TO pstdout CSV HEADER" \
    | "$HSMSEAL" columns encrypt --key pii --columns "$COLS" --row-id id --context app.users --format csv "${STATS[@]}" \
    | psql_ -c "\\copy users_enc FROM pstdin CSV HEADER"

tokens=$(psql_ -At -c "SELECT count(*) FROM users_enc WHERE national_id LIKE 'hsc_.%'")
plain=$(psql_ -At -c "SELECT count(*) FROM users WHERE national_id IS NOT NULL")
nulls_enc=$(psql_ -At -c "SELECT count(*) FROM users_enc WHERE email IS NULL")
nulls=$(psql_ -At -c "SELECT count(*) FROM users WHERE email IS NULL")
[[ $tokens == "$plain" && $nulls_enc == "$nulls" ]] \
    || { log "CSV: expected $plain tokens and $nulls NULL emails, got $tokens and $nulls_enc"; exit 1; }
leaks=$(psql_ -At -c "SELECT count(*) FROM users_enc WHERE email LIKE '%@example.%' OR full_name LIKE 'Anna %'")
[[ $leaks == 0 ]] || { log "CSV: $leaks plaintext values in users_enc"; exit 1; }

log "CSV: export, decrypt, compare"
psql_ -c "\\copy (SELECT * FROM users_enc ORDER BY id::bigint) TO pstdout CSV HEADER" \
    | "$HSMSEAL" columns decrypt --columns "$COLS" --row-id id --context app.users --format csv "${STATS[@]}" \
    >"$WORK/roundtrip.csv"
cmp "$WORK/orig.csv" "$WORK/roundtrip.csv" || { log "CSV: round trip differs"; exit 1; }

# A token moved to another row must not decrypt.
psql_ -c "UPDATE users_enc SET national_id = (SELECT national_id FROM users_enc WHERE id = '1') WHERE id = '2'"
if psql_ -c "\\copy (SELECT * FROM users_enc ORDER BY id::bigint) TO pstdout CSV HEADER" \
    | "$HSMSEAL" columns decrypt --columns "$COLS" --row-id id --context app.users --format csv >/dev/null 2>"$WORK/swap.err"; then
    log "CSV: a token swapped between rows decrypted"; exit 1
fi
grep -q 'row 3, column "national_id"' "$WORK/swap.err" || { log "CSV: unexpected error: $(cat "$WORK/swap.err")"; exit 1; }

# --- pgcopy: COPY ... TO STDOUT (text format, no header, columns by position)
log "pgcopy: export, encrypt, load"
psql_ -c "COPY (SELECT * FROM users ORDER BY id) TO STDOUT" >"$WORK/orig.copy"
"$HSMSEAL" columns encrypt --key pii --format pgcopy --no-header --columns 2,3,4,5 --row-id 1 \
        --context app.users "${STATS[@]}" <"$WORK/orig.copy" \
    | psql_ -c "COPY users_enc_copy FROM STDIN"
tokens=$(psql_ -At -c "SELECT count(*) FROM users_enc_copy WHERE notes LIKE 'hsc_.%'")
plain=$(psql_ -At -c "SELECT count(*) FROM users WHERE notes IS NOT NULL")
[[ $tokens == "$plain" ]] || { log "pgcopy: expected $plain note tokens, got $tokens"; exit 1; }

log "pgcopy: export, decrypt, compare"
psql_ -c "COPY (SELECT * FROM users_enc_copy ORDER BY id::bigint) TO STDOUT" \
    | "$HSMSEAL" columns decrypt --format pgcopy --no-header --columns 2,3,4,5 --row-id 1 \
        --context app.users "${STATS[@]}" -o "$WORK/roundtrip.copy"
cmp "$WORK/orig.copy" "$WORK/roundtrip.copy" || { log "pgcopy: round trip differs"; exit 1; }

log "CSV and pgcopy round trips of $ROWS rows are byte-identical"

# --- Failed runs: the loader fails too, the target table stays untouched ----
FROWS=$(( ROWS < 30000 ? ROWS : 30000 ))
DROW=$(( FROWS * 2 / 3 ))       # id of the row whose token is damaged
log "failed runs: $FROWS-row dumps, a damaged token at id $DROW, a NULL row id at the last row"
psql_ <<SQL
CREATE TABLE small AS SELECT * FROM users WHERE id <= $FROWS;
CREATE TABLE target_plain (LIKE users);
INSERT INTO target_plain (id, full_name) VALUES (0, 'sentinel');
CREATE TABLE target_enc (LIKE users_enc);
INSERT INTO target_enc (id, full_name) VALUES ('0', 'sentinel');
SQL

# Load options, export options and hsmseal --format of each dump format.
declare -A LOAD=([csv]="FORMAT csv, HEADER" [tsv]="FORMAT csv, DELIMITER E'\\t', HEADER" [pgcopy]="FORMAT text, HEADER")
COLUMNS=(--columns "$COLS" --row-id id --context app.users)

untouched() {   # TABLE: only the sentinel row
    [[ $(psql_ -At -c "SELECT count(*) || ':' || min(id::text) || ':' || min(full_name) FROM $1") == "1:0:sentinel" ]]
}
reset_target() { psql_ -c "DELETE FROM $1 WHERE id::text <> '0'"; }

# expect_abort WHAT WANT_RC TABLE FORMAT PSQL_FLAG INPUT -- HSMSEAL_ARGS...
# Runs INPUT | hsmseal ARGS | psql [PSQL_FLAG] -c "\copy TABLE FROM pstdin"
# and checks hsmseal exits WANT_RC, psql fails on the abort marker, and
# TABLE still holds only its sentinel row.
expect_abort() {
    local what=$1 want=$2 table=$3 fmt=$4 single=$5 input=$6
    shift 7
    local rc
    set +e
    "$HSMSEAL" "$@" <"$input" 2>"$WORK/hsmseal.err" \
        | psql_ $single -c "\\copy $table FROM pstdin (${LOAD[$fmt]})" >/dev/null 2>"$WORK/psql.err"
    rc=("${PIPESTATUS[@]}")
    set -e
    [[ ${rc[0]} == "$want" ]] \
        || { log "$what: hsmseal exited ${rc[0]}, expected $want: $(cat "$WORK/hsmseal.err")"; exit 1; }
    [[ ${rc[1]} != 0 ]] || { log "$what: psql exited 0 after a failed hsmseal run"; exit 1; }
    grep -q 'hsmseal: aborted' "$WORK/psql.err" \
        || { log "$what: psql failed, but not on the abort marker: $(cat "$WORK/psql.err")"; exit 1; }
    untouched "$table" || { log "$what: $table was changed by a failed run"; exit 1; }
    log "$what: hsmseal exit ${rc[0]}, psql failed ($(grep -m1 ERROR "$WORK/psql.err" | cut -c1-60)), $table untouched"
}

# The same pipeline with good input loads every row: the failures above are
# the marker's doing, not a mismatch between dump and table.
expect_load() {
    local what=$1 table=$2 fmt=$3 input=$4
    shift 5
    "$HSMSEAL" "$@" <"$input" | psql_ -1 -c "\\copy $table FROM pstdin (${LOAD[$fmt]})"
    local n
    n=$(psql_ -At -c "SELECT count(*) FROM $table")
    [[ $n == $((FROWS + 1)) ]] || { log "$what: loaded $((n - 1)) rows, expected $FROWS"; exit 1; }
    reset_target "$table"
}

# Damages the last token on the line of record id $DROW (in its record
# part, near the end, so the batch key still unwraps).
damage() {
    python3 - "$1" "$2" "$DROW" <<'PY'
import re, sys
src, dst, rid = sys.argv[1], sys.argv[2], sys.argv[3].encode()
lines = open(src, "rb").read().split(b"\n")
i = next(i for i, l in enumerate(lines) if re.match(rb"%s[,\t]" % rid, l))
toks = list(re.finditer(rb"hsc[12]\.[A-Za-z0-9_-]+", lines[i]))
p = toks[-1].end() - 10
l = lines[i]
lines[i] = l[:p] + (b"B" if l[p:p + 1] == b"A" else b"A") + l[p + 1:]
open(dst, "wb").write(b"\n".join(lines))
PY
}

psql_ -c "\\copy (SELECT * FROM small ORDER BY id) TO '$WORK/small.csv' CSV HEADER"
psql_ -c "\\copy (SELECT * FROM small ORDER BY id) TO '$WORK/small.tsv' (FORMAT csv, DELIMITER E'\\t', HEADER)"
psql_ -c "\\copy (SELECT * FROM small ORDER BY id) TO '$WORK/small.pgcopy' (FORMAT text, HEADER)"
NULLID="SELECT CASE WHEN id = $FROWS THEN NULL ELSE id END AS id, full_name, email, national_id, notes, created_at, balance, active FROM small ORDER BY small.id"
psql_ -c "\\copy ($NULLID) TO '$WORK/nullid.csv' CSV HEADER"
psql_ -c "\\copy ($NULLID) TO '$WORK/nullid.tsv' (FORMAT csv, DELIMITER E'\\t', HEADER)"
psql_ -c "\\copy ($NULLID) TO '$WORK/nullid.pgcopy' (FORMAT text, HEADER)"

for fmt in csv tsv pgcopy; do
    "$HSMSEAL" columns encrypt --key pii --format "$fmt" "${COLUMNS[@]}" \
        -i "$WORK/small.$fmt" -o "$WORK/small.enc.$fmt"
    damage "$WORK/small.enc.$fmt" "$WORK/damaged.$fmt"
    cmp -s "$WORK/small.enc.$fmt" "$WORK/damaged.$fmt" && { log "$fmt: damage() changed nothing"; exit 1; }

    expect_load "$fmt decrypt" target_plain "$fmt" "$WORK/small.enc.$fmt" \
        -- columns decrypt --format "$fmt" "${COLUMNS[@]}"
    expect_load "$fmt encrypt" target_enc "$fmt" "$WORK/small.$fmt" \
        -- columns encrypt --key pii --format "$fmt" "${COLUMNS[@]}"
    for single in -1 ""; do
        mode="psql${single:+ $single}"
        expect_abort "$fmt decrypt, damaged token, $mode" 3 target_plain "$fmt" "$single" "$WORK/damaged.$fmt" \
            -- columns decrypt --format "$fmt" "${COLUMNS[@]}"
        expect_abort "$fmt encrypt, NULL row id at the last row, $mode" 8 target_enc "$fmt" "$single" "$WORK/nullid.$fmt" \
            -- columns encrypt --key pii --format "$fmt" "${COLUMNS[@]}"
        # Refused before any output (stdin without --format): the marker's
        # first line is taken for the header, its second line fails.
        expect_abort "$fmt encrypt, refused before output, $mode" 2 target_enc "$fmt" "$single" "$WORK/small.$fmt" \
            -- columns encrypt --key pii "${COLUMNS[@]}"
    done
done
log "failed runs never loaded a row: every psql failed on the abort marker"
