#!/usr/bin/env bash
# The owner benchmark (issue 13): does the seller's machine stay the owner's?
# A single-threaded CPU-bound program on the host, alone and beside a jailed guest
# with as many vCPUs as the machine has cores spinning all of them: without a limit
# and with max_cpu_percent (default 50). Then the host's sequential write throughput
# (WRITE_MIB MiB + fsync), alone and while a jailed guest writes its disk flat out:
# without and with the guest's io limit (disk_mbps, default 20).
#
# The guests are started through vm::jail exactly as the seller starts them (own uid,
# no capabilities, own mount namespace, own cgroup under the guests' parent cgroup
# that carries max_cpu_percent; disk_mbps as qemu block throttling). The measuring
# code is the ignored test `owner_bench` in tests/jail_qemu.rs.
#   sudo ./scripts/bench-owner.sh      (SECS=5 ROUNDS=3 WRITE_MIB=1024 IO_MBPS=20 CPU_PERCENT=50)
# The markdown tables go to $OUT (default target/bench-owner.md) and stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "error: run as root (cgroups, setuid, mount namespaces): sudo $0" >&2; exit 1; }
OUT=${OUT:-$PWD/target/bench-owner.md}
mkdir -p "$(dirname "$OUT")"
bash scripts/build-test-guest.sh >/dev/null
BENCH_SECS=${SECS:-5} BENCH_ROUNDS=${ROUNDS:-3} BENCH_WRITE_MIB=${WRITE_MIB:-1024} \
BENCH_IO_MBPS=${IO_MBPS:-20} BENCH_CPU_PERCENT=${CPU_PERCENT:-50} BENCH_OUT=$OUT \
    cargo test -q -p cpushare-tests --test jail_qemu -- --ignored --nocapture --exact owner_bench >&2
echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), accel: $([ -w /dev/kvm ] && echo kvm || echo tcg)"
cat "$OUT"
