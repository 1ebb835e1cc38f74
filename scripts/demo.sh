#!/usr/bin/env bash
# `make demo`: the operator's job end to end on a local SoftHSM2 token.
# Creates a dev token and a key, encrypts a sample backup, inspects,
# verifies and decrypts it, rotates the key and rewraps the file, seals column dumps and a whole tree with
# parallel workers, and checks the audit log. Runs in target/demo
# (recreated each time); touches no other token.
set -euo pipefail
BIN=$(realpath "${1:-target/release/hsmseal}")
DEMO=target/demo
rm -rf "$DEMO"
mkdir -p "$DEMO"
cd "$DEMO"
# Use only the demo's own token and config.
unset SOFTHSM2_CONF HSMSEAL_CONFIG HSMSEAL_PKCS11_MODULE HSMSEAL_TOKEN HSMSEAL_PIN HSMSEAL_PIN_FILE HSMSEAL_KEY || true

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$BIN" init --dev
step "$BIN" key create backups
step "$BIN" key list

# A sample "backup": a SQL dump of a few tables, a few MiB.
python3 - <<'PY' > backup.sql
import random
random.seed(7)
print("-- sample database dump")
print("CREATE TABLE users (id int, name text, email text);")
print("COPY users (id, name, email) FROM stdin;")
for i in range(60000):
    print(f"{i}\tUser {i}\tuser{i}@example.com")
print("\\.")
PY
ls -l backup.sql
step "$BIN" encrypt --key backups backup.sql
step "$BIN" inspect backup.sql.hseal
step "$BIN" verify backup.sql.hseal
step "$BIN" decrypt -o restored.sql backup.sql.hseal
step cmp backup.sql restored.sql
echo "restored.sql is identical to backup.sql:"
head -5 restored.sql

echo
echo "And a stream, as in: pg_dump mydb | hsmseal encrypt --key backups > mydb.sql.hseal"
step sh -c "cat backup.sql | '$BIN' encrypt --key backups > streamed.hseal && '$BIN' decrypt < streamed.hseal | cmp - backup.sql && echo 'stream round trip OK'"

echo
echo "Tampering is detected: flipping one bit of the payload"
cp backup.sql.hseal tampered.hseal
python3 -c "import sys; b=bytearray(open('tampered.hseal','rb').read()); b[5000]^=1; open('tampered.hseal','wb').write(b)"
if "$BIN" decrypt -o tampered.sql tampered.hseal; then
    echo "demo: tampered file was accepted" >&2; exit 1
else
    echo "exit code $? and no tampered.sql: $(test -e tampered.sql && echo PRESENT || echo absent)"
fi

echo
echo "Key rotation: a new version in the HSM, then the file's header is rewrapped (payload untouched)"
step "$BIN" key rotate backups
step "$BIN" rewrap backup.sql.hseal
step "$BIN" inspect backup.sql.hseal
step "$BIN" decrypt -o restored2.sql backup.sql.hseal
step cmp backup.sql restored2.sql

echo
echo "Column dumps: selected columns become per-cell tokens bound to table, column and row"
printf 'id,name,ssn,city\n1,"Doe, Jane",123-45-6789,Paris\n2,"O\x27Neil ""Mac""",,Oslo\n' > users.csv
step cat users.csv
step "$BIN" columns encrypt --key backups --columns name,ssn --row-id id --context app.users users.csv -o users.enc.csv
step cat users.enc.csv
step "$BIN" columns decrypt --columns name,ssn --row-id id --context app.users users.enc.csv -o users.dec.csv
step cmp users.csv users.dec.csv
echo "users.dec.csv is byte-identical to users.csv"

echo
echo "A whole tree: every file encrypted by 2 workers into a mirror directory, then verified"
mkdir -p tree/2025/01 tree/2025/02
for m in 01 02; do for d in 1 2 3; do head -c $((d * 40000)) backup.sql > "tree/2025/$m/day$d.sql"; done; done
step "$BIN" --jobs 2 encrypt --key backups -r tree --output-dir sealed
step "$BIN" --json verify -r sealed
step "$BIN" decrypt -r sealed --output-dir unsealed
step diff -r tree unsealed
echo "unsealed/ is identical to tree/"

echo
echo "Every run above left one line in the audit log, chained and MAC'd by a key in the HSM"
step tail -n 2 .hsmseal/audit.log
step "$BIN" audit verify

echo
echo "demo OK (files in $DEMO)"
