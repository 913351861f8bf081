#!/usr/bin/env bash
# Local demo: one buyer and several sellers on this machine (loopback) distribute
# one random image through the chunk swarm; prints the buyer's uploaded bytes.
#   SELLERS=4 SIZE_MIB=64 ./scripts/demo-swarm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SELLERS=${SELLERS:-4}
SIZE_MIB=${SIZE_MIB:-64}
BASE_PORT=${BASE_PORT:-17450}

cargo build --release -q -p node
BIN=$PWD/target/release/cpushare-node
WORK=$(mktemp -d /tmp/cpushare-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

start() { # name role port [bootstrap]
    local name=$1 role=$2 port=$3 boot=${4:-}
    local args=(--role "$role" --data-dir "$WORK/$name" --listen "/ip4/127.0.0.1/tcp/$port")
    [ -n "$boot" ] && args+=(--bootstrap "$boot")
    "$BIN" "${args[@]}" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    pids+=($!)
    for _ in $(seq 200); do
        "$BIN" --data-dir "$WORK/$name" status >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "error: $name did not start; see its log:" >&2
    cat "$WORK/$name.log" >&2
    exit 1
}

echo "== buyer"
start buyer buyer "$BASE_PORT"
BUYER_ID=$(sed -n 's/^peer id: //p' "$WORK/buyer.out")
BOOT="/ip4/127.0.0.1/tcp/$BASE_PORT/p2p/$BUYER_ID"
echo "   peer id $BUYER_ID"

head -c $((SIZE_MIB << 20)) /dev/urandom >"$WORK/image.raw"
IMAGE=$("$BIN" --data-dir "$WORK/buyer" image import --public "$WORK/image.raw")
echo "== imported ${SIZE_MIB} MiB image $IMAGE"

for i in $(seq "$SELLERS"); do
    start "seller$i" seller $((BASE_PORT + i)) "$BOOT"
done
echo "== $SELLERS sellers started; fetching at the same time"

t0=$(date +%s.%N)
fetches=()
for i in $(seq "$SELLERS"); do
    "$BIN" --data-dir "$WORK/seller$i" image fetch "$IMAGE" >"$WORK/fetch$i.out" 2>"$WORK/fetch$i.err" &
    fetches+=($!)
done
for i in $(seq "$SELLERS"); do
    if ! wait "${fetches[$((i - 1))]}"; then
        echo "error: seller$i fetch failed: $(tail -1 "$WORK/fetch$i.err")" >&2
        exit 1
    fi
done
t1=$(date +%s.%N)

for i in $(seq "$SELLERS"); do
    "$BIN" --data-dir "$WORK/seller$i" image export "$IMAGE" "$WORK/out$i.raw" >/dev/null
    cmp -s "$WORK/image.raw" "$WORK/out$i.raw" || { echo "error: seller$i's copy differs" >&2; exit 1; }
done
echo "== every seller's copy is byte-identical"

"$BIN" --data-dir "$WORK/buyer" status --json >"$WORK/buyer.status.json"
python3 - "$WORK/buyer.status.json" "$IMAGE" "$SIZE_MIB" "$SELLERS" "$t0" "$t1" <<'PY'
import json, sys
status, image, size_mib, sellers, t0, t1 = sys.argv[1:]
st = json.load(open(status))
up = st["p2p"]["images"][image]["uploaded_bytes"]
size = int(size_mib) << 20
print(f"   {sellers} sellers fetched {size_mib} MiB in {float(t1) - float(t0):.1f} s")
print(f"   buyer uploaded {up} bytes = {up / size:.3f} x the image "
      f"(a buyer sending to everyone would upload {sellers} x)")
PY
