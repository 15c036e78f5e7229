#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ with libFuzzer and coverage instrumentation on the stable
# toolchain (the flags cargo-fuzz passes, without the address sanitizer, which needs
# nightly), then runs each for a bounded time. Usage: scripts/fuzz.sh [SECONDS per target]
# A crash stops the run with a non-zero status; its input is saved under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
target=x86_64-unknown-linux-gnu
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps these flags off build scripts and proc macros.
cargo build --release --locked --target "$target" --manifest-path fuzz/Cargo.toml
for t in decode; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus" fuzz/artifacts
    echo "fuzzing $t for $seconds s"
    "fuzz/target/$target/release/$t" -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix=fuzz/artifacts/ "$corpus" 2>&1 | tail -n 12
done
