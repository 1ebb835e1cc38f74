#!/usr/bin/env bash
# The HSM hot path (wrap = C_Encrypt, unwrap = C_Decrypt on a key already
# found) for one or more hsmseal binaries, side by side in one run:
# `columns encrypt --batch-size 1` makes one wrap per row, `columns decrypt`
# of its output one unwrap per row. Runs alternate between the binaries and
# each figure is the median of 5 runs (HSM calls / seconds, from --stats).
#
# Usage: scripts/bench-wraps.sh BINARY [BINARY...]    (e.g. before and after)
# Environment: ROWS (default 20000). Binaries from before issue 9 refuse
# `-o /dev/null` (they would only replace it with --force, which this
# script must never pass: as root that turned /dev/null into a file).
set -euo pipefail
(($# >= 1)) || { echo "usage: $0 BINARY [BINARY...]" >&2; exit 2; }
ROWS=${ROWS:-20000}
MODULE=${HSMSEAL_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
DIR=$(mktemp -d /tmp/hsmseal-bench-wraps.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
mkdir "$DIR/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$DIR" >"$DIR/softhsm2.conf"
export SOFTHSM2_CONF=$DIR/softhsm2.conf HSMSEAL_PKCS11_MODULE=$MODULE
export HSMSEAL_TOKEN=bench HSMSEAL_PIN=user-pin-1234
softhsm2-util --init-token --free --label bench --pin "$HSMSEAL_PIN" --so-pin so-pin-5678 >/dev/null
cd "$DIR"
"$1" -q key create k >/dev/null
{ echo id,v; seq 1 "$ROWS" | sed 's/.*/&,value&/'; } >rows.csv
"$1" -q columns encrypt --key k --columns v --batch-size 1 -i rows.csv -o enc.csv

# One run: prints HSM calls per second.
rate() {
    "$@" --json --stats 2>&1 >/dev/null | python3 -c '
import json, sys
s = json.loads(sys.stdin.read().strip().splitlines()[-1])["stats"]
print(round(s["hsm_calls"] / s["seconds"]))'
}

declare -A results
for round in 1 2 3 4 5; do
    for bin in "$@"; do
        for jobs in 1 2; do
            results["$bin wrap $jobs"]+="$(rate "$bin" columns encrypt --key k --columns v --batch-size 1 -j "$jobs" -i rows.csv -o /dev/null) "
            results["$bin unwrap $jobs"]+="$(rate "$bin" columns decrypt --columns v -j "$jobs" -i enc.csv -o /dev/null) "
        done
    done
done
median() { tr ' ' '\n' | grep . | sort -n | sed -n 3p; }
printf '%-40s %-7s %5s %10s\n' binary op jobs "calls/s"
for bin in "$@"; do
    for op in wrap unwrap; do
        for jobs in 1 2; do
            printf '%-40s %-7s %5s %10s\n' "$bin" "$op" "$jobs" "$(median <<<"${results["$bin $op $jobs"]}")"
        done
    done
done
