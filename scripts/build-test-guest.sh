#!/usr/bin/env bash
# Builds the Linux test guest from Debian packages, cached under target/test-guest/.
#
#   scripts/build-test-guest.sh [OUTDIR]      (default: $CARGO_TARGET_DIR or target, + /test-guest)
#
# Output (OUTDIR/):
#   vmlinuz          Debian's linux-image-*-cloud-amd64 bzImage
#   vmlinux          the same kernel decompressed (ELF, for PVH/ELF loaders)
#   initrd.cpio.gz   busybox initramfs; /init loads the virtio modules, runs udhcpc on
#                    eth0, then runs the command from the kernel command line
#   rootfs.ext4      ext4 root disk with the same busybox userland (boot it with the
#                    initrd and cs.root=/dev/vda: /init mounts it and switch_roots)
#   kernel-version   the kernel's version string
#
# Guest kernel command line (read by /init):
#   cs.run64=<base64 of a shell script>   run this after networking (sh -c)
#   cs.run=<word>                          same, for a command without spaces
#   cs.root=/dev/vda                       mount this ext4 disk and switch_root into it
#   cs.nonet                               skip DHCP
#   cs.keep                                do not power off after the command
# The ACPI power button (a host stop request) powers the guest off (busybox acpid).
# /init prints "cs-init: ..." progress lines, "cs-dhcp: <ip>" after a lease, and
# "cs-exit: <status>" after the command, then powers off (poweroff -f).
#
# Needs: apt-get (with lists), dpkg, cpio, gzip, lz4, e2fsprogs (mkfs.ext4), flock.
# Idempotent: a stamp of (kernel package version, this script's hash) skips rebuilding.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="${1:-${CARGO_TARGET_DIR:-$root/target}/test-guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

exec 9>"$out/.lock"
flock 9

for tool in apt-get apt-cache dpkg cpio gzip lz4 mkfs.ext4; do
    command -v "$tool" >/dev/null || {
        echo "build-test-guest: '$tool' not found; install: apt-get install -y busybox-static cpio lz4 e2fsprogs" >&2
        exit 1
    }
done

# Fast path: built today by this very script -> nothing to ask apt.
self_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(awk '{print $3}' "$out/stamp")" = "$self_hash" ] \
    && [ -n "$(find "$out/stamp" -mmin -1440)" ] \
    && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.cpio.gz" ] && [ -f "$out/rootfs.ext4" ]; then
    exit 0
fi

# The kernel the cloud meta-package points at today.
kpkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$kpkg" ]; then
    if [ -f "$out/stamp" ]; then
        echo "build-test-guest: apt-cache cannot resolve linux-image-cloud-amd64; using the cached guest" >&2
        exit 0
    fi
    echo "build-test-guest: apt-cache cannot resolve linux-image-cloud-amd64: run apt-get update" >&2
    exit 1
fi
kver_pkg="$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')"
stamp="$kpkg $kver_pkg $self_hash"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
    && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.cpio.gz" ] && [ -f "$out/rootfs.ext4" ]; then
    touch "$out/stamp"
    exit 0
fi

echo "build-test-guest: building $kpkg ($kver_pkg) into $out" >&2
work="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- download and unpack -----------------------------------------------------------
(
    cd "$work"
    for i in 1 2 3 4 5; do
        apt-get download "$kpkg" busybox-static >/dev/null 2>&1 && break
        [ "$i" = 5 ] && { echo "build-test-guest: apt-get download $kpkg busybox-static failed" >&2; exit 1; }
        sleep 3
    done
    mkdir kpkg bb
    dpkg -x "$kpkg"_*.deb kpkg
    dpkg -x busybox-static_*.deb bb
)
vmlinuz="$(ls "$work"/kpkg/boot/vmlinuz-*)"
kver="${vmlinuz##*/vmlinuz-}"
moddir="$work/kpkg/lib/modules/$kver"
[ -d "$moddir" ] || moddir="$work/kpkg/usr/lib/modules/$kver"

# --- decompressed ELF kernel: the payload is an LZ4 frame inside the bzImage ---------
off="$(grep -obUaP '\x02\x21\x4c\x18' "$vmlinuz" | head -n1 | cut -d: -f1 || true)"
if [ -n "$off" ]; then
    # lz4 stops at the end of the frame; trailing bytes make it complain, hence || true.
    tail -c +"$((off + 1))" "$vmlinuz" | lz4 -dc 2>/dev/null >"$work/vmlinux" || true
fi
if ! head -c 4 "$work/vmlinux" 2>/dev/null | grep -q 'ELF'; then
    echo "build-test-guest: warning: could not decompress an ELF vmlinux (no LZ4 payload)" >&2
    rm -f "$work/vmlinux"
fi

# --- userland ----------------------------------------------------------------------
rootdir="$work/root"
mkdir -p "$rootdir"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,newroot,root,var/www,lib/modules,usr/bin,usr/sbin,usr/share/udhcpc}
cp "$work/bb/bin/busybox" "$rootdir/bin/busybox"
for applet in $("$rootdir/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$rootdir/bin/$applet"
done

# Modules the guest needs, with their dependencies, in load order; built-ins skipped.
want="virtio_ring virtio virtio_mmio virtio_pci failover net_failover virtio_net virtio_blk af_packet crc32c_generic ext4 button evdev"
resolved=()
declare -A seen=()
# The package ships no modules.dep (depmod runs at install), so read each module's
# "depends=" from its .modinfo section.
declare -A modfile=()
while IFS= read -r f; do
    n="${f##*/}"; n="${n%%.ko*}"; modfile[${n//-/_}]="${f#$moddir/}"
done < <(find "$moddir" -name '*.ko*' -type f)
modcat() {
    case "$1" in
        *.ko.xz) xz -dc "$1" ;; *.ko.zst) zstd -qdc "$1" ;; *.ko.gz) gzip -dc "$1" ;; *) cat "$1" ;;
    esac
}
resolve() {
    local name="${1//-/_}" path deps d
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    path="${modfile[$name]:-}"
    [ -z "$path" ] && return 0 # built in (or absent): nothing to load
    deps="$(modcat "$moddir/$path" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')"
    for d in $deps; do resolve "$d"; done
    resolved+=("$path")
}
for m in $want; do resolve "$m"; done
: >"$rootdir/etc/modules.order"
for path in "${resolved[@]}"; do
    base="${path##*/}"
    case "$base" in
        *.ko) cp "$moddir/$path" "$rootdir/lib/modules/$base" ;;
        *.ko.xz) xz -dc "$moddir/$path" >"$rootdir/lib/modules/${base%.xz}" ;;
        *.ko.zst) zstd -qdc "$moddir/$path" >"$rootdir/lib/modules/${base%.zst}" ;;
        *.ko.gz) gzip -dc "$moddir/$path" >"$rootdir/lib/modules/${base%.gz}" ;;
    esac
    echo "${base%%.ko*}.ko" >>"$rootdir/etc/modules.order"
done

cat >"$rootdir/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configure eth0 from the lease.
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
        echo "$ip" >/run/cs-ip
        ;;
esac
exit 0
EOF
chmod +x "$rootdir/usr/share/udhcpc/default.script"
# busybox acpid: the action file maps an event to a handler under the conf dir.
mkdir -p "$rootdir/etc/acpi"
echo "PWRF power" >"$rootdir/etc/acpid.conf"
printf '#!/bin/sh\necho "cs-acpi: power button"\nsync\npoweroff -f\n' >"$rootdir/etc/acpi/power"
chmod +x "$rootdir/etc/acpi/power"

cat >"$rootdir/init" <<'EOF'
#!/bin/sh
# cpushare test guest init (see scripts/build-test-guest.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "cs-init: /init at $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /etc/modules.order); do
    grep -q "^${m%.ko} " /proc/modules || insmod "/lib/modules/$m" 2>/dev/null
done
cmdline="$(cat /proc/cmdline)"
arg() { for w in $cmdline; do case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac; done; return 1; }
flag() { for w in $cmdline; do [ "$w" = "$1" ] && return 0; done; return 1; }

root="$(arg cs.root)"
if [ -n "$root" ] && [ ! -f /etc/cs-rootfs ]; then
    i=0
    while [ ! -b "$root" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if mount -t ext4 "$root" /newroot; then
        echo "cs-init: switching root to $root"
        mount --move /dev /newroot/dev; mount --move /proc /newroot/proc; mount --move /sys /newroot/sys
        exec switch_root /newroot /init
    fi
    echo "cs-init: cannot mount $root"
fi
[ -f /etc/cs-rootfs ] && echo "cs-init: running from root disk $(cat /etc/cs-rootfs)"
ip link set lo up
# ACPI power button (a stop request from the host) -> clean power-off.
if ls /dev/input/event* >/dev/null 2>&1; then
    acpid -c /etc/acpi -a /etc/acpid.conf -l /dev/null
fi
if ! flag cs.nonet && [ -d /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -q -n -t 10 -T 1 -s /usr/share/udhcpc/default.script >/dev/null 2>&1
    if [ -s /run/cs-ip ]; then echo "cs-dhcp: $(cat /run/cs-ip)"; else echo "cs-dhcp: failed"; fi
fi
run="$(arg cs.run64 | base64 -d 2>/dev/null)"
[ -z "$run" ] && run="$(arg cs.run)"
status=0
if [ -n "$run" ]; then
    sh -c "$run"
    status=$?
fi
echo "cs-exit: $status"
sync
if flag cs.keep; then
    exec sh
fi
poweroff -f
EOF
chmod +x "$rootdir/init"

# --- initramfs ---------------------------------------------------------------------
(cd "$rootdir" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$work/initrd.cpio.gz"

# --- ext4 root disk: the same userland, marked as the real root --------------------
echo "$kver" >"$rootdir/etc/cs-rootfs"
mkfs.ext4 -q -F -L csroot -d "$rootdir" "$work/rootfs.ext4" 64M >/dev/null

cp "$vmlinuz" "$work/vmlinuz"
echo "$kver" >"$work/kernel-version"
for f in vmlinuz vmlinux initrd.cpio.gz rootfs.ext4 kernel-version; do
    [ -f "$work/$f" ] && mv -f "$work/$f" "$out/$f"
done
echo "$stamp" >"$out/stamp"
echo "build-test-guest: done: kernel $kver, modules: $(tr '\n' ' ' <"$rootdir/etc/modules.order")" >&2
