#!/usr/bin/env bash
# Linux boot time to /init under qemu TCG: `cpushare-node vm run` (the vm crate's qemu
# backend: sandbox, fd-passed serial/QMP, KVM probe, TSC hint) against plain qemu
# with TESTING.md's reference command line, same kernel/initrd/cmdline, alternating
# runs. Prints per-run times, medians and the ratio.
#
#   scripts/bench-vm-qemu.sh [RUNS]        (default 7; needs root? no; needs qemu)
#
# Build first: cargo build -p node (uses target/debug/cpushare-node, or $CPUSHARE_NODE_BIN).
set -euo pipefail
runs="${1:-7}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
node="${CPUSHARE_NODE_BIN:-$target/debug/cpushare-node}"
[ -x "$node" ] || { echo "bench-vm-qemu: $node not built: cargo build -p node" >&2; exit 1; }
bash "$here/build-test-guest.sh" "$target/test-guest"
g="$target/test-guest"
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT

# The host TSC rate, as the backend passes it (see vm/src/qemu/mod.rs add_tsc_hint),
# so the reference boots under the same conditions.
khz="$(awk '/^cpu MHz/ {printf "%d", $4 * 1000; exit}' /proc/cpuinfo)"
append="console=ttyS0 quiet cs.nonet cs.run=true tsc_early_khz=$khz"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# Runs "$@", prints "<ms to the cs-init line> <ms to exit> <guest uptime at /init>".
measure() {
    local t0 t_init="" guest_s="" line
    t0=$(now_ms)
    while IFS= read -r line; do
        case "$line" in
            *"cs-init: /init at "*)
                t_init=$(( $(now_ms) - t0 ))
                guest_s="${line##*/init at }"; guest_s="${guest_s%s*}"
                ;;
        esac
    done < <("$@" 2>/dev/null)
    echo "${t_init:-NA} $(( $(now_ms) - t0 )) ${guest_s:-NA}"
}

ours() {
    measure "$node" --data-dir "$data" vm run --quiet --backend qemu --accel tcg --memory-mib 256 \
        --kernel "$g/vmlinuz" --initrd "$g/initrd.cpio.gz" --append "$append"
}
reference() {
    measure qemu-system-x86_64 -M microvm,acpi=on,pit=on,pic=on,rtc=on -accel tcg -m 256 \
        -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
        -kernel "$g/vmlinuz" -initrd "$g/initrd.cpio.gz" -append "$append"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2}'; }

ours >/dev/null; reference >/dev/null # warm the page cache
o_init=(); o_exit=(); r_init=(); r_exit=(); o_guest=(); r_guest=()
printf "%-4s %-10s %10s %10s %12s\n" run who "to /init" "to exit" "guest uptime"
for i in $(seq 1 "$runs"); do
    read -r a b c < <(ours);      o_init+=("$a"); o_exit+=("$b"); o_guest+=("$c")
    printf "%-4s %-10s %8s ms %8s ms %11ss\n" "$i" "vm run" "$a" "$b" "$c"
    read -r a b c < <(reference); r_init+=("$a"); r_exit+=("$b"); r_guest+=("$c")
    printf "%-4s %-10s %8s ms %8s ms %11ss\n" "$i" "qemu ref" "$a" "$b" "$c"
done
mo=$(printf "%s\n" "${o_init[@]}" | median); mr=$(printf "%s\n" "${r_init[@]}" | median)
eo=$(printf "%s\n" "${o_exit[@]}" | median); er=$(printf "%s\n" "${r_exit[@]}" | median)
go=$(printf "%s\n" "${o_guest[@]}" | median); gr=$(printf "%s\n" "${r_guest[@]}" | median)
echo
echo "median start -> /init:  vm run ${mo} ms, plain qemu ${mr} ms, ratio $(awk -v a="$mo" -v b="$mr" 'BEGIN {printf "%.2f", a / b}')"
echo "median start -> exit:   vm run ${eo} ms, plain qemu ${er} ms, ratio $(awk -v a="$eo" -v b="$er" 'BEGIN {printf "%.2f", a / b}')"
echo "median guest uptime at /init: vm run ${go} s, plain qemu ${gr} s"
echo "host: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(qemu-system-x86_64 --version | head -n1)"
