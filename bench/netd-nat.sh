#!/usr/bin/env bash
# Throughput and latency of netd's NAT mode against slirp4netns and pasta, same run.
#
#   bench/netd-nat.sh            (as root; builds nothing: uses target/release/netd)
#   DUR=10 MTUS="1500 65520" bench/netd-nat.sh
#   NETD_BASE=/tmp/old/netd bench/netd-nat.sh   (also measures another netd build,
#                                                as "netd-base", in the same run)
#   V6=0 bench/netd-nat.sh       (IPv4 rows only)
#
# Every stack gets the same shape: a "host" namespace (BH) with an iperf3 server on
# its 127.0.0.1, and a "guest" namespace per stack whose traffic reaches that
# loopback through the stack's gateway address (netd and slirp4netns: 10.0.2.2;
# pasta: the gateway it copies from BH, mapped to BH's loopback). Only loopback and
# namespaces created here carry traffic.
#
# Prints Gbit/s for guest->host (iperf3 client in the guest) and host->guest
# (iperf3 -R), the ratios netd/slirp4netns and netd/pasta, and ping RTT to the
# gateway address.
#
# IPv6 rows (unless V6=0): the same over IPv6, the iperf3 server on BH's ::1: netd's
# guest has fd00::15 and reaches ::1 through the gateway fd00::2
# (`host_loopback`); slirp4netns runs with --enable-ipv6 (its guest takes its
# address by SLAAC and reaches ::1 through fd00::2); pasta copies BH's IPv6 route
# (2001:db8:9::/64, documentation addresses, on the same in-namespace veth) and
# maps its gateway to BH's loopback. A stack whose IPv6 does not come up prints 0
# and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
NETD=${NETD:-$PWD/target/release/netd}
NETD_BASE=${NETD_BASE:-}
DUR=${DUR:-5}
V6=${V6:-1}
MTUS=${MTUS:-1500 65520}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -x "$NETD" ] || { echo "$NETD missing: cargo build --release -p netd" >&2; exit 1; }
[ -z "$NETD_BASE" ] || [ -x "$NETD_BASE" ] || { echo "$NETD_BASE missing" >&2; exit 1; }
for t in iperf3 jq; do
  command -v "$t" >/dev/null || { echo "$t missing (apt-get install iperf3 jq)" >&2; exit 1; }
done
# A reference that is not installed is reported and its rows are 0.
HAVE_SLIRP=1; HAVE_PASTA=1
command -v slirp4netns >/dev/null || { HAVE_SLIRP=0; echo "note: slirp4netns missing (apt-get install slirp4netns): its rows are 0"; }
command -v pasta >/dev/null || { HAVE_PASTA=0; echo "note: pasta missing (apt-get install passt): its rows are 0"; }

. bench/netd-common.sh
tag=$$
BH=nbh$tag; GN=nbn$tag; GS=nbs$tag; GP=nbp$tag
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for ns in $BH $GN $GS $GP; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

for ns in $BH $GN $GS $GP; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
# BH needs a default route for pasta to copy (on a veth pair whose both ends stay in
# BH: nothing leaves the namespace).
ip -n $BH link add bv0 type veth peer name bv1
ip -n $BH addr add 198.18.9.1/24 dev bv0
ip -n $BH link set bv0 up
ip -n $BH link set bv1 up
ip -n $BH route add default via 198.18.9.254
ip -n $BH addr add 2001:db8:9::1/64 dev bv0 nodad
ip -n $BH -6 route add default via 2001:db8:9::fe

# iperf3 server on BH's loopback, restarted per measurement.
iperf() { # ns target extra... (the server binds $SRV, 127.0.0.1 or ::1)
  local ns=$1 target=$2; shift 2
  ip netns exec $BH iperf3 -s -1 -B "${SRV:-127.0.0.1}" -p 5299 >/dev/null 2>&1 &
  local sp=$!
  sleep 0.3
  local bps
  bps=$(ip netns exec "$ns" iperf3 -c "$target" -p 5299 -t "$DUR" -J "$@" 2>/dev/null | jq '.end.sum_received.bits_per_second' 2>/dev/null || echo 0)
  wait $sp 2>/dev/null || true
  awk -v b="${bps:-0}" 'BEGIN { printf "%.2f", b / 1e9 }'
}
rtt() { # ns target
  { ip netns exec "$1" ping -q -c 20 -i 0.05 -W 2 "$2" 2>/dev/null || true; } | awk -F/ '/^rtt|^round-trip/ { printf "%.3f", $5 }'
}

start_netd() { # mtu [binary]
  local bin=${2:-$NETD}
  {
    netd_config "$work/netd.sock" "$work/state" nat "$1"
    echo "host_loopback = true"
    echo "resolv_conf = \"$work/resolv.conf\""
    tap_port "nbtap$tag" "$GN"
  } > "$work/netd.toml"
  : > "$work/resolv.conf"
  ip netns exec $BH "$bin" serve --config "$work/netd.toml" 2>"$work/netd.log" &
  netd_pid=$!
  pids+=($netd_pid)
  for _ in $(seq 100); do [ -S "$work/netd.sock" ] && break; sleep 0.05; done
  ip -n $GN addr add 10.0.2.15/24 dev nbtap$tag
  ip -n $GN link set nbtap$tag up
  ip -n $GN route add default via 10.0.2.2
  ip -n $GN addr add fd00::15/64 dev nbtap$tag nodad
  ip -n $GN -6 route replace default via fd00::2
}
stop_netd() {
  kill "$netd_pid"; wait "$netd_pid" 2>/dev/null || true
  rm -f "$work/netd.sock"
}
start_slirp() { # mtu [--enable-ipv6]
  ip netns exec $BH slirp4netns --configure --mtu="$1" ${2:-} --netns-type=path /run/netns/$GS tap0 >"$work/slirp.log" 2>&1 &
  slirp_pid=$!
  pids+=($slirp_pid)
  for _ in $(seq 100); do ip -n $GS route 2>/dev/null | grep -q default && break; sleep 0.05; done
}
stop_slirp() { kill "$slirp_pid"; wait "$slirp_pid" 2>/dev/null || true; }
start_pasta() { # mtu
  ip netns exec $BH pasta -q -f --config-net -m "$1" -t none -u none -T none -U none \
    --runas 0 --netns /run/netns/$GP >"$work/pasta.log" 2>&1 &
  pasta_pid=$!
  pids+=($pasta_pid)
  for _ in $(seq 100); do ip -n $GP route 2>/dev/null | grep -q default && break; sleep 0.05; done
}
stop_pasta() {
  kill "$pasta_pid"; wait "$pasta_pid" 2>/dev/null || true
  for l in $(ip -n $GP -o link | awk -F': ' '$2 != "lo" {print $2}'); do ip -n $GP link del "${l%@*}" 2>/dev/null || true; done
}

# The figures, by stack key, MTU and up/down/rtt.
declare -A R
measure() { # key ns target [iperf3 args...]: R[key,$mtu,up|down|rtt] (the server binds $SRV)
  local key=$1 ns=$2 target=$3; shift 3
  R[$key,$mtu,up]=$(iperf "$ns" "$target" "$@")
  R[$key,$mtu,down]=$(iperf "$ns" "$target" "$@" -R)
  R[$key,$mtu,rtt]=$(rtt "$ns" "$target")
}
row() { # key name: one line of the table, for $mtu
  printf "%-12s %6s %12s G %12s G %10s\n" "$2" "$mtu" "${R[$1,$mtu,up]}" "${R[$1,$mtu,down]}" "${R[$1,$mtu,rtt]:-n/a}"
}
ratios() { # suffix of the keys ("" for IPv4, 6): netd's ratios to slirp4netns and pasta
  local mtu dir label
  for mtu in $MTUS; do
    for dir in up down; do
      label="guest->host"; [ $dir = down ] && label="host->guest"
      awk -v n="${R[netd$1,$mtu,$dir]}" -v s="${R[slirp$1,$mtu,$dir]}" -v p="${R[pasta$1,$mtu,$dir]}" -v m="$mtu" -v l="$label" \
        'BEGIN { printf "mtu %-6s %-12s netd/slirp4netns %6.2f   netd/pasta %6.2f\n", m, l, (s>0? n/s : 0), (p>0? n/p : 0) }'
    done
  done
}

printf "%-12s %6s %14s %14s %10s\n" stack mtu "guest->host" "host->guest" "rtt_ms"
stacks="netd slirp pasta"
[ -n "$NETD_BASE" ] && stacks="netd base slirp pasta"
for mtu in $MTUS; do
  start_netd "$mtu"
  measure netd $GN 10.0.2.2
  stop_netd
  if [ -n "$NETD_BASE" ]; then
    start_netd "$mtu" "$NETD_BASE"
    measure base $GN 10.0.2.2
    stop_netd
  fi
  R[slirp,$mtu,up]=0; R[slirp,$mtu,down]=0; R[pasta,$mtu,up]=0; R[pasta,$mtu,down]=0
  if [ $HAVE_SLIRP = 1 ]; then
    start_slirp "$mtu"
    measure slirp $GS 10.0.2.2
    stop_slirp
  fi
  if [ $HAVE_PASTA = 1 ]; then
    start_pasta "$mtu"
    measure pasta $GP 198.18.9.254
    stop_pasta
  fi
  for s in $stacks; do
    name=$s; [ $s = slirp ] && name=slirp4netns; [ $s = base ] && name=netd-base
    row $s "$name"
  done
done
echo
echo "ratios (netd / reference; goal: >= 2.0 vs slirp4netns, >= 1.0 vs pasta)"
ratios ""
if [ -n "$NETD_BASE" ]; then
  echo
  echo "netd-base, same run (netd-base / reference; netd / netd-base)"
  for mtu in $MTUS; do
    for dir in up down; do
      label="guest->host"; [ $dir = down ] && label="host->guest"
      awk -v n="${R[netd,$mtu,$dir]}" -v b="${R[base,$mtu,$dir]}" -v s="${R[slirp,$mtu,$dir]}" -v p="${R[pasta,$mtu,$dir]}" -v m="$mtu" -v l="$label" \
        'BEGIN { printf "mtu %-6s %-12s base/slirp4netns %6.2f   base/pasta %6.2f   netd/base %6.2f\n", m, l, (s>0? b/s : 0), (p>0? b/p : 0), (b>0? n/b : 0) }'
    done
  done
fi

[ "$V6" = 1 ] || exit 0
# IPv6: the same shape, to BH's ::1.
wait6() { # ns: waits up to 10 s for a global IPv6 address out of DAD and a default route
  for _ in $(seq 200); do
    ip -n "$1" -6 -o addr show scope global 2>/dev/null | grep -qv tentative &&
      ip -n "$1" -6 route show default 2>/dev/null | grep -q via && return 0
    sleep 0.05
  done
  echo "note: no IPv6 in $2 (no global address or default route)" >&2
  return 1
}
echo
echo "IPv6 (server on ::1)"
printf "%-12s %6s %14s %14s %10s\n" stack mtu "guest->host" "host->guest" "rtt_ms"
missing=""
for mtu in $MTUS; do
  start_netd "$mtu"
  R[netd6,$mtu,up]=0; R[netd6,$mtu,down]=0
  if wait6 $GN netd; then
    SRV=::1 measure netd6 $GN fd00::2 -6
  else missing="$missing netd"; fi
  stop_netd
  R[slirp6,$mtu,up]=0; R[slirp6,$mtu,down]=0; R[pasta6,$mtu,up]=0; R[pasta6,$mtu,down]=0
  if [ $HAVE_SLIRP = 1 ]; then
    start_slirp "$mtu" --enable-ipv6
    if wait6 $GS slirp4netns; then
      SRV=::1 measure slirp6 $GS fd00::2 -6
    else missing="$missing slirp4netns"; fi
    stop_slirp
  fi
  if [ $HAVE_PASTA = 1 ]; then
    start_pasta "$mtu"
    if wait6 $GP pasta; then
      SRV=::1 measure pasta6 $GP 2001:db8:9::fe -6
    else missing="$missing pasta"; fi
    stop_pasta
  fi
  for s in netd6 slirp6 pasta6; do
    name=${s%6}; [ $name = slirp ] && name=slirp4netns
    row $s "$name"
  done
done
[ -z "$missing" ] || echo "missing IPv6 figures (IPv6 did not come up):$missing"
echo
echo "IPv6 ratios (netd / reference; goal: >= 2.0 vs slirp4netns, as for IPv4)"
ratios 6
