#!/usr/bin/env bash
# Several hsmseal processes on ONE SoftHSM2 token at once (issue 9, item 7):
# counts the runs that fail, so a change can be compared before and after.
# Not a test (it prints rates, it asserts nothing); tests/cli_concurrency.rs
# is the test.
#
# Usage: scripts/stress-token.sh [HSMSEAL_BINARY] [ROUNDS]
#   (default: target/release/hsmseal, 50 rounds per scenario)
# Scenarios (one fresh token in a temp directory, removed on exit):
#   encrypt4   4 encrypts of small files started together
#   pipeline   hsmseal decrypt -o - x.hseal | hsmseal columns decrypt ...
#   keyrotate  two `key rotate k2` at once (then: duplicate labels?)
#   side       key list, encrypt and rotate -r side by side
set -uo pipefail

HSMSEAL=${1:-target/release/hsmseal}
ROUNDS=${2:-50}
[[ -x $HSMSEAL ]] || { echo "stress-token: $HSMSEAL is not an executable" >&2; exit 2; }
HSMSEAL=$(cd "$(dirname "$HSMSEAL")" && pwd)/$(basename "$HSMSEAL")
MODULE=${HSMSEAL_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

DIR=$(mktemp -d /tmp/hsmseal-stress.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
mkdir "$DIR/tokens" "$DIR/work" "$DIR/logs"
cat >"$DIR/softhsm2.conf" <<EOF
directories.tokendir = $DIR/tokens
objectstore.backend = file
log.level = ERROR
EOF
export SOFTHSM2_CONF=$DIR/softhsm2.conf HSMSEAL_PKCS11_MODULE=$MODULE
export HSMSEAL_TOKEN=stress HSMSEAL_PIN=user-pin-1234
softhsm2-util --init-token --free --label stress --pin "$HSMSEAL_PIN" --so-pin so-pin-5678 >/dev/null
cd "$DIR/work"
"$HSMSEAL" -q key create k >/dev/null
"$HSMSEAL" -q key create k2 >/dev/null
"$HSMSEAL" -q key create pii >/dev/null

# $1: scenario name; runs its rounds, prints failed/total and a sample error.
report() {
    local name=$1 failed=$2 total=$3
    local sample
    sample=$(cat "$DIR"/logs/"$name".* 2>/dev/null | grep -v '^$' | sort | uniq -c | sort -rn | head -3)
    printf '%-10s %4d failed of %4d runs\n' "$name" "$failed" "$total"
    [[ -n $sample ]] && printf '%s\n' "$sample" | sed 's/^/             /'
}

# encrypt4
failed=0 total=0
for i in $(seq 1 "$ROUNDS"); do
    pids=()
    for j in 1 2 3 4; do
        head -c 1000 /dev/urandom >"in$j"
        "$HSMSEAL" -q encrypt --key k --force -o "in$j.hseal" "in$j" 2>>"$DIR/logs/encrypt4.$j" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do
        total=$((total + 1))
        wait "$p" || failed=$((failed + 1))
    done
done
report encrypt4 "$failed" "$total"

# pipeline
printf 'id,ssn\n1,111-22-3333\n2,444-55-6666\n' >plain.csv
"$HSMSEAL" -q columns encrypt --key pii --columns ssn -i plain.csv -o enc.csv
"$HSMSEAL" -q encrypt --key k -o enc.csv.hseal enc.csv
failed=0 total=0
for i in $(seq 1 "$ROUNDS"); do
    total=$((total + 1))
    "$HSMSEAL" -q decrypt -o - enc.csv.hseal 2>>"$DIR/logs/pipeline.1" |
        "$HSMSEAL" -q columns decrypt --format csv --columns ssn >out.csv 2>>"$DIR/logs/pipeline.2"
    status=("${PIPESTATUS[@]}")
    if [[ ${status[0]} != 0 || ${status[1]} != 0 ]] || ! cmp -s out.csv plain.csv; then
        failed=$((failed + 1))
    fi
done
report pipeline "$failed" "$total"

# keyrotate
failed=0 total=0
for i in $(seq 1 "$ROUNDS"); do
    "$HSMSEAL" -q key rotate k2 >/dev/null 2>>"$DIR/logs/keyrotate.1" & a=$!
    "$HSMSEAL" -q key rotate k2 >/dev/null 2>>"$DIR/logs/keyrotate.2" & b=$!
    total=$((total + 2))
    wait "$a" || failed=$((failed + 1))
    wait "$b" || failed=$((failed + 1))
done
report keyrotate "$failed" "$total"
dups=$("$HSMSEAL" --json key list 2>/dev/null | grep -o '"label":"hsmseal:k2:v[0-9]*"' | sort | uniq -d | wc -l)
echo "           duplicated k2 labels after the rounds: $dups"

# side by side
mkdir -p tree
for j in $(seq 1 20); do head -c 500 /dev/urandom >"tree/f$j"; done
"$HSMSEAL" -q encrypt --key k -r tree >/dev/null 2>&1
failed=0 total=0
for i in $(seq 1 "$ROUNDS"); do
    "$HSMSEAL" -q key list >/dev/null 2>>"$DIR/logs/side.list" & a=$!
    "$HSMSEAL" -q encrypt --key k --force -o side.hseal in1 2>>"$DIR/logs/side.encrypt" & b=$!
    "$HSMSEAL" -q rotate -r tree >/dev/null 2>>"$DIR/logs/side.rotate" & c=$!
    for p in $a $b $c; do
        total=$((total + 1))
        wait "$p" || failed=$((failed + 1))
    done
done
report side "$failed" "$total"
