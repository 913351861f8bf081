#!/usr/bin/env bash
# Builds the distcc build-farm guest from Debian packages (issue 18), cached under
# target/distcc-guest/. Nothing binary lives in the repo: every run fetches the
# packages from this machine's configured apt sources (mmdebstrap reads them).
#
#   scripts/build-distcc-guest.sh [OUTDIR]   (default: ${CARGO_TARGET_DIR:-target}/distcc-guest)
#   EXTRA_PACKAGES="strace" scripts/build-distcc-guest.sh OUTDIR2   (an image update)
#
# Output (OUTDIR/):
#   vmlinuz     Debian's linux-image-cloud-amd64 kernel
#   initrd.img  Debian's initramfs (initramfs-tools, only the modules this guest needs)
#   disk.ext4   the ext4 root: Debian bookworm with gcc, make, distccd, nfs-common
#   cmdline     the kernel command line to import the image with (append cs.* options)
#   packages    the installed packages and versions
#   build.log   mmdebstrap's log, each line with the seconds since the start
# Import: cpushare-node image import --kernel vmlinuz --initrd initrd.img \
#             --cmdline "$(cat cmdline)" disk.ext4
#
# The guest boots a plain init (/sbin/cs-init, no systemd: fastest under TCG): it
# gets eth0's address by DHCP from the buyer's overlay, starts distccd allowing only
# the DHCP server (the buyer's overlay address), logs distccd to the serial console
# (which the seller streams to the buyer), mounts the buyer's NFS export when asked,
# and runs an optional task. Kernel command line options read by cs-init:
#   cs.nfs=<export path>           mount <buyer>:<path> (NFSv4) on /mnt/buyer, retrying
#   cs.run64=<base64 shell script> run it after distccd is up (output to the console)
# Console markers: "cs-dhcp: <ip> buyer <ip>", "cs-distccd: up", "cs-nfs: mounted",
# "cs-task: exit <status>".
#
# Needs root (mmdebstrap's root mode, chroot, a tmpfs mount), mmdebstrap, e2fsprogs.
# About a minute. Two builds of the same packages are byte-identical (fixed
# SOURCE_DATE_EPOCH times, filesystem UUID and hash seed, no logs or caches), so a
# rebuild moves no chunks; one more package moved ~13 % of the image's chunks here
# (mkfs renumbers the inodes after the new files: docs/bench/distcc.md).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="${1:-${CARGO_TARGET_DIR:-$root/target}/distcc-guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
extra="${EXTRA_PACKAGES:-}"
suite="${SUITE:-bookworm}"
disk_mib="${DISK_MIB:-1024}"

exec 9>"$out/.lock"
flock 9

[ "$(id -u)" = 0 ] || { echo "build-distcc-guest: needs root (mmdebstrap root mode)" >&2; exit 1; }
for tool in mmdebstrap mkfs.ext4; do
    command -v "$tool" >/dev/null || {
        echo "build-distcc-guest: '$tool' not found; install: apt-get install -y mmdebstrap e2fsprogs" >&2
        exit 1
    }
done

# The machine's own apt sources (deb822 or one-line), passed to mmdebstrap as files.
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && grep -q "$suite" "$f" && sources+=("$f")
done
[ "${#sources[@]}" -gt 0 ] || { echo "build-distcc-guest: no apt source for $suite in /etc/apt" >&2; exit 1; }

packages="linux-image-cloud-amd64,initramfs-tools,zstd,busybox,iproute2,kmod,mount,gcc,make,libc6-dev,distcc,nfs-common"
[ -n "$extra" ] && packages="$packages,${extra// /,}"

# Cached: same script, same package list, built within a day.
self_hash="$(cat "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
stamp="$self_hash $suite $packages $disk_mib"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
    && [ -n "$(find "$out/stamp" -mmin -1440)" ] \
    && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/disk.ext4" ]; then
    exit 0
fi

t0=${EPOCHREALTIME/./}
# Each line of mmdebstrap's log with the seconds since the start (where the time goes);
# no fork per line, so the stamps do not lag.
timed() {
    local l t
    while IFS= read -r l; do
        t=$((${EPOCHREALTIME/./} - t0))
        printf '[%4d.%d s] %s\n' $((t / 1000000)) $((t / 100000 % 10)) "$l"
    done
}
echo "build-distcc-guest: building $suite with $packages into $out" >&2
work="$(mktemp -d "$out/.build.XXXXXX")"
rootfs="$work/root"
# The root tree lives in memory: unpacking 20,000 files and deleting them afterwards
# took 25 s of disk I/O here on its own (the ext4 image is written to disk).
mkdir "$rootfs"
mount -t tmpfs -o size=2g,mode=755 cs-distcc-root "$rootfs"
trap 'umount -l "$rootfs" 2>/dev/null; rm -rf "$work"' EXIT

export SOURCE_DATE_EPOCH=1700000000
# The initramfs only needs to find the ext4 root on virtio-blk behind ACPI virtio-mmio
# (qemu microvm) or virtio-pci: MODULES=list keeps it small, so it unpacks fast. The
# list goes in modules.d (not a conffile) before the kernel is installed, so the
# initramfs the kernel's postinst makes is already the final one.
setup_hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf "MODULES=list\nCOMPRESS=zstd\n" >"$1/etc/initramfs-tools/conf.d/cs.conf"
printf "virtio_mmio\nvirtio_pci\nvirtio_blk\next4\ncrc32c_generic\n" >"$1/usr/share/initramfs-tools/modules.d/cs-virtio"'
# No man pages, docs (but copyrights), locales or info. Given to dpkg only after
# mmdebstrap has extracted the essential packages: as a --dpkgopt it would also make
# that extraction pipe every package through a Python tar filter (40 s of 2.5 min);
# the few files that extraction leaves are deleted at the end.
nodoc_hook='printf "%s\n" "path-exclude=/usr/share/man/*" "path-exclude=/usr/share/doc/*" \
    "path-include=/usr/share/doc/*/copyright" "path-exclude=/usr/share/locale/*" \
    "path-exclude=/usr/share/info/*" >"$1/etc/dpkg/dpkg.cfg.d/99cs-nodoc"'
nodoc_clean='rm -rf "$1"/usr/share/man/* "$1"/usr/share/locale/* "$1"/usr/share/info/*
find "$1/usr/share/doc" -mindepth 1 ! -type d ! -path "$1/usr/share/doc/*/copyright" -delete
find "$1/usr/share/doc" -mindepth 1 -type d -empty -delete'
# eatmydata: dpkg without fsync (the root is copied into an ext4 image afterwards).
mmdebstrap --mode=root --variant=essential --format=directory --verbose \
    --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata \
    --include="$packages" \
    --setup-hook="$setup_hook" \
    --extract-hook="$nodoc_hook" \
    --customize-hook="$nodoc_clean" \
    "$suite" "$rootfs" "${sources[@]}" 2>&1 | timed >"$work/mmdebstrap.log" || {
    tail -n 40 "$work/mmdebstrap.log" >&2
    echo "build-distcc-guest: mmdebstrap failed (log above)" >&2
    exit 1
}

# --- the plain init and its pieces -------------------------------------------------
install -d "$rootfs/etc/cs" "$rootfs/mnt/buyer"
cat >"$rootfs/etc/cs/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configure eth0 from the buyer's DHCP lease; remember the server (the
# buyer's overlay address), the only client distccd accepts.
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-16}" dev "$interface"
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        echo "$ip" >/run/cs-ip
        echo "${serverid:-${router%% *}}" >/run/cs-buyer
        ;;
esac
exit 0
EOF
chmod 755 "$rootfs/etc/cs/udhcpc.script"

cat >"$rootfs/sbin/cs-init" <<'EOF'
#!/bin/sh
# cpushare distcc guest init (scripts/build-distcc-guest.sh): PID 1, no service manager.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o remount,rw /
exec </dev/console >/dev/console 2>&1
echo "cs-init: up at $(cut -d' ' -f1 /proc/uptime)s"
echo cs-distcc >/proc/sys/kernel/hostname
for m in virtio_net af_packet nfsv4; do modprobe -q "$m"; done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac; done; return 1; }

ip link set lo up
ip link set eth0 up
until [ -s /run/cs-buyer ]; do
    busybox udhcpc -i eth0 -q -n -t 10 -T 1 -s /etc/cs/udhcpc.script >/dev/null 2>&1
done
ip=$(cat /run/cs-ip)
buyer=$(cat /run/cs-buyer)
echo "cs-dhcp: $ip buyer $buyer at $(cut -d' ' -f1 /proc/uptime)s"

# distccd: only the buyer may submit jobs; its log (one line per job) goes to the
# console, which the seller streams to the buyer. One job more than CPUs: a job
# spends part of its time receiving source and sending the object back.
distccd --daemon --no-detach --user distccd --allow "$buyer/32" --listen "$ip" \
    --jobs "$(($(nproc) + 1))" --log-level info --log-stderr &
echo "cs-distccd: up (allow $buyer/32) at $(cut -d' ' -f1 /proc/uptime)s"

export_path="$(arg cs.nfs || true)"
if [ -n "$export_path" ]; then
    (
        until mount -t nfs4 -o "vers=4.1,proto=tcp,hard,timeo=50" "$buyer:$export_path" /mnt/buyer 2>/dev/null; do
            sleep 2
        done
        echo "cs-nfs: mounted $buyer:$export_path at $(cut -d' ' -f1 /proc/uptime)s"
    ) &
fi

task="$(arg cs.run64 | base64 -d 2>/dev/null || true)"
if [ -n "$task" ]; then
    (
        sh -c "$task"
        echo "cs-task: exit $?"
    ) &
fi

# PID 1 reaps orphans until the host stops the guest.
while true; do wait; sleep 1; done
EOF
chmod 755 "$rootfs/sbin/cs-init"

# Determinism and size: nothing that changes per build or is useless in the guest.
rm -rf "$rootfs"/var/log/* "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old "$rootfs"/boot/initrd.img-*.bak
: >"$rootfs/etc/machine-id"
echo cs-distcc >"$rootfs/etc/hostname"
echo "/dev/vda / ext4 rw 0 1" >"$rootfs/etc/fstab"
chroot "$rootfs" dpkg-query -W -f '${Package} ${Version}\n' >"$work/packages"

cp "$(ls "$rootfs"/boot/vmlinuz-* | head -n1)" "$work/vmlinuz"
cp "$(ls "$rootfs"/boot/initrd.img-* | head -n1)" "$work/initrd.img"
# The kernel and initramfs travel as their own files of the image.
rm -f "$rootfs"/boot/vmlinuz-* "$rootfs"/boot/initrd.img-*
echo "console=ttyS0 root=/dev/vda rw init=/sbin/cs-init quiet panic=-1" >"$work/cmdline"

# Files made at build time (maintainer scripts, the init above) get the fixed date, so
# a rebuild with the same packages gives the same inodes and the same chunks.
echo "cs: rootfs done; mkfs.ext4" | timed >>"$work/mmdebstrap.log"
find "$rootfs" -xdev -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
# Access times too (files read by maintainer scripts carry the build's time).
find "$rootfs" -xdev -exec touch -h -a -d "@$SOURCE_DATE_EPOCH" {} +
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L csroot \
    -U 6b8d5a8e-4c4f-4b8a-9a34-7d1f0c9e2a11 -E hash_seed=0f6c3e8a-8f3e-4c66-b1a9-3d2b1c0e9f77 \
    -d "$rootfs" "$work/disk.ext4" "${disk_mib}M"
# mkfs.ext4 -d copies each file's ctime (the build's time, which touch cannot set):
# every inode table block differed between two builds of the same packages. The
# inodes it used are 2 (the root) and 11.. in order.
used=$(dumpe2fs -h "$work/disk.ext4" 2>/dev/null | awk -F: '/^Inode count/ { c = $2 } /^Free inodes/ { f = $2 } END { print c - f }')
{ echo "set_inode_field <2> ctime @$SOURCE_DATE_EPOCH"; seq 11 "$used" | sed "s/.*/set_inode_field <&> ctime @$SOURCE_DATE_EPOCH/"; } \
    | E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f - "$work/disk.ext4" >/dev/null 2>"$work/debugfs.log" || {
    cat "$work/debugfs.log" >&2
    echo "build-distcc-guest: setting the inodes' ctime failed" >&2
    exit 1
}

echo "cs: disk.ext4 done" | timed >>"$work/mmdebstrap.log"
mv -f "$work/mmdebstrap.log" "$work/build.log"
for f in vmlinuz initrd.img disk.ext4 cmdline packages build.log; do mv -f "$work/$f" "$out/$f"; done
echo "$stamp" >"$out/stamp"
echo "build-distcc-guest: done: $(wc -l <"$out/packages") packages, rootfs $(du -sm "$rootfs" | cut -f1) MiB, initrd $(($(stat -c %s "$out/initrd.img") >> 20)) MiB" >&2
