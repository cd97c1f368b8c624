#!/usr/bin/env bash
# Throughput of netd's switch against the Linux kernel bridge, same run.
#
# Two test hosts (network namespaces) run iperf3 TCP (one stream, DURATION s):
#   netd:   host A --TAP-- netd (one internal network) --TAP-- host B
#   bridge: host A --veth-- br0 (kernel bridge) --veth-- host B
# A TAP's queue must be held by a process, so the kernel bridge cannot use the
# same TAP endpoints without a userspace forwarder; veth pairs are the kernel's
# own equivalent (a kernel-side endpoint in each namespace) and the fair baseline.
# Both at MTU 1500 and 65520. Prints Gbit/s, the ratio netd/bridge and netd's RSS.
#
# Then the capture row: the same netd set-up with `netd capture bench -w /dev/null`
# running during iperf3, against none, same run (goal: at least 0.8x), with what
# the capture wrote and lost (a reader slower than the switch loses frames, never
# slows it).
#
# NETD_BASE=/tmp/old/netd bench/netd.sh also measures another netd build, as
# "netd-base", in the same run (each MTU: netd, netd-base, bridge, then the ratios).
#
# Needs root, iperf3, iproute2, and a release build (cargo build --release -p netd).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
NETD=${NETD:-target/release/netd}
[ -x "$NETD" ] || cargo build --release -p netd
NETD_BASE=${NETD_BASE:-}
[ -z "$NETD_BASE" ] || [ -x "$NETD_BASE" ] || { echo "$NETD_BASE missing" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "bench/netd.sh needs root" >&2; exit 1; }

. bench/netd-common.sh
tag=b$$
work=$(mktemp -d)
cleanup() {
  [ -n "${netd_pid:-}" ] && kill "$netd_pid" 2>/dev/null && wait "$netd_pid" 2>/dev/null || true
  for ns in "${tag}h" "${tag}a" "${tag}b" "${tag}r"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

iperf() { # ns_client ns_server server_ip -> Gbit/s
  ip netns exec "$2" iperf3 -s -1 -B "$3" >/dev/null 2>&1 &
  local spid=$!
  for _ in $(seq 50); do ip netns exec "$2" ss -ltn | grep -q "$3:5201" && break; sleep 0.1; done
  ip netns exec "$1" iperf3 -c "$3" -t "$DURATION" -J > "$work/iperf.json"
  wait "$spid" || true
  python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9))' "$work/iperf.json"
}

run_netd() { # mtu [binary] [capture] -> "gbps rss_kib"
  local mtu=$1 bin=${2:-$NETD} capture=${3:-}
  for ns in h a b; do ip netns add "${tag}$ns"; ip netns exec "${tag}$ns" ip link set lo up; done
  {
    netd_config "$work/control.sock" "$work/state" internal "$mtu"
    tap_port "${tag}ta" "${tag}a" a
    tap_port "${tag}tb" "${tag}b" b
  } > "$work/netd.toml"
  ip netns exec "${tag}h" "$bin" serve --config "$work/netd.toml" 2>"$work/netd.log" &
  netd_pid=$!
  for _ in $(seq 100); do [ -S "$work/control.sock" ] && break; sleep 0.05; done
  ip netns exec "${tag}a" ip addr add 10.77.0.1/24 dev "${tag}ta"
  ip netns exec "${tag}b" ip addr add 10.77.0.2/24 dev "${tag}tb"
  ip netns exec "${tag}a" ping -c 1 -W 2 10.77.0.2 >/dev/null
  local cap_pid=
  if [ -n "$capture" ]; then
    "$bin" --control "$work/control.sock" capture bench -w /dev/null 2>"$work/capture.err" &
    cap_pid=$!
    for _ in $(seq 100); do grep -q "capturing on" "$work/capture.err" 2>/dev/null && break; sleep 0.05; done
  fi
  local g; g=$(iperf "${tag}a" "${tag}b" 10.77.0.2)
  if [ -n "$cap_pid" ]; then
    kill -INT "$cap_pid"; wait "$cap_pid" || true
    grep "frames written" "$work/capture.err" > "$work/capture.sum" || echo "no report" > "$work/capture.sum"
  fi
  local rss; rss=$(awk '/VmHWM/ {print $2}' "/proc/$netd_pid/status")
  kill "$netd_pid"; wait "$netd_pid" 2>/dev/null || true; netd_pid=
  for ns in h a b; do ip netns del "${tag}$ns"; done
  echo "$g $rss"
}

run_bridge() { # mtu -> gbps
  local mtu=$1
  for ns in r a b; do ip netns add "${tag}$ns"; ip netns exec "${tag}$ns" ip link set lo up; done
  ip netns exec "${tag}r" ip link add br0 type bridge
  ip netns exec "${tag}r" ip link set br0 mtu "$mtu" up
  for h in a b; do
    ip netns exec "${tag}r" ip link add "p$h" mtu "$mtu" type veth peer name "v$h" mtu "$mtu"
    ip netns exec "${tag}r" ip link set "v$h" netns "${tag}$h"
    ip netns exec "${tag}r" ip link set "p$h" master br0 up
    ip netns exec "${tag}$h" ip link set "v$h" up
  done
  ip netns exec "${tag}a" ip addr add 10.77.0.1/24 dev va
  ip netns exec "${tag}b" ip addr add 10.77.0.2/24 dev vb
  for _ in $(seq 30); do ip netns exec "${tag}a" ping -c 1 -W 1 10.77.0.2 >/dev/null && break; sleep 0.2; done
  local g; g=$(iperf "${tag}a" "${tag}b" 10.77.0.2)
  for ns in r a b; do ip netns del "${tag}$ns"; done
  echo "$g"
}

printf "%-7s %14s %14s %7s %12s\n" MTU "netd Gbit/s" "bridge Gbit/s" ratio "netd RSS"
base_rows=()
for mtu in 1500 65520; do
  # With a base build, the two take turns going first (the first netd run of a
  # bench reads low): netd first at MTU 1500, the base first at 65520.
  if [ -n "$NETD_BASE" ] && [ "$mtu" != 1500 ]; then read -r bg0 _ < <(run_netd "$mtu" "$NETD_BASE"); fi
  read -r ng rss < <(run_netd "$mtu")
  if [ -n "$NETD_BASE" ] && [ "$mtu" = 1500 ]; then read -r bg0 _ < <(run_netd "$mtu" "$NETD_BASE"); fi
  bg=$(run_bridge "$mtu")
  ratio=$(python3 -c "print('%.2f' % ($ng / $bg if $bg > 0 else 0))")
  printf "%-7s %14s %14s %6sx %9s KiB\n" "$mtu" "$ng" "$bg" "$ratio" "$rss"
  if [ -n "$NETD_BASE" ]; then
    base_rows+=("$(printf "%-7s %14s %14s %6sx" "$mtu" "$ng" "$bg0" "$(python3 -c "print('%.2f' % ($ng / $bg0 if $bg0 > 0 else 0))")")")
  fi
done
if [ -n "$NETD_BASE" ]; then
  printf "\nnetd-base (%s), same run:\n%-7s %14s %14s %7s\n" "$NETD_BASE" MTU "netd Gbit/s" "base Gbit/s" ratio
  printf "%s\n" "${base_rows[@]}"
fi

printf "\nswitch throughput with a capture to /dev/null (netd capture bench -w /dev/null), same run:\n"
printf "%-7s %14s %14s %7s  %s\n" MTU "none Gbit/s" "capture Gbit/s" ratio "capture report"
for mtu in 1500 65520; do
  read -r n0 _ < <(run_netd "$mtu")
  read -r c0 _ < <(run_netd "$mtu" "$NETD" capture)
  ratio=$(python3 -c "print('%.2f' % ($c0 / $n0 if $n0 > 0 else 0))")
  printf "%-7s %14s %14s %6sx  %s\n" "$mtu" "$n0" "$c0" "$ratio" "$(sed 's/^capture of bench: //' "$work/capture.sum" | head -1)"
done
