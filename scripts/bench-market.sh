#!/usr/bin/env bash
# The market benchmark (issue 12): how long `cpushare-node run --count N` takes until
# every guest answers ping over the overlay, split into its phases; the same steps
# done by hand on a fresh seller (image fetch, overlay handshake, vm run to a ping
# answer), so that the difference is what the market adds; and how long a guest takes
# to answer again after its seller is killed (kill -9), with the buyer's default
# silence_s and with silence_s = 10.
#
# One buyer and SELLERS sellers, each in a network namespace of its own (as
# scripts/demo.sh), fresh daemons and data dirs for every round. Rounds: REPS with the
# default silence_s, REPS with silence_s = 10; the hand-done parts run in the first kind.
#   sudo ./scripts/bench-market.sh            (REPS=3 SELLERS=3 COUNT=2)
# Raw rows go to $OUT (default target/bench-market.tsv); a summary goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
SELLERS=${SELLERS:-3}
COUNT=${COUNT:-2}
FAST_SILENCE=${FAST_SILENCE:-10}
OUT=${OUT:-$PWD/target/bench-market.tsv}
[ "$(id -u)" = 0 ] || { echo "error: run as root (network namespaces, taps): sudo $0" >&2; exit 1; }
[ "$COUNT" -lt "$SELLERS" ] || { echo "error: COUNT ($COUNT) must be below SELLERS ($SELLERS): a spare seller takes the replacement" >&2; exit 1; }

# CPUSHARE_NODE_BIN=path uses an already built binary instead of a release build.
BIN=${CPUSHARE_NODE_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release -q -p node
    BIN=$PWD/target/release/cpushare-node
fi
bash scripts/build-test-guest.sh >/dev/null
GUEST=$PWD/target/test-guest
WORK=$(mktemp -d /tmp/cpushare-bench-market.XXXXXX)
T=bmk$$          # namespace prefix of this run
pids=()
lease_ns=()      # lease namespaces our sellers made (a killed seller leaves its own)

ms() { local t=$EPOCHREALTIME; echo $(( ${t/./} / 1000 )); }   # Unix ms, as the timeline
log() { echo "== $*" >&2; }

teardown() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
    for n in "${lease_ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    lease_ns=()
    for n in b br p pl $(seq "$SELLERS"); do ip netns del "${T}$n" 2>/dev/null || true; done
}
cleanup() {
    local j
    for j in $(jobs -p); do kill "$j" 2>/dev/null || true; done
    teardown; [ -n "${KEEP:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT

host() { # name ip
    ip netns add "${T}$1"
    ip link add eth0 netns "${T}$1" type veth peer name "p$1$T" netns "${T}br"
    ip -n "${T}$1" addr add "$2/24" dev eth0
    ip -n "${T}$1" link set eth0 up
    ip -n "${T}$1" link set lo up
    ip -n "${T}br" link set "p$1$T" master br0 up
}

start() { # dir name role [args...]  (daemon of $R/name in namespace ${T}name)
    local name=$1 role=$2; shift 2
    ip netns exec "${T}$name" "$BIN" --role "$role" --data-dir "$R/$name" \
        --listen /ip4/0.0.0.0/tcp/7450 "$@" >"$R/$name.out" 2>"$R/$name.log" &
    pids+=($!)
    eval "pid_$name=$!"
}
wait_up() { # name
    for _ in $(seq 600); do
        "$BIN" --data-dir "$R/$1" status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "error: $1 did not start; its log:" >&2; cat "$R/$1.log" >&2; exit 1
}

# first_reply IP FILE: wait (in the buyer's namespace) for IP's first ping answer and
# write its time (Unix ms, ping -D) to FILE. ping exits at once while the overlay tap
# does not exist yet, so it is restarted until an answer comes.
first_reply() {
    local ip=$1 f=$2 line end=$((SECONDS + 300))
    while [ $SECONDS -lt $end ]; do
        line=$(ip netns exec "${T}b" ping -D -n -c 1 -i 0.1 -w 300 "$ip" 2>/dev/null | grep -m1 'bytes from' || true)
        if [ -n "$line" ]; then
            sed -E 's/^\[([0-9]+)\.([0-9]{3}).*/\1\2/' <<<"$line" >"$f"
            return 0
        fi
        sleep 0.1
    done
    echo "error: $ip did not answer ping for 300 s" >&2
    return 1
}

# One round: fresh underlay, buyer, sellers; the market run; the parts (when asked);
# the replacement. Prints one TSV row per round to $OUT.
round() { # rep silence(empty = default) parts(0/1)
    local rep=$1 silence=$2 parts=$3 kind
    kind=${silence:-default}
    R=$WORK/r$rep-$kind
    mkdir -p "$R"
    ip netns add "${T}br"
    ip -n "${T}br" link add br0 type bridge
    ip -n "${T}br" link set br0 up
    host b 10.213.0.1
    for i in $(seq "$SELLERS"); do host "$i" "10.213.0.$((10 + i))"; done

    mkdir -p "$R/b"
    { printf '[buyer]\nbilling_period_s = 60\n'; [ -n "$silence" ] && printf 'silence_s = %s\n' "$silence"; } >"$R/b/node.toml"
    start b buyer --config "$R/b/node.toml"
    wait_up b
    local buyer_id
    buyer_id=$(sed -n 's/^peer id: //p' "$R/b.out")
    for i in $(seq "$SELLERS"); do
        mkdir -p "$R/$i"
        printf '[seller]\nmax_guests = 1\nprice_per_min = "0.0%d"\n' "$i" >"$R/$i/node.toml"
        start "$i" seller --bootstrap "/ip4/10.213.0.1/tcp/7450/p2p/$buyer_id" --config "$R/$i/node.toml"
    done
    for i in $(seq "$SELLERS"); do wait_up "$i"; done
    local script b64 image
    script='mkdir -p /www; echo "hello from a rented cpushare guest" > /www/index.html; httpd -p 80 -h /www; echo cs-serving'
    b64=$(printf '%s' "$script" | base64 -w0)
    image=$("$BIN" --data-dir "$R/b" image import --public --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initrd.cpio.gz" \
        --cmdline "console=ttyS0 quiet panic=-1 cs.keep cs.run64=$b64" | grep -oE '[0-9a-f]{64}' | head -1)
    local n=0
    for _ in $(seq 240); do
        n=$("$BIN" --data-dir "$R/b" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["market"].get("offers",0))')
        [ "$n" -ge "$SELLERS" ] && break
        sleep 0.5
    done
    [ "$n" -ge "$SELLERS" ] || { echo "error: only $n offers after 120 s" >&2; exit 1; }
    sleep 1   # let the buyer's ping measure every seller's round trip

    # 1. The market: run --detach --json, then every guest's first ping answer.
    log "round $rep (silence_s $kind): run --image ${image:0:12} --count $COUNT"
    local i wpids=()
    for i in $(seq "$COUNT"); do
        first_reply "10.77.0.$((1 + i))" "$R/ping$i" &
        wpids+=($!)
    done
    "$BIN" --data-dir "$R/b" run --image "$image" --count "$COUNT" --detach --json >"$R/run.json"
    for p in "${wpids[@]}"; do wait "$p"; done
    local pings
    pings=$(cat "$R"/ping* | sort -n | tail -1)
    for l in $(python3 -c 'import json,sys; print(" ".join(e["lease"][:8] for e in json.load(open(sys.argv[1]))["timeline"] if "lease" in e))' "$R/run.json"); do
        lease_ns+=("csl-$l")
    done
    local market
    market=$(python3 - "$R/run.json" "$pings" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1])); ping = int(sys.argv[2])
t0 = s["started_ms"]; last = {}
for e in s["timeline"]:
    if "phase" in e:
        last[e["phase"]] = max(last.get(e["phase"], 0), e["at_ms"])
a, b, r = last["accepted"], last["booting"], last["running"]
print(a - t0, b - a, r - b, ping - r, ping - t0, sep="\t")
EOF
)
    log "market: offers image boot overlay total (ms): $market"

    # 2. The parts by hand, on a fresh seller: image fetch; overlay admit + attach to
    # `established`; vm run of the same image on the attached tap to its first ping.
    local parts_row="-	-	-	-	-	-"
    if [ "$parts" = 1 ]; then
        host p 10.213.0.99
        mkdir -p "$R/p"
        # A seller that never sells (its hours are empty: it sends no offers), so the
        # market never picks it.
        printf '[seller]\nhours = "0-0"\n' >"$R/p/node.toml"
        start p seller --bootstrap "/ip4/10.213.0.1/tcp/7450/p2p/$buyer_id" --config "$R/p/node.toml"
        wait_up p
        sleep 2
        local t0 t1 fetch_ms
        t0=$(ms); "$BIN" --data-dir "$R/p" image fetch "$image" >"$R/p-fetch.out"; t1=$(ms)
        fetch_ms=$((t1 - t0))
        local pkey bkey mac=02:bb:00:00:00:63 gip=10.77.9.99 hs_ms est=
        pkey=$("$BIN" --data-dir "$R/p" id | awk '/public key/{print $3}')
        bkey=$("$BIN" --data-dir "$R/b" id | awk '/public key/{print $3}')
        t0=$(ms)
        "$BIN" --data-dir "$R/b" overlay admit --key "$pkey" --mac "$mac" --ip "$gip" >/dev/null
        "$BIN" --data-dir "$R/p" overlay attach --tap "${T}t" --netns "${T}pl" --buyer 10.213.0.1:7451 \
            --buyer-key "$bkey" --mac "$mac" --ip "$gip" >/dev/null
        for _ in $(seq 1000); do
            est=$("$BIN" --data-dir "$R/p" overlay ls --json | python3 -c 'import json,sys; print(any(g["established"] for g in json.load(sys.stdin)["guests"]))')
            [ "$est" = True ] && break
            sleep 0.01
        done
        t1=$(ms)
        [ "$est" = True ] || { echo "error: the hand-made overlay session did not come up" >&2; exit 1; }
        hs_ms=$((t1 - t0))
        local vm_first vm_init vm_dhcp vm_ping vmpid
        first_reply "$gip" "$R/pping" &
        local ppid=$!
        t0=$(ms)
        # The seller daemon made the lease namespace inside its own mount namespace
        # (it runs under `ip netns exec`), so the namespace is reachable from there.
        nsenter -t "$pid_p" -m ip netns exec "${T}pl" "$BIN" --data-dir "$R/p" vm run --image "$image" --backend qemu --accel tcg \
            --tap "${T}t" --mac "$mac" --timeout 120 -q >"$R/p-vm.out" 2>"$R/p-vm.err" &
        vmpid=$!
        pids+=($vmpid)
        # Console lines are stamped as they come (the vm run prints them as they arrive).
        (tail -n +1 -F "$R/p-vm.out" 2>/dev/null | while IFS= read -r line; do
            echo "$(ms) $line"
        done >"$R/p-vm.stamped") &
        local tailpid=$!
        wait "$ppid"
        vm_ping=$(( $(cat "$R/pping") - t0 ))
        sleep 0.5
        kill "$tailpid" 2>/dev/null || true
        kill "$vmpid" 2>/dev/null || true
        wait "$vmpid" 2>/dev/null || true
        vm_first=$(awk -v t="$t0" 'NR==1 { print $1 - t; exit }' "$R/p-vm.stamped")
        vm_init=$(awk -v t="$t0" '/cs-init: \/init/ { print $1 - t; exit }' "$R/p-vm.stamped")
        vm_dhcp=$(awk -v t="$t0" '/cs-dhcp/ { print $1 - t; exit }' "$R/p-vm.stamped")
        "$BIN" --data-dir "$R/p" overlay detach --mac "$mac" >/dev/null 2>&1 || true
        ip netns del "${T}pl" 2>/dev/null || true
        parts_row="$fetch_ms	$hs_ms	${vm_first:--}	${vm_init:--}	${vm_dhcp:--}	$vm_ping"
        log "parts: fetch handshake vm-first-line vm-/init vm-dhcp vm-ping (ms): $parts_row"
    fi

    # 3. Replacement: kill -9 the seller of slot 0's guest; time until its IP answers
    # again (from another seller).
    local ip0 seller0 victim="" kt rt
    ip0=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["slots"][0]["ip"])' "$R/run.json")
    seller0=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["slots"][0]["seller"])' "$R/run.json")
    for i in $(seq "$SELLERS"); do
        [ "$(sed -n 's/^peer id: //p' "$R/$i.out")" = "$seller0" ] && victim=$i
    done
    [ -n "$victim" ] || { echo "error: slot 0's seller $seller0 is none of ours" >&2; exit 1; }
    local vpid
    eval "vpid=\$pid_$victim"
    kt=$(ms)
    kill -9 "$vpid"
    wait "$vpid" 2>/dev/null || true
    # The killed seller's guest dies with it (PDEATHSIG); wait until it has stopped
    # answering before waiting for the replacement's answer.
    while ip netns exec "${T}b" ping -n -c 1 -W 0.2 "$ip0" >/dev/null 2>&1; do sleep 0.05; done
    first_reply "$ip0" "$R/rping"
    rt=$(( $(cat "$R/rping") - kt ))
    # When the buyer declared the seller silent (its log line), from the kill.
    local det
    det=$(python3 - "$R/b.log" "$kt" <<'EOF'
import datetime, re, sys
kt = int(sys.argv[2])
for line in open(sys.argv[1], errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if "seller went silent" in line:
        t = datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
        at = int(t.timestamp() * 1000)
        if at >= kt:
            print(at - kt)
            break
else:
    print("-")
EOF
)
    log "replacement of seller $victim's guest $ip0: declared silent $det ms, answers again $rt ms after kill -9 (silence_s $kind)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$kind" "$market" "$parts_row" "$det" "$rt" >>"$OUT"

    "$BIN" --data-dir "$R/b" stop --all >/dev/null 2>&1 || true
    sleep 2
    teardown
}

mkdir -p "$(dirname "$OUT")"
printf 'rep\tsilence_s\toffers_ms\timage_ms\tboot_ms\toverlay_ms\tmarket_total_ms\tfetch_ms\thandshake_ms\tvm_first_line_ms\tvm_init_ms\tvm_dhcp_ms\tvm_ping_ms\tsilent_after_ms\treplace_ms\n' >"$OUT"
log "node binary $BIN; load average $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
for rep in $(seq "$REPS"); do round "$rep" "" 1; done
for rep in $(seq "$REPS"); do round "$rep" "$FAST_SILENCE" 0; done
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$OUT" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def col(name, rs):
    return [int(r[name]) for r in rs if r[name] not in ("-", "")]
def show(label, xs):
    if xs:
        print(f"{label:<56} median {statistics.median(xs)/1000:7.2f} s   min {min(xs)/1000:7.2f}   max {max(xs)/1000:7.2f}   (n={len(xs)})")
print("market run to every guest answering ping (all rounds):")
for c in ("offers_ms", "image_ms", "boot_ms", "overlay_ms", "market_total_ms"):
    show("  " + c[:-3], col(c, rows))
parts = [r for r in rows if r["fetch_ms"] != "-"]
print("the parts by hand on a fresh seller:")
for c in ("fetch_ms", "handshake_ms", "vm_first_line_ms", "vm_init_ms", "vm_dhcp_ms", "vm_ping_ms"):
    show("  " + c[:-3], col(c, parts))
sums = [int(r["fetch_ms"]) + int(r["handshake_ms"]) + int(r["vm_ping_ms"]) for r in parts]
show("  sum (fetch + handshake + vm to ping)", sums)
show("market adds (same round: total - sum)", [int(r["market_total_ms"]) - s for r, s in zip(parts, sums)])
for k in sorted({r["silence_s"] for r in rows}):
    rk = [r for r in rows if r["silence_s"] == k]
    show(f"replacement, silence_s {k}: kill -9 -> declared silent", col("silent_after_ms", rk))
    show(f"replacement, silence_s {k}: kill -9 -> ping", col("replace_ms", rk))
    show(f"replacement, silence_s {k}: declared silent -> ping", [int(r["replace_ms"]) - int(r["silent_after_ms"]) for r in rk if r["silent_after_ms"] != "-"])
EOF
