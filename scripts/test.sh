#!/usr/bin/env bash
# Ferry's test command (README.md): installs what the tests need, then checks formatting,
# lints, docs, and runs every test on the real /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
for tool in as ld objcopy; do command -v "$tool" >/dev/null || need_pkgs+=(binutils); done
# libFuzzer (fuzz/) is C++.
command -v c++ >/dev/null || need_pkgs+=(g++)
# Test certificates for mutual TLS (scripts/make-test-certs.sh).
command -v openssl >/dev/null || need_pkgs+=(openssl)
# Shaped links between network namespaces (ferry-bench's netshape and QEMU tests).
for tool in ip tc; do command -v "$tool" >/dev/null || need_pkgs+=(iproute2); done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    echo "installing: ${need_pkgs[*]}"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if [ ! -w /dev/kvm ]; then
    echo "error: /dev/kvm is missing or not writable; Ferry's tests run real VMs" >&2
    exit 1
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# Every test that did not run, with its reason: none may pass without running.
echo "skipped tests (#[ignore] with a reason):"
grep -E '^test .* \.\.\. ignored' "$log" | sed 's/^test /  /' || echo "  none"
# The wire decoder's fuzz target, built and run for a bounded time.
scripts/fuzz.sh 30
