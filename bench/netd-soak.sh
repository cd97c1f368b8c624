#!/usr/bin/env bash
# NAT soak: 64 guests holding 10,000 concurrent NAT flows (TCP and UDP) for
# SOAK_SECS while one of them runs iperf3 through the same router.
#
#   bench/netd-soak.sh                   (as root; uses target/release/netd)
#   SOAK_SECS=60 bench/netd-soak.sh      (a short run while developing)
#   GUESTS=64 FLOWS=10000 IPERF_SECS=10 SOAK_SECS=600 bench/netd-soak.sh
#   SOAK_LOGS=/tmp/soak bench/netd-soak.sh   (keeps netd's and the helpers' logs)
#
# Shape (only namespaces created here and test addresses, 198.18.0.0/15):
#
#   guest ns 0..63 --TAP-- [netd, NAT network "soak", in ns H] --veth-- [ns S]
#   10.0.2.16..79           hv 198.18.77.1/24                 198.18.77.2: TCP echo
#                                                             :7000, UDP echo :7001,
#                                                             iperf3 :5201
#
# netd runs in H, so the "outside" its flows reach is the veth to S. One python3
# process (asyncio) holds every guest's flows: it enters each guest namespace
# (setns) to create that guest's sockets, then drives them all from one loop. Each
# TCP flow sends 16 bytes and waits for the echo every ~30 s, each UDP flow every
# ~20 s (under netd's 60 s udp_timeout), so all of them stay live and are checked.
# FLOWS is split over the guests (10,000 / 64 = 156.25: 157 for the first 16,
# 156 for the rest; half TCP, half UDP), under max_flows_per_guest (256).
#
# Printed: netd's RSS and open fds at start (netd up, no flows), when all flows are
# up, and at the end of the soak (and the largest RSS sampled every 5 s); iperf3
# guest->outside Gbit/s idle (before the flows) and during the soak (the same
# invocation, back to back for the whole soak: mean and min); the flows held at the
# end. Goals, PASS/FAIL each: RSS <= 32 MiB and flat (end <= flows-up + 10 % +
# 1 MiB), fds bounded (end <= flows-up + 64, and <= flows + 256), mean soak
# throughput >= 0.8 x idle, every flow still answering at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
NETD=${NETD:-$PWD/target/release/netd}
SOAK_SECS=${SOAK_SECS:-600}
GUESTS=${GUESTS:-64}
FLOWS=${FLOWS:-10000}
IPERF_SECS=${IPERF_SECS:-10}
TCP_PCT=${TCP_PCT:-50}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -x "$NETD" ] || { echo "$NETD missing: cargo build --release -p netd" >&2; exit 1; }
for t in iperf3 jq python3; do
  command -v "$t" >/dev/null || { echo "$t missing (apt-get install iperf3 jq python3)" >&2; exit 1; }
done
per=$(( FLOWS / GUESTS )); extra=$(( FLOWS % GUESTS ))
[ $(( per + 1 + 2 )) -le 256 ] || { echo "FLOWS/GUESTS above max_flows_per_guest (256)" >&2; exit 1; }

. bench/netd-common.sh
tag=$$
H=sk${tag}h; S=sk${tag}s
guest_ns() { echo "sk${tag}g$1"; }
SRV=198.18.77.2
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for ns in $H $S $(for i in $(seq 0 $((GUESTS - 1))); do guest_ns "$i"; done); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ -n "${SOAK_LOGS:-}" ]; then mkdir -p "$SOAK_LOGS" && cp "$work"/*.log "$work"/*.toml "$SOAK_LOGS"/ 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- namespaces -------------------------------------------------------------
for ns in $H $S; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n $H link add hv0 type veth peer name sv0 netns $S
ip -n $H addr add 198.18.77.1/24 dev hv0
ip -n $H link set hv0 up
ip -n $S addr add $SRV/24 dev sv0
ip -n $S link set sv0 up
for i in $(seq 0 $((GUESTS - 1))); do
  ip netns add "$(guest_ns "$i")"
  ip -n "$(guest_ns "$i")" link set lo up
done

# --- servers in S -------------------------------------------------------------
cat > "$work/servers.py" <<'EOT'
# TCP and UDP echo for the soak's flows, one asyncio loop.
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
host, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def echo(r, w):
    try:
        while data := await r.read(4096):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    w.close()

class Udp(asyncio.DatagramProtocol):
    def connection_made(self, t):
        self.t = t
    def datagram_received(self, d, a):
        self.t.sendto(d, a)

async def main():
    srv = await asyncio.start_server(echo, host, tport, backlog=4096)
    await asyncio.get_running_loop().create_datagram_endpoint(Udp, local_addr=(host, uport))
    print("ready", flush=True)
    await srv.serve_forever()

asyncio.run(main())
EOT
ip netns exec $S python3 "$work/servers.py" $SRV 7000 7001 > "$work/servers.log" 2>&1 &
pids+=($!)
ip netns exec $S iperf3 -s -B $SRV -p 5201 > /dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q ready "$work/servers.log" 2>/dev/null && break; sleep 0.1; done
grep -q ready "$work/servers.log" || { echo "servers did not start" >&2; cat "$work/servers.log" >&2; exit 1; }

# --- netd ---------------------------------------------------------------------
: > "$work/resolv.conf"
{
  echo "control = \"$work/netd.sock\""
  echo "state_dir = \"$work/state\""
  echo "[[network]]"
  echo "name = \"soak\""
  echo "mode = \"nat\""
  echo "resolv_conf = \"$work/resolv.conf\""
  # Room for every flow: the table, and the buffer accounting (each TCP flow
  # counts its two 512 KiB smoltcp buffers; pages are touched only by data).
  echo "max_flows = $(( FLOWS + 2048 ))"
  echo "max_flow_memory = $(( (FLOWS + 2048) << 20 ))"
  for i in $(seq 0 $((GUESTS - 1))); do
    tap_port "sk${tag}t$i" "$(guest_ns "$i")" "g$i"
  done
} > "$work/netd.toml"
ip netns exec $H "$NETD" serve --config "$work/netd.toml" 2> "$work/netd.log" &
netd_pid=$!
pids+=($netd_pid)
for _ in $(seq 200); do [ -S "$work/netd.sock" ] && break; sleep 0.05; done
[ -S "$work/netd.sock" ] || { echo "netd did not start" >&2; tail "$work/netd.log" >&2; exit 1; }
for i in $(seq 0 $((GUESTS - 1))); do
  g=$(guest_ns "$i")
  ip -n "$g" addr add 10.0.2.$((16 + i))/24 dev sk${tag}t$i
  ip -n "$g" link set sk${tag}t$i up
  ip -n "$g" route add default via 10.0.2.2
done
ctl() { "$NETD" --control "$work/netd.sock" "$@"; }

rss_kib() { awk '/^VmRSS:/ { print $2 }' /proc/$netd_pid/status; }
fds() { ls /proc/$netd_pid/fd | wc -l; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
iperf_gbps() { # one run from guest 0, Gbit/s received
  ip netns exec "$(guest_ns 0)" iperf3 -c $SRV -p 5201 -t "$IPERF_SECS" -J 2>/dev/null \
    | jq '.end.sum_received.bits_per_second // 0' 2>/dev/null \
    | awk '{ printf "%.3f", $1 / 1e9 }'
}

sleep 1
rss0=$(rss_kib); fds0=$(fds)
echo "netd start:        rss $(mib "$rss0") MiB  fds $fds0"
# The guests resolve the gateway first (the first iperf3 would otherwise pay it).
for i in $(seq 0 $((GUESTS - 1))); do
  ip netns exec "$(guest_ns "$i")" ping -c1 -W2 -q 10.0.2.2 > /dev/null 2>&1 || true
done
idle=$(iperf_gbps)
echo "iperf3 idle:       ${idle:-0} Gbit/s  (guest 0 -> $SRV, -t $IPERF_SECS)"

# --- the flows ----------------------------------------------------------------
cat > "$work/hold.py" <<'EOT'
# Holds the soak's flows: for each guest namespace NS:TCP:UDP, enters NS (setns)
# to create its sockets, then drives every socket from one asyncio loop. Writes
# a JSON status line to STATUS every 2 s.
import asyncio, ctypes, json, os, random, resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
srv, tport, uport, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
guests = [g.split(":") for g in sys.argv[5:]]
TCP_PERIOD, UDP_PERIOD = 30.0, 20.0

def enter(ns):
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    finally:
        os.close(fd)

st = {"tcp_up": 0, "tcp_failed": 0, "tcp_lost": 0, "tcp_echo_fail": 0,
      "udp_ok": 0, "udp_miss": 0, "tcp_want": 0, "udp_want": 0}

async def tcp_flow(sock, gate):
    loop = asyncio.get_running_loop()
    async with gate:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (srv, tport)), 20)
        except (OSError, asyncio.TimeoutError):
            st["tcp_failed"] += 1
            sock.close()
            return
    st["tcp_up"] += 1
    await asyncio.sleep(random.uniform(0, TCP_PERIOD))
    try:
        while True:
            await loop.sock_sendall(sock, b"soak-tcp-payload")
            got = b""
            while len(got) < 16:
                d = await asyncio.wait_for(loop.sock_recv(sock, 64), 10)
                if not d:
                    raise ConnectionError("closed")
                got += d
            await asyncio.sleep(TCP_PERIOD)
    except asyncio.TimeoutError:
        st["tcp_echo_fail"] += 1
    except OSError:
        pass
    st["tcp_up"] -= 1
    st["tcp_lost"] += 1
    sock.close()

async def udp_flow(sock):
    loop = asyncio.get_running_loop()
    ok = False
    while True:
        # Retry quickly until the first echo (the guest's first datagrams may
        # wait on ARP), then every UDP_PERIOD.
        await loop.sock_sendall(sock, b"soak-udp")
        try:
            await asyncio.wait_for(loop.sock_recv(sock, 64), 5)
            if not ok:
                st["udp_ok"] += 1
                ok = True
        except (asyncio.TimeoutError, OSError):
            if ok:
                st["udp_ok"] -= 1
                ok = False
            st["udp_miss"] += 1
        await asyncio.sleep(UDP_PERIOD if ok else 1.0)

async def report():
    while True:
        with open(status + ".tmp", "w") as f:
            json.dump(st, f)
        os.replace(status + ".tmp", status)
        await asyncio.sleep(2)

async def main():
    tasks = [asyncio.create_task(report())]
    for ns, nt, nu in guests:
        enter(ns)
        # netd allows max_pending_per_guest (64) connects per guest in flight.
        gate = asyncio.Semaphore(32)
        for _ in range(int(nt)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            tasks.append(asyncio.create_task(tcp_flow(s, gate)))
        for _ in range(int(nu)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect((srv, uport))
            tasks.append(asyncio.create_task(udp_flow(s)))
        st["tcp_want"] += int(nt)
        st["udp_want"] += int(nu)
    await asyncio.gather(*tasks)

asyncio.run(main())
EOT
gargs=()
tcp_want=0; udp_want=0
for i in $(seq 0 $((GUESTS - 1))); do
  n=$per; [ "$i" -lt "$extra" ] && n=$((per + 1))
  nt=$(( (n * TCP_PCT + 50) / 100 )); nu=$(( n - nt ))
  tcp_want=$((tcp_want + nt)); udp_want=$((udp_want + nu))
  gargs+=("$(guest_ns "$i"):$nt:$nu")
done
python3 "$work/hold.py" $SRV 7000 7001 "$work/status.json" "${gargs[@]}" > "$work/hold.log" 2>&1 &
hold_pid=$!
pids+=($hold_pid)
st() { jq -r ".$1" "$work/status.json" 2>/dev/null || echo 0; }
t0=$(date +%s)
while :; do
  sleep 2
  kill -0 $hold_pid 2>/dev/null || { echo "flow holder died:" >&2; tail "$work/hold.log" >&2; exit 1; }
  up=$(( $(st tcp_up) + $(st udp_ok) ))
  [ "$up" -ge $((tcp_want + udp_want)) ] && break
  [ $(( $(date +%s) - t0 )) -ge 180 ] && { echo "only $up of $((tcp_want + udp_want)) flows up after 180 s"; break; }
  [ -n "${SOAK_LOGS:-}" ] && ctl --json flows soak > "$work/flows-$(date +%s).log" 2>&1
done
sleep 3
rss1=$(rss_kib); fds1=$(fds)
echo "flows up:          tcp $(st tcp_up)/$tcp_want udp $(st udp_ok)/$udp_want in $(( $(date +%s) - t0 )) s  (connects failed $(st tcp_failed))"
echo "netd flows up:     rss $(mib "$rss1") MiB  fds $fds1"

# --- the soak: iperf3 back to back while the flows are held -------------------
soak_end=$(( $(date +%s) + SOAK_SECS ))
maxrss=$rss1
( while :; do sleep 5; rss_kib; done ) > "$work/rss.log" 2>/dev/null &
pids+=($!)
runs=()
while [ $(( $(date +%s) + IPERF_SECS + 1 )) -le $soak_end ]; do
  runs+=("$(iperf_gbps)")
done
while [ "$(date +%s)" -lt $soak_end ]; do sleep 1; done
rss2=$(rss_kib); fds2=$(fds)
for r in $(cat "$work/rss.log") "$rss2"; do [ "$r" -gt "$maxrss" ] && maxrss=$r; done
mean=$(printf '%s\n' "${runs[@]}" | awk '{ s += $1; n++ } END { printf "%.3f", n ? s / n : 0 }')
min=$(printf '%s\n' "${runs[@]}" | sort -g | head -1)
echo "netd soak end:     rss $(mib "$rss2") MiB  fds $fds2  (largest rss sampled $(mib "$maxrss") MiB)"
echo "iperf3 soak:       mean $mean Gbit/s  min ${min:-0} Gbit/s  over ${#runs[@]} runs of $IPERF_SECS s  (idle ${idle:-0})"
echo "flows end:         tcp $(st tcp_up)/$tcp_want udp $(st udp_ok)/$udp_want  (tcp lost $(st tcp_lost), echo timeouts $(st tcp_echo_fail), udp misses $(st udp_miss))"
echo "switch drops:      $(ctl --json port list soak | jq -c '[.[] | .counters // . | to_entries[] | select(.key | startswith("drop_"))] | group_by(.key) | map({(.[0].key): (map(.value) | add)}) | add')"
echo "netd counters:     $(ctl --json flows --stats soak | jq -c '{frames_in, frames_out, flows_refused, connect_failed, dropped, guest_quota, no_fds, restarts}')"
echo

verdict() { if [ "$1" = 1 ]; then echo PASS; else echo FAIL; fi; }
ok_rss=$(awk -v a="$maxrss" 'BEGIN { print (a <= 32 * 1024) }')
ok_flat=$(awk -v a="$rss1" -v b="$rss2" 'BEGIN { print (b <= a * 1.10 + 1024) }')
ok_fds=$(awk -v a="$fds1" -v b="$fds2" -v f="$FLOWS" 'BEGIN { print (b <= a + 64 && b <= f + 256) }')
ok_tput=$(awk -v m="$mean" -v i="${idle:-0}" 'BEGIN { print (i > 0 && m >= 0.8 * i) }')
ok_flows=$(( $(st tcp_up) == tcp_want && $(st udp_ok) == udp_want ))
echo "$(verdict "$ok_rss") rss <= 32 MiB (largest $(mib "$maxrss") MiB)"
echo "$(verdict "$ok_flat") rss flat (flows up $(mib "$rss1") MiB -> end $(mib "$rss2") MiB)"
echo "$(verdict "$ok_fds") fds bounded (flows up $fds1 -> end $fds2)"
echo "$(verdict "$ok_tput") throughput during soak >= 0.8 x idle ($mean / ${idle:-0})"
echo "$(verdict "$ok_flows") every flow held to the end"
[ "$ok_rss$ok_flat$ok_fds$ok_tput$ok_flows" = 11111 ]
