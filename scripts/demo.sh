#!/usr/bin/env bash
# The local demo: one buyer and several sellers, each in a network namespace of its
# own on this machine, rent out real Linux guests. The buyer runs
# `cpushare-node run --count 2` of a small Linux test image; the sellers fetch it
# through the chunk swarm and boot it (qemu: KVM where it runs Linux, else TCG); the
# guests get their overlay addresses from the buyer's DHCP and answer ping and HTTP
# from the buyer's host over the encrypted overlay; then the bill is printed.
#   sudo ./scripts/demo.sh            (SELLERS=3 COUNT=2 MINUTES=1)
set -euo pipefail
cd "$(dirname "$0")/.."
SELLERS=${SELLERS:-3}
COUNT=${COUNT:-2}
MINUTES=${MINUTES:-1}
[ "$(id -u)" = 0 ] || { echo "error: run as root (network namespaces, taps): sudo $0" >&2; exit 1; }
[ "$COUNT" -le "$SELLERS" ] || { echo "error: COUNT ($COUNT) must be at most SELLERS ($SELLERS)" >&2; exit 1; }

# CPUSHARE_NODE_BIN=path uses an already built binary instead of a release build.
BIN=${CPUSHARE_NODE_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release -q -p node
    BIN=$PWD/target/release/cpushare-node
fi
bash scripts/build-test-guest.sh >/dev/null
GUEST=$PWD/target/test-guest
WORK=$(mktemp -d /tmp/cpushare-demo.XXXXXX)
T=demo$$
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in b br $(seq "$SELLERS"); do ip netns del "${T}$n" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# The underlay: a bridge joining the buyer (10.211.0.1) and the sellers (.11, .12, ...).
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
host b 10.211.0.1
for i in $(seq "$SELLERS"); do host "$i" "10.211.0.$((10 + i))"; done

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

mkdir -p "$WORK/b"
printf '[buyer]\nbilling_period_s = 60\n' >"$WORK/b/node.toml"
start b buyer --config "$WORK/b/node.toml"
BUYER_ID=$(sed -n 's/^peer id: //p' "$WORK/b.out")
echo "== buyer $BUYER_ID at 10.211.0.1"
for i in $(seq "$SELLERS"); do
    mkdir -p "$WORK/$i"
    printf '[seller]\nmax_guests = 1\nprice_per_min = "0.0%d"\n' "$i" >"$WORK/$i/node.toml"
    start "$i" seller --bootstrap "/ip4/10.211.0.1/tcp/7450/p2p/$BUYER_ID" --config "$WORK/$i/node.toml"
    echo "== seller $i at 10.211.0.$((10 + i)), price 0.0$i per minute"
done

SCRIPT='mkdir -p /www; echo "hello from a rented cpushare guest" > /www/index.html; httpd -p 80 -h /www; echo cs-serving'
B64=$(printf '%s' "$SCRIPT" | base64 -w0)
IMAGE=$("$BIN" --data-dir "$WORK/b" image import --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initrd.cpio.gz" \
    --cmdline "console=ttyS0 quiet panic=-1 cs.keep cs.run64=$B64" | grep -oE '[0-9a-f]{64}' | head -1)
echo "== imported the test guest as image $IMAGE"

echo "== waiting for offers"
for _ in $(seq 120); do
    n=$("$BIN" --data-dir "$WORK/b" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["market"].get("offers",0))')
    [ "$n" -ge "$SELLERS" ] && break
    sleep 0.5
done

echo "== cpushare-node run --image $IMAGE --count $COUNT"
t0=$EPOCHREALTIME
"$BIN" --data-dir "$WORK/b" run --image "$IMAGE" --count "$COUNT" --detach
for i in $(seq "$COUNT"); do
    ip=10.77.0.$((1 + i))
    until ip netns exec "${T}b" ping -c1 -W1 "$ip" >/dev/null 2>&1; do sleep 0.5; done
    printf '== guest %s answers ping after %s s; HTTP says: ' "$ip" "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    for _ in $(seq 60); do
        ip netns exec "${T}b" busybox wget -qO- "http://$ip/" 2>/dev/null && break
        sleep 0.5
    done
done
echo "== letting the guests run $MINUTES minute(s)"
sleep $((MINUTES * 60 + 5))
"$BIN" --data-dir "$WORK/b" stop --all >/dev/null
sleep 3
echo "== the bill"
"$BIN" --data-dir "$WORK/b" leases
echo "== consoles were in $WORK/b/leases/<lease>/console.log (removed on exit)"
