#!/usr/bin/env bash
# Live migration bench (figures and notes in bench/README-vmm.md): the same small
# guest (bench/vmm-migrate.S: 256 MiB, rewriting a 16 MiB working set about every
# 25 ms) migrated on loopback by vmm-shim (`ctl migrate`, max_downtime_ms 50) and by
# QEMU microvm (-enable-kvm -cpu host,-arch-capabilities, as bench/vmm.sh runs it;
# QMP migrate with downtime-limit 50), interleaved runs in the same invocation;
# medians of downtime and total time as each VMM reports them, and the ratios
# QEMU / vmm-shim. Each run checks that the guest goes on at the destination.
# vmm-shim's answer (printed per run) has `throttle_pct` (auto-converge: how much
# the vCPUs were slowed, 0 for not at all) and `converged` (pre-copy met the limit
# rather than stopping at its 30 rounds): a throttled run's downtime is one of a
# slowed-down guest, so read the two with the downtime.
# AUTO_CONVERGE=0 migrates vmm-shim with `--no-auto-converge` (to compare); QEMU=no
# leaves QEMU out.
# Needs root (KVM), binutils, and the guest assets for QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
LIMIT_MS=${LIMIT_MS:-50}
AUTO_CONVERGE=${AUTO_CONVERGE:-1}
converge=()
[ "$AUTO_CONVERGE" = 0 ] && converge=(--no-auto-converge)
ASSETS=${FABRIC_ASSETS:-$PWD/target/guest-assets}
if [ "${QEMU:-}" != no ]; then
  QEMU=$ASSETS/bin/qemu-system-x86_64
  [ -x "$QEMU" ] || QEMU=/var/cache/fabric/guest-assets/bin/qemu-system-x86_64
fi
[ -x target/release/vmm-shim ] || cargo build --release -p vmm-shim
VMM=target/release/vmm-shim
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

cat bench/vmm-pvh.S bench/vmm-migrate.S > "$work/mig.S"
as --64 -o "$work/mig.o" "$work/mig.S"
ld -nostdlib -static -Ttext=0x1000000 -e _start -o "$work/mig.elf" "$work/mig.o"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_listen() { for _ in $(seq 100); do [ -n "$(ss -Hltn "sport = :$1")" ] && return; sleep 0.05; done; echo "nothing listens on $1" >&2; exit 1; }
wait_file() { for _ in $(seq 100); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "$1 did not appear" >&2; return 1; }
# The guest goes on: its console grows within 3 s.
goes_on() { local n; n=$(stat -c %s "$1"); for _ in $(seq 60); do sleep 0.05; [ "$(stat -c %s "$1")" -gt "$n" ] && return 0; done; return 1; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# One answer JSON ($1) with "went_on": whether the guest's console ($2) grew after.
went_on() {
  local ok=False
  goes_on "$2" && ok=True
  python3 -c "import json,sys
try: r = json.loads(sys.argv[1])
except ValueError: r = {'status': 'no answer', 'answer': sys.argv[1]}
r['went_on'] = $ok
print(json.dumps(r))" "$1"
}

vmm_run() { # -> one JSON line on stdout
  local port sock="$work/v.sock" out="$work/v.console" src dst v
  rm -f "$sock" "$out"
  port=$(free_port)
  $VMM --kernel "$work/mig.elf" --mem 256M --api-sock "$sock" --console "$out" & src=$!
  $VMM --incoming "tcp:127.0.0.1:$port" --mem 256M --console "$out" & dst=$!
  pids+=("$src" "$dst")
  wait_file "$sock"; wait_listen "$port"
  sleep 1
  v=$($VMM ctl --api-sock "$sock" migrate "tcp:127.0.0.1:$port" --max-downtime-ms "$LIMIT_MS" "${converge[@]}" | tr -d '\n' || true)
  wait "$src" || echo "vmm-shim source exited $?" >&2
  went_on "$v" "$out"
  kill "$dst"; wait "$dst" 2>/dev/null || true
}

qemu_run() {
  local port q="$work/q.qmp" out="$work/q.console" src dst
  rm -f "$q" "$out" "$out.dst"
  port=$(free_port)
  local args=(-M microvm,x-option-roms=off,rtc=off -enable-kvm -cpu host,-arch-capabilities
    -m 256M -nodefaults -no-user-config -display none -kernel "$work/mig.elf")
  "$QEMU" "${args[@]}" -serial "file:$out" -qmp "unix:$q,server=on,wait=off" 2>"$work/qsrc.err" & src=$!
  "$QEMU" "${args[@]}" -serial "file:$out.dst" -incoming "tcp:127.0.0.1:$port" 2>"$work/qdst.err" & dst=$!
  pids+=("$src" "$dst")
  if ! wait_file "$q"; then
    went_on "$(tail -n 2 "$work/qsrc.err" | tr '\n' ' ')" "$out.dst"
    return
  fi
  wait_listen "$port"
  sleep 1
  bench/migrate_qmp.py "$q" "tcp:127.0.0.1:$port" "$LIMIT_MS" > "$work/q.json" || true
  went_on "$(cat "$work/q.json")" "$out.dst"
  kill "$src" "$dst" 2>/dev/null; wait "$src" "$dst" 2>/dev/null || true
}

echo "== live migration, 256 MiB guest dirtying 16 MiB, loopback, limit ${LIMIT_MS} ms, $RUNS runs each =="
: > "$work/vmm.json"; : > "$work/qemu.json"
qemu_ok=0
[ -x "$QEMU" ] && qemu_ok=1
for _ in $(seq "$RUNS"); do
  vmm_run >> "$work/vmm.json"
  if [ "$qemu_ok" = 1 ]; then qemu_run >> "$work/qemu.json"; fi
done
# Field $1 of the runs in $2 whose guest went on at the destination.
field() { python3 -c "import json; [print(r['$1']) for r in map(json.loads, open('$2')) if r.get('went_on') and r.get('$1') is not None]"; }
show() { # NAME FILE
  python3 -c "
import json
for i, l in enumerate(open('$2')):
    print('  $1 run %d: %s' % (i + 1, l.strip()))"
}
show vmm-shim "$work/vmm.json"
v_down=$(field downtime_ms "$work/vmm.json" | median)
v_total=$(field total_ms "$work/vmm.json" | median)
printf 'vmm-shim  downtime %8.2f ms  total %8.1f ms  (median)\n' "$v_down" "$v_total"
if [ "$qemu_ok" = 1 ]; then
  show qemu "$work/qemu.json"
  q_down=$(field downtime_ms "$work/qemu.json" | median)
  q_total=$(field total_ms "$work/qemu.json" | median)
  if [ "$q_down" = nan ]; then
    echo "qemu      no completed migration with the guest going on (see the runs above)"
  else
    printf 'qemu      downtime %8.2f ms  total %8.1f ms  (median)\n' "$q_down" "$q_total"
    python3 -c "print('ratio qemu/vmm-shim: downtime %.2fx, total %.2fx' % ($q_down / $v_down, $q_total / $v_total))"
  fi
else
  echo "qemu      not measured: $QEMU missing (run scripts/guest-assets.sh)"
fi
