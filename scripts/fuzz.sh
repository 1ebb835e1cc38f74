#!/usr/bin/env bash
# Runs hsmseal's fuzz targets (fuzz/fuzz_targets/, one per parser) with
# libFuzzer through cargo-fuzz, each for a bounded time, from the committed
# seed corpus. Used by `make fuzz` and CI; works as root on a fresh Debian
# machine with only the stable toolchain.
#
#   scripts/fuzz.sh [TARGET...]     all targets when none are named
#   FUZZ_SECONDS=N                  time per target (default 40)
#
# Stable Rust: cargo-fuzz's instrumentation flags (-Cpasses=sancov-module,
# -Cllvm-args=-sanitizer-coverage-*) are stable; only its sanitizers need
# -Z flags, so the targets are built with `--sanitizer none` (hsmseal's
# parsers are safe Rust: out-of-bounds access is a panic, which libFuzzer
# reports as a crash) and `--debug-assertions` (integer overflow panics too).
#
# New inputs the fuzzer finds go to target/fuzz/corpus/<target>/ (never
# into the committed seeds). A crash fails the run: its input is written to
# fuzz/artifacts/<target>/ and printed with the command that replays it.
# Each crash must become a regression: minimise it (`cargo fuzz tmin`),
# commit it under fuzz/regressions/<target>/, where tests/fuzz_regressions.rs
# replays it in `cargo test`, and fix the cause.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-40}
cargo_fuzz_version=0.13.2
tools=$PWD/target/fuzz-tools
# libfuzzer-sys compiles libFuzzer (C++) with the system compiler.
./scripts/install-deps.sh g++
if ! "$tools/bin/cargo-fuzz" --version 2>/dev/null | grep -qx "cargo-fuzz $cargo_fuzz_version"; then
    echo "fuzz: installing cargo-fuzz $cargo_fuzz_version into $tools" >&2
    cargo install cargo-fuzz --locked --version "$cargo_fuzz_version" --root "$tools"
fi
export PATH="$tools/bin:$PATH"

flags=(--fuzz-dir fuzz --target-dir target/fuzz --sanitizer none --debug-assertions)
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
cargo fuzz build "${flags[@]}"

failed=()
for t in "${targets[@]}"; do
    work=target/fuzz/corpus/$t
    mkdir -p "$work" "fuzz/artifacts/$t"
    dirs=("$work" "fuzz/corpus/$t")
    [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
    extra=()
    [ -f "fuzz/dict/$t.dict" ] && extra+=("-dict=fuzz/dict/$t.dict")
    log=target/fuzz/$t.log
    echo "fuzz: $t for ${seconds}s (log: $log)" >&2
    # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: memory
    # that grows without bound is a finding too.
    if cargo fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
        grep -E '^stat::number_of_executed_units|^#[0-9]+ *DONE' "$log" | tail -2 | sed "s/^/fuzz: $t: /" >&2 || true
    else
        failed+=("$t")
        grep -E -A3 'panicked at|ERROR: libFuzzer|^SUMMARY' "$log" | head -n 30 >&2 || tail -n 40 "$log" >&2
        grep -o 'Test unit written to [^ ]*' "$log" | sed "s/^/fuzz: $t: /" >&2 || true
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    echo "fuzz: replay a crash with: PATH=$tools/bin:\$PATH cargo fuzz run ${flags[*]} TARGET fuzz/artifacts/TARGET/FILE" >&2
    exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s each without a finding" >&2
