#!/bin/sh
# Runs a ferry-bench benchmark from a fresh checkout: installs QEMU 7.2 (the yardstick)
# with apt when it is missing, builds ferry and ferry-bench in release mode, then runs
# `ferry-bench "$@"`. Example: crates/ferry-bench/run.sh migrate --reps 5
# See BENCHMARKS.md at the repository root.
set -eu
cd "$(dirname "$0")/../.."
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "run.sh: installing qemu-system-x86 (apt)" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-system-x86 >&2
fi
cargo build --release -p ferry-cli -p ferry-bench >&2
exec target/release/ferry-bench "$@"
