#!/usr/bin/env bash
# vmm-shim benchmarks (figures and notes in bench/README-vmm.md):
#  1. boot: time from process start to the guest's first serial byte and to exit,
#     vmm-shim vs QEMU microvm (-enable-kvm -cpu host,-arch-capabilities) on the same
#     small guest (bench/vmm-hello.S, PVH note for QEMU, 64-bit entry for vmm-shim),
#     interleaved runs, medians and the ratio QEMU / vmm-shim.
#  2. virtio-blk: a guest program reads 64 MiB through an NBD server (stord, and
#     qemu-nbd), 1 MiB requests, 4 in flight; MiB/s between its "S" and "E" serial
#     lines; reference: nbdcopy reading the same export on the host.
# Needs root (KVM), binutils, qemu-utils, libnbd-bin, and the guest assets for QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
ASSETS=${FABRIC_ASSETS:-$PWD/target/guest-assets}
QEMU=$ASSETS/bin/qemu-system-x86_64
[ -x target/release/vmm-shim ] || cargo build --release -p vmm-shim
work=$(mktemp -d)
nbd_pid=
stord_pid=
cleanup() {
  [ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null
  [ -n "$stord_pid" ] && kill "$stord_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

asm() { # OUT SRC...
  local out=$1; shift
  cat "$@" > "$work/$out.S"
  as --64 -o "$work/$out.o" "$work/$out.S"
  ld -nostdlib -static -Ttext=0x1000000 -e _start -o "$work/$out.elf" "$work/$out.o"
}
asm hello bench/vmm-pvh.S bench/vmm-hello.S
asm blkread bench/vmm-blkread.S

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
field() { python3 -c "import json,sys; [print(json.loads(l)$1) for l in sys.stdin]"; }

echo "== boot: $RUNS runs each, interleaved (seconds) =="
: > "$work/vmm.json"; : > "$work/qemu.json"
for _ in $(seq "$RUNS"); do
  bench/vmm_time.py 1 -- target/release/vmm-shim --kernel "$work/hello.elf" --mem 64M >> "$work/vmm.json"
  if [ -x "$QEMU" ]; then
    bench/vmm_time.py 1 -- "$QEMU" -M microvm,x-option-roms=off,rtc=off -enable-kvm \
      -cpu host,-arch-capabilities -m 64M -nodefaults -no-user-config -display none \
      -serial stdio -no-reboot -kernel "$work/hello.elf" >> "$work/qemu.json"
  fi
done
v_first=$(field "['first_byte']" < "$work/vmm.json" | median)
v_exit=$(field "['exit']" < "$work/vmm.json" | median)
printf 'vmm-shim      first byte %.4f  exit %.4f\n' "$v_first" "$v_exit"
if [ -s "$work/qemu.json" ]; then
  q_first=$(field "['first_byte']" < "$work/qemu.json" | median)
  q_exit=$(field "['exit']" < "$work/qemu.json" | median)
  printf 'qemu microvm  first byte %.4f  exit %.4f\n' "$q_first" "$q_exit"
  python3 -c "print('ratio qemu/vmm-shim: first byte %.1fx, exit %.1fx' % ($q_first/$v_first, $q_exit/$v_exit))"
else
  echo "qemu microvm  not measured: $QEMU missing (run scripts/guest-assets.sh)"
fi

echo "== virtio-blk: guest reads 64 MiB through NBD (median of 5) =="
head -c 64M /dev/urandom > "$work/disk.img"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "server on $1 did not start" >&2; exit 1; }
blk_bench() { # NAME URI
  : > "$work/blk.json"
  for _ in $(seq 5); do
    bench/vmm_time.py 1 -- target/release/vmm-shim --kernel "$work/blkread.elf" --mem 160M \
      --disk "$2" >> "$work/blk.json"
  done
  local secs
  secs=$(python3 -c "
import json
v=sorted(r['lines']['E']-r['lines']['S'] for r in map(json.loads, open('$work/blk.json')) if r['rc']==0 and 'E' in r['lines'])
print(v[len(v)//2] if v else 'nan')")
  python3 -c "print('vmm-shim guest read 64 MiB via %-8s %.4f s = %4.0f MiB/s' % ('$1:', $secs, 64/$secs))"
  if command -v nbdcopy >/dev/null; then
    local t0 t1
    t0=$(date +%s.%N)
    for _ in 1 2 3; do nbdcopy "$2" null: ; done
    t1=$(date +%s.%N)
    python3 -c "r=($t1-$t0)/3; print('  reference nbdcopy (host) via %-8s %.4f s = %4.0f MiB/s; vmm-shim/nbdcopy throughput = %.2f' % ('$1:', r, 64/r, r/$secs))"
  fi
}

if [ -x target/release/stord ]; then
  sport=$(free_port)
  mkdir -p "$work/stord"
  cat > "$work/stord/stord.toml" <<CFG
listen = "127.0.0.1:$sport"
unix = "$work/stord/nbd.sock"
control = "$work/stord/control.sock"
state_dir = "$work/stord/state"
[[disk]]
name = "bench"
size = "64M"
alloc = "fixed"
read_only = false
CFG
  target/release/stord serve --config "$work/stord/stord.toml" 2>"$work/stord/log" & stord_pid=$!
  wait_port "$sport"
  nbdcopy "$work/disk.img" "nbd://127.0.0.1:$sport/bench"
  blk_bench stord "nbd://127.0.0.1:$sport/bench"
  kill "$stord_pid"; wait "$stord_pid" 2>/dev/null || true
fi
port=$(free_port)
qemu-nbd -f raw -x bench -t -b 127.0.0.1 -p "$port" "$work/disk.img" & nbd_pid=$!
wait_port "$port"
cat "$work/disk.img" > /dev/null # page cache warm
blk_bench qemu-nbd "nbd://127.0.0.1:$port/bench"
