#!/usr/bin/env bash
# Guest-to-guest TCP throughput across two "hosts" over VXLAN: netd <-> netd
# against kernel vxlan+bridge <-> kernel vxlan+bridge, same run, at network MTU
# 1450 (underlay 1500) and 8950 (underlay 9000). Prints Gbit/s and the ratio.
#
#   bench/netd-vxlan.sh                 (as root; builds nothing: uses target/release/netd)
#   DUR=10 PAIRS="1450:1500" bench/netd-vxlan.sh
#
# Shape (every namespace created here, deleted on exit; only 198.18.0.0/15 and
# 10.91.0.0/16 addresses inside them carry traffic):
#
#   guest GA --TAP-- [netd in HA] ul0 198.18.30.1 --+
#   guest GB --TAP-- [netd in HB] ul0 198.18.30.2 --+-- bridge in U
#   guest KA --veth-- br0+vx0 in KA' 198.18.30.3  --+
#   guest KB --veth-- br0+vx0 in KB' 198.18.30.4  --+
#
# One iperf3 stream from guest A to guest B for DUR seconds, netd first, then the
# kernel pair, back to back under the same load.
set -euo pipefail
cd "$(dirname "$0")/.."
NETD=${NETD:-$PWD/target/release/netd}
DUR=${DUR:-5}
PAIRS=${PAIRS:-1450:1500 8950:9000}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -x "$NETD" ] || { echo "$NETD missing: cargo build --release -p netd" >&2; exit 1; }
for t in iperf3 jq; do
  command -v "$t" >/dev/null || { echo "$t missing (apt-get install iperf3 jq)" >&2; exit 1; }
done

. bench/netd-common.sh
tag=$$
U=vbu$tag; HA=vba$tag; HB=vbb$tag; KHA=vbka$tag; KHB=vbkb$tag
GA=vbga$tag; GB=vbgb$tag; KA=vbxa$tag; KB=vbxb$tag
ALL="$U $HA $HB $KHA $KHB $GA $GB $KA $KB"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for ns in $ALL; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

iperf() { # client-ns server-ns addr
  ip netns exec "$2" iperf3 -s -1 -B "$3" -p 5298 >/dev/null 2>&1 &
  local sp=$!
  sleep 0.3
  local bps
  bps=$(ip netns exec "$1" iperf3 -c "$3" -p 5298 -t "$DUR" -J 2>/dev/null | jq '.end.sum_received.bits_per_second' 2>/dev/null || echo 0)
  wait $sp 2>/dev/null || true
  awk -v b="${bps:-0}" 'BEGIN { printf "%.2f", b / 1e9 }'
}

setup() { # net-mtu underlay-mtu
  local m=$1 u=$2 i=0
  for ns in $ALL; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
  ip -n $U link add ulbr type bridge
  ip -n $U link set ulbr mtu "$u" up
  for h in $HA $HB $KHA $KHB; do
    i=$((i + 1))
    ip -n $U link add "h$i" mtu "$u" type veth peer name ul0 netns "$h"
    ip -n $U link set "h$i" master ulbr up
    ip -n "$h" link set ul0 mtu "$u" up
    ip -n "$h" addr add "198.18.30.$i/24" dev ul0
  done
  # netd on HA and HB.
  for side in a b; do
    local host guest me peer addr
    if [ $side = a ]; then host=$HA guest=$GA me=198.18.30.1 peer=198.18.30.2 addr=10.91.0.1
    else host=$HB guest=$GB me=198.18.30.2 peer=198.18.30.1 addr=10.91.0.2; fi
    mkdir -p "$work/$side"
    {
      netd_config "$work/$side/netd.sock" "$work/$side/state" internal "$m"
      tap_port "vbt$side" "$guest" g
      cat <<EOT
[[network.port]]
name = "vx"
kind = "vxlan"
vni = 100
local = "$me"
remotes = ["$peer"]
EOT
    } > "$work/$side/netd.toml"
    ip netns exec "$host" "$NETD" serve --config "$work/$side/netd.toml" > "$work/$side/log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$work/$side/netd.sock" ] && break; sleep 0.05; done
    for _ in $(seq 100); do ip -n "$guest" link show "vbt$side" >/dev/null 2>&1 && break; sleep 0.05; done
    ip -n "$guest" addr add "$addr/24" dev "vbt$side"
  done
  # The kernel pair on KHA and KHB.
  for side in a b; do
    local host guest me peer addr
    if [ $side = a ]; then host=$KHA guest=$KA me=198.18.30.3 peer=198.18.30.4 addr=10.91.1.1
    else host=$KHB guest=$KB me=198.18.30.4 peer=198.18.30.3 addr=10.91.1.2; fi
    ip -n "$host" link add vx0 type vxlan id 100 local "$me" remote "$peer" dstport 4789
    ip -n "$host" link add br0 type bridge
    ip -n "$host" link set br0 up
    ip -n "$host" link set vx0 mtu "$m" master br0 up
    ip -n "$host" link add gv0 mtu "$m" type veth peer name eth0 netns "$guest"
    ip -n "$host" link set gv0 master br0 up
    ip -n "$guest" link set eth0 up
    ip -n "$guest" addr add "$addr/24" dev eth0
  done
  ip netns exec $GA ping -c 3 -i 0.2 -W 2 10.91.0.2 >/dev/null || { echo "netd pair does not ping" >&2; cat "$work"/*/log >&2; exit 1; }
  ip netns exec $KA ping -c 3 -i 0.2 -W 2 10.91.1.2 >/dev/null || { echo "kernel pair does not ping" >&2; exit 1; }
}

teardown() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
  for ns in $ALL; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

printf "%-12s %-10s %14s %14s %8s\n" "network MTU" "underlay" "netd Gbit/s" "kernel Gbit/s" "ratio"
for pair in $PAIRS; do
  m=${pair%%:*} u=${pair##*:}
  setup "$m" "$u"
  n=$(iperf $GA $GB 10.91.0.2)
  k=$(iperf $KA $KB 10.91.1.2)
  r=$(awk -v n="$n" -v k="$k" 'BEGIN { if (k > 0) printf "%.2fx", n / k; else print "-" }')
  printf "%-12s %-10s %14s %14s %8s\n" "$m" "$u" "$n" "$k" "$r"
  teardown
done
