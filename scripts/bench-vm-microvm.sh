#!/usr/bin/env bash
# microvm vs qemu -M microvm (same accelerator: KVM) on the same tiny PVH guest:
# time from spawning the VMM process to the guest's first serial byte, and the VMM's
# memory overhead (process RSS minus the resident guest RAM).
#
#   scripts/bench-vm-microvm.sh [ITERATIONS] [MEMORY_MIB]     (default 20, 64)
#
# Needs /dev/kvm, qemu-system-x86 and binutils. Prints a markdown table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
iters="${1:-20}"
mib="${2:-64}"
[ -e /dev/kvm ] || { echo "bench-vm-microvm: /dev/kvm missing" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "bench-vm-microvm: install qemu-system-x86" >&2; exit 1; }
echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), qemu $(qemu-system-x86_64 --version | head -1 | awk '{print $4}')"
cargo bench -q -p vm --bench microvm_start -- --iterations "$iters" --memory-mib "$mib"
