#!/usr/bin/env bash
# Local hand-overs of a 1 GiB workload guest, alternately with every thread free to run
# anywhere and with the source's vCPU on CPU 0 and every other thread of both processes on
# CPU 1. Prints each run's setup, total and downtime (ms, Ferry's own statistics) and the
# range of each. Shows whether engine threads waiting behind a busy vCPU's CPU is what
# spreads a local hand-over's times (BENCHMARKS.md, "`local`").
#
# Usage: cargo build --release -p ferry-cli && scripts/local-affinity.sh [RUNS]
# Needs /dev/kvm, taskset (util-linux) and at least 2 CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
ferry=target/release/ferry
image=$(ls -t target/*/build/ferry-guest-*/out/workload.elf 2>/dev/null | head -1)
[ -x "$ferry" ] || { echo "build first: cargo build --release -p ferry-cli" >&2; exit 2; }
[ -n "$image" ] || { echo "no workload.elf under target/: build ferry-guest first" >&2; exit 2; }
dir=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$dir"' EXIT

one() { # $1: free | pinned
    rm -f "$dir"/*.sock
    "$ferry" run --incoming "unix:$dir/mig.sock" --memory 1024M --serial null \
        --api-socket "$dir/dst.sock" --prepare none 2>/dev/null &
    local dst=$!
    "$ferry" run --kernel "$image" --append "ws=64M hb=1" --memory 1024M --serial null \
        --api-socket "$dir/src.sock" --memory-backend memfd 2>/dev/null &
    local src=$!
    sleep 3
    if [ "$1" = pinned ]; then
        for t in /proc/$src/task/* /proc/$dst/task/*; do
            local cpu=1
            [ "$(cat "$t/comm")" = vcpu0 ] && [ -d "/proc/$src/task/${t##*/}" ] && cpu=0
            taskset -p -c $cpu "${t##*/}" >/dev/null
        done
    fi
    "$ferry" remote --api-socket "$dir/src.sock" migrate "unix:$dir/mig.sock" --local \
        --json >"$dir/out.json"
    kill "$dst" 2>/dev/null || true
    wait "$src" "$dst" 2>/dev/null || true
    python3 - "$1" "$dir/out.json" >>"$dir/results" <<'EOF'
import json, sys
d = json.load(open(sys.argv[2]))
print(sys.argv[1], d["setup_ms"], d["total_ms"], d["downtime_ms"])
EOF
    tail -1 "$dir/results"
}

for _ in $(seq "$runs"); do
    one free
    one pinned
done
python3 - "$dir/results" <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1])]
for kind in ("free", "pinned"):
    r = [list(map(float, x[1:])) for x in rows if x[0] == kind]
    cols = list(zip(*r))
    print(f"{kind:6} {len(r)} runs: " + ", ".join(
        f"{n} {min(c):.2f}-{max(c):.2f} (median {sorted(c)[len(c) // 2]:.2f})"
        for n, c in zip(("setup", "total", "downtime"), cols)))
EOF
