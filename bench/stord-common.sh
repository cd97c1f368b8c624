# Sourced by the stord bench scripts: a work directory (removed at exit, with
# every server started into `pids`), stord built in release mode, and the
# small helpers both scripts use. Set WORK_PREFIX first.
work=$(mktemp -d "/var/tmp/${WORK_PREFIX}.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -p stord -q
STORD=$PWD/target/release/stord

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do nbdinfo --can connect "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "server at $1 did not come up" >&2; return 1; }
now() { date +%s.%N; }
ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
