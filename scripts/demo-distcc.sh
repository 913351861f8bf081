#!/usr/bin/env bash
# The distcc build farm demo (issue 18): one buyer and several sellers, each in a
# network namespace of its own on this machine. The buyer rents COUNT guests of a
# Debian image with gcc and distccd (scripts/build-distcc-guest.sh) with
# `cpushare-node run`, exports a directory over NFS on its overlay address (NFS-Ganesha,
# a user-space server: this kernel has no nfsd), and builds zlib (Debian's source, the
# upstream tree; scripts/fetch-zlib-src.sh) with `make -j CC="distcc gcc"` and
# DISTCC_HOSTS set to the guests' overlay addresses; then runs zlib's own `make test`.
# It prints a timeline (image distributed, guests up, build done) and where the logs are.
#   sudo ./scripts/demo-distcc.sh      (SELLERS=2 COUNT=2; KEEP=1 keeps the work dir)
# Environment: CPUSHARE_NODE_BIN (a built binary instead of a release build),
#   ACCEL (auto|tcg|kvm, default auto: KVM where it runs Linux, else TCG),
#   LOCAL=1 (also build locally in the same run, for comparison), JOBS (make -j),
#   MEM (guest MiB, default 512), JAIL (on|off: the sellers' VMM jail, default on),
#   BENCH=1 (then also build with the first 1..COUNT guests and locally, timed),
#   ZLIB_CFLAGS (zlib's compiler flags, default -O0: under TCG a guest compiles zlib at
#     its own default -O3 about 3 x slower; with KVM sellers try -O3),
#   UPDATE="PACKAGE..." (then rebuild the image with these extra packages, import it and
#     run the guests again on the same sellers: it prints the bytes the update moved).
set -euo pipefail
cd "$(dirname "$0")/.."
SELLERS=${SELLERS:-2}
COUNT=${COUNT:-2}
ACCEL=${ACCEL:-auto}
MEM=${MEM:-512}
JAIL=${JAIL:-on}
ZLIB_CFLAGS=${ZLIB_CFLAGS:--O0}
[ "$(id -u)" = 0 ] || { echo "error: run as root (network namespaces, taps): sudo $0" >&2; exit 1; }
[ "$COUNT" -ge 1 ] && [ "$COUNT" -le "$SELLERS" ] || { echo "error: COUNT ($COUNT) must be 1..SELLERS ($SELLERS)" >&2; exit 1; }
for tool in distcc ganesha.nfsd qemu-system-x86_64 mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "error: '$tool' not found: apt-get install -y distcc nfs-ganesha nfs-ganesha-vfs qemu-system-x86 mmdebstrap" >&2; exit 1; }
done

BIN=${CPUSHARE_NODE_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release -q -p node
    BIN=$PWD/target/release/cpushare-node
fi
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
t_start=$EPOCHREALTIME
since() { awk -v a="${2:-$t_start}" -v b="$EPOCHREALTIME" 'BEGIN { printf "%6.1f s", b - a }'; }
say() { echo "[$(since)] $*"; }

say "building the guest image (cached: $TARGET/distcc-guest)"
bash scripts/build-distcc-guest.sh "$TARGET/distcc-guest"
GUEST=$TARGET/distcc-guest
ZLIB=$(bash scripts/fetch-zlib-src.sh "$TARGET/zlib-src")

WORK=$(mktemp -d /tmp/cpushare-distcc.XXXXXX)
T=dc$$
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in b br $(seq "$SELLERS"); do ip netns del "${T}$n" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The underlay: a bridge joining the buyer (10.214.0.1) and the sellers (.11, .12, ...).
ip netns add "${T}br"
ip -n "${T}br" link add br0 type bridge
ip -n "${T}br" link set br0 up
host() { # name ip
    ip netns add "${T}$1"
    ip link add eth0 netns "${T}$1" type veth peer name "p$1$T" netns "${T}br"
    ip -n "${T}$1" addr add "$2/24" dev eth0
    ip -n "${T}$1" link set eth0 up
    ip -n "${T}$1" link set lo up
    ip -n "${T}br" link set "p$1$T" master br0 up
}
host b 10.214.0.1
for i in $(seq "$SELLERS"); do host "$i" "10.214.0.$((10 + i))"; done
tx_bytes() { ip netns exec "${T}b" cat /sys/class/net/eth0/statistics/tx_bytes; }

start() { # name role [args...]
    local name=$1 role=$2; shift 2
    ip netns exec "${T}$name" "$BIN" --role "$role" --data-dir "$WORK/$name" \
        --listen /ip4/0.0.0.0/tcp/7450 "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    pids+=($!)
    for _ in $(seq 600); do
        "$BIN" --data-dir "$WORK/$name" status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "error: $name did not start; its log:" >&2
    cat "$WORK/$name.log" >&2
    exit 1
}
# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.5 s; gives up with WHAT.
wait_for() {
    local n=$(($1 * 2)) what=$2
    shift 2
    until "$@"; do
        n=$((n - 1))
        [ "$n" -gt 0 ] || { echo "error: $what (consoles: $WORK/b/leases/*/console.log; KEEP=1 keeps them)" >&2; exit 1; }
        sleep 0.5
    done
}
js() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# Bytes of chunk payload in the buyer's store (it starts empty, so after the first
# import: the image's distinct chunk bytes, what one seller downloads for a copy).
store_bytes() { "$BIN" --data-dir "$WORK/b" status --json | js 'd["store"]["size_bytes"]'; }
import_image() { # dir -> image id
    "$BIN" --data-dir "$WORK/b" image import --kernel "$1/vmlinuz" --initrd "$1/initrd.img" \
        --cmdline "$(cat "$1/cmdline") cs.nfs=/export cs.run64=$B64" "$1/disk.ext4" | grep -oE '[0-9a-f]{64}' | head -1
}

mkdir -p "$WORK/b"
printf '[buyer]\nbilling_period_s = 60\n' >"$WORK/b/node.toml"
start b buyer --config "$WORK/b/node.toml"
BUYER_ID=$(sed -n 's/^peer id: //p' "$WORK/b.out")
for i in $(seq "$SELLERS"); do
    mkdir -p "$WORK/$i"
    printf '[seller]\nmax_guests = 1\nprice_per_min = "0.01"\naccel = "%s"\nmemory_mib = %s\njail = "%s"\n' "$ACCEL" "$MEM" "$JAIL" >"$WORK/$i/node.toml"
    start "$i" seller --bootstrap "/ip4/10.214.0.1/tcp/7450/p2p/$BUYER_ID" --config "$WORK/$i/node.toml"
done
say "buyer at 10.214.0.1 and $SELLERS sellers (10.214.0.11..) are up"

# NFS: NFS-Ganesha (user space, NFSv4 over TCP only) in the buyer's namespace; the
# guests reach it on the buyer's overlay address 10.77.0.1 and mount it (cs.nfs=).
mkdir -p "$WORK/export" "$WORK/ganesha"
cat >"$WORK/ganesha/ganesha.conf" <<EOF
NFS_CORE_PARAM { Protocols = 4; NFS_Port = 2049; Enable_NLM = false; Enable_RQUOTA = false; }
NFSV4 { Graceless = true; RecoveryRoot = "$WORK/ganesha"; }
EXPORT {
    Export_Id = 1; Path = "$WORK/export"; Pseudo = /export;
    Access_Type = RW; Squash = No_Root_Squash; Protocols = 4; Transports = TCP; SecType = sys;
    FSAL { Name = VFS; }
}
EOF
ip netns exec "${T}b" ganesha.nfsd -F -f "$WORK/ganesha/ganesha.conf" -L "$WORK/ganesha/ganesha.log" \
    -p "$WORK/ganesha/ganesha.pid" -N NIV_EVENT &
pids+=($!)

# The guest's task: once the buyer's export is mounted, write 1 MiB of random bytes
# to it and print their hash on the console (the buyer checks the file it reads).
TASK='until mountpoint -q /mnt/buyer; do sleep 1; done; ip=$(cat /run/cs-ip); head -c 1048576 /dev/urandom >/mnt/buyer/from-$ip.tmp && sync && mv /mnt/buyer/from-$ip.tmp /mnt/buyer/from-$ip && echo "cs-nfs-wrote: from-$ip $(sha256sum </mnt/buyer/from-$ip | cut -d" " -f1)"'
B64=$(printf '%s' "$TASK" | base64 -w0)
IMAGE=$(import_image "$GUEST")
img_bytes=$(stat -c %s "$GUEST/disk.ext4")
distinct=$(store_bytes)
say "imported the guest image $IMAGE ($((img_bytes >> 20)) MiB disk, $(($(stat -c %s "$GUEST/vmlinuz") >> 20)) MiB kernel, $(($(stat -c %s "$GUEST/initrd.img") >> 20)) MiB initrd; $distinct bytes of distinct chunks)"
"$BIN" --data-dir "$WORK/b" image ls 2>/dev/null | sed 's/^/    /' || true

for _ in $(seq 240); do
    n=$("$BIN" --data-dir "$WORK/b" status --json | js 'd["market"].get("offers",0)')
    [ "$n" -ge "$SELLERS" ] && break
    sleep 0.5
done

tx0=$(tx_bytes)
say "cpushare-node run --image ${IMAGE:0:12}… --count $COUNT --min-mem-mib $MEM"
t_run=$EPOCHREALTIME
"$BIN" --data-dir "$WORK/b" run --image "$IMAGE" --count "$COUNT" --min-mem-mib "$MEM" --detach --json >"$WORK/run.json" 2>"$WORK/run.log"
hosts=()
for i in $(seq "$COUNT"); do hosts+=("10.77.0.$((1 + i))"); done
leases=$(js '" ".join(s["lease"] for s in d["slots"])' <"$WORK/run.json")
console() { cat "$WORK"/b/leases/*/console.log 2>/dev/null; }
first=""
for ip in "${hosts[@]}"; do
    wait_for 900 "guest $ip: distccd not up after 900 s" sh -c "cat '$WORK'/b/leases/*/console.log 2>/dev/null | grep -qa 'listening on $ip:3632'"
    say "guest $ip: distccd up"
    [ -n "$first" ] || first=$(since x "$t_run")
done
all=$(since x "$t_run")
tx1=$(tx_bytes)
say "image distributed: the buyer's uplink sent $((tx1 - tx0)) bytes for $COUNT guests (eth0 tx bytes): $(awk -v a=$((tx1 - tx0)) -v b="$distinct" 'BEGIN { printf "%.3f", a / b }') x the image's distinct chunk bytes"

# NFS round trip: each guest wrote a file; the buyer reads it and compares hashes.
for ip in "${hosts[@]}"; do
    wait_for 300 "guest $ip did not write to the NFS export in 300 s" sh -c "cat '$WORK'/b/leases/*/console.log 2>/dev/null | grep -qa 'cs-nfs-wrote: from-$ip '"
    want=$(console | sed -n "s/.*cs-nfs-wrote: from-$ip \([0-9a-f]*\).*/\1/p" | head -1)
    got=$(sha256sum <"$WORK/export/from-$ip" | cut -d' ' -f1)
    if [ "$want" = "$got" ]; then say "NFS: guest $ip wrote from-$ip (1 MiB), the buyer reads it byte-identical"
    else say "NFS: MISMATCH for $ip: guest $want buyer $got"; exit 1; fi
done

# The build: configure locally, compile on the guests, link and test locally.
build() { # dir make-args...
    local dir=$1; shift
    rm -rf "$dir"; cp -a "$ZLIB" "$dir"
    (cd "$dir" && CC=gcc CFLAGS="$ZLIB_CFLAGS" ./configure >/dev/null)
    ip netns exec "${T}b" env -C "$dir" "$@" >"$dir.make.log" 2>&1
}
mkdir -p "$WORK/distcc-dir"
DH=""
for ip in "${hosts[@]}"; do DH="$DH $ip/2"; done
JOBS=${JOBS:-$((2 * COUNT + 1))}
if [ -n "${LOCAL:-}" ]; then
    t0=$EPOCHREALTIME
    build "$WORK/zlib-local" make -j2
    say "local build (make -j2, no distcc): $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }')"
fi
say "make -j$JOBS CC=\"distcc gcc\" DISTCC_HOSTS=\"${DH# }\""
t0=$EPOCHREALTIME
build "$WORK/zlib-distcc" env DISTCC_HOSTS="${DH# }" DISTCC_LOG="$WORK/distcc-client.log" DISTCC_VERBOSE=1 \
    DISTCC_DIR="$WORK/distcc-dir" make -j"$JOBS" CC="distcc gcc"
say "build done in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }')"
ok=$(console | grep -ac COMPILE_OK || true)
for ip in "${hosts[@]}"; do
    n=0
    for l in $leases; do
        f="$WORK/b/leases/$l/console.log"
        if grep -qa "cs-dhcp: $ip " "$f" 2>/dev/null; then n=$(grep -ac COMPILE_OK "$f" || true); fi
    done
    say "guest $ip compiled $n objects (distccd COMPILE_OK lines on its console)"
done
fallback=$(grep -c 'failed to distribute' "$WORK/distcc-client.log" || true)
say "distcc client: $ok remote compiles, $fallback local fallbacks"
(cd "$WORK/zlib-distcc" && make test >"$WORK/zlib-distcc.test.log" 2>&1) \
    && say "zlib's own make test passes on the distcc-built binaries" \
    || { say "zlib's make test FAILED: $WORK/zlib-distcc.test.log"; tail "$WORK/zlib-distcc.test.log"; exit 1; }

if [ -n "${BENCH:-}" ]; then
    # Build time with the first 1..COUNT guests, and locally, in this same run.
    t0=$EPOCHREALTIME
    build "$WORK/zlib-local" make -j2
    say "bench: local make -j2: $(since x "$t0")"
    for k in $(seq "$COUNT"); do
        dh=""
        for ip in "${hosts[@]:0:$k}"; do dh="$dh $ip/2"; done
        c0=$(console | grep -ac COMPILE_OK || true)
        t0=$EPOCHREALTIME
        build "$WORK/zlib-k$k" env DISTCC_HOSTS="${dh# }" DISTCC_DIR="$WORK/distcc-dir" DISTCC_LOG="$WORK/distcc-k$k.log" \
            make -j$((2 * k + 1)) CC="distcc gcc"
        say "bench: $k guest(s), make -j$((2 * k + 1)) CC=\"distcc gcc\": $(since x "$t0"), $(($(console | grep -ac COMPILE_OK || true) - c0)) objects compiled on the guests, $(grep -c 'failed to distribute' "$WORK/distcc-k$k.log" || true) local fallbacks"
    done
    say "bench: load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi

if [ -n "${UPDATE:-}" ]; then
    # An image update: the same recipe with more packages. The sellers still hold the
    # first image's chunks, so only the chunks that changed should travel.
    say "image update: rebuilding the image with EXTRA_PACKAGES=\"$UPDATE\""
    G2=$TARGET/distcc-guest-update
    EXTRA_PACKAGES="$UPDATE" bash scripts/build-distcc-guest.sh "$G2"
    s0=$(store_bytes)
    IMAGE2=$(import_image "$G2")
    changed=$(($(store_bytes) - s0))
    say "imported the updated image $IMAGE2: $changed bytes of chunks the first image does not have (of $distinct bytes of distinct chunks in the first)"
    "$BIN" --data-dir "$WORK/b" stop --all >/dev/null
    for _ in $(seq 600); do
        n=$("$BIN" --data-dir "$WORK/b" status --json | js 'd["market"].get("offers_with_room",0)')
        [ "$n" -ge "$COUNT" ] && break
        sleep 0.5
    done
    say "the first image's guests are stopped; $n sellers offer room again"
    tx0=$(tx_bytes)
    t_run2=$EPOCHREALTIME
    "$BIN" --data-dir "$WORK/b" run --image "$IMAGE2" --count "$COUNT" --min-mem-mib "$MEM" --detach --json >"$WORK/run2.json" 2>"$WORK/run2.log"
    for l in $(js '" ".join(s["lease"] for s in d["slots"])' <"$WORK/run2.json"); do
        wait_for 900 "updated image: lease $l's distccd not up after 900 s" \
            sh -c "grep -qa 'listening on .*:3632' '$WORK/b/leases/$l/console.log' 2>/dev/null"
    done
    up2=$(since x "$t_run2")
    tx1=$(tx_bytes)
    say "updated image: all $COUNT guests' distccd up ${up2# } after \`run\`; the buyer's uplink sent $((tx1 - tx0)) bytes ($(awk -v a=$((tx1 - tx0)) -v b="$changed" 'BEGIN { printf "%.3f", a / b }') x the changed chunks' bytes)"
    for i in $(seq "$SELLERS"); do
        d=$("$BIN" --data-dir "$WORK/$i" status --json | js "d['p2p']['images'].get('$IMAGE2', {}).get('downloaded_bytes', 0)")
        say "seller $i downloaded $d bytes of the updated image"
    done
fi

echo
echo "timeline from \`run\`: first guest's distccd up after ${first# }, all $COUNT after ${all# } (image distributed and booted)"
echo "logs: consoles $WORK/b/leases/<lease>/console.log, daemons $WORK/*.log, distcc $WORK/distcc-client.log, NFS $WORK/ganesha/ganesha.log$([ -n "${KEEP:-}" ] || echo ' (removed on exit: KEEP=1 keeps them)')"
"$BIN" --data-dir "$WORK/b" stop --all >/dev/null || true
