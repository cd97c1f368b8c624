#!/usr/bin/env bash
# Runs every test of the fabric: installs what the tests need (as root, from Debian),
# gates on formatting and lints, prepares the guest assets, builds once in release
# mode and runs unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  pkgs=$(cat .ci/packages/*.txt | sed 's/#.*//' | tr -s ' \n' ' ')
  export DEBIAN_FRONTEND=noninteractive
  # The archive may not answer at once on a machine that just booted (a resolver not
  # yet up): update and install are retried with a growing pause before giving up.
  for attempt in 1 2 3 4; do
    out=$(apt-get update -qq 2>&1 || true)
    [ -z "$out" ] || echo "$out" >&2
    if echo "$out" | grep -q '^[WE]: \(Failed\|Some index\)'; then
      echo "apt-get update: the archive did not answer (try $attempt of 4)" >&2
      [ "$attempt" = 4 ] || { sleep $((attempt * 10)); continue; }
    fi
    break
  done
  for attempt in 1 2 3 4 5 6; do
    # shellcheck disable=SC2086
    if apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; then
      break
    fi
    if [ "$attempt" = 6 ]; then
      echo "apt-get install failed after 6 tries" >&2
      exit 1
    fi
    sleep $((attempt * 10))
    apt-get update -qq || true
  done
fi

# Lint gate, before any test: unformatted code or any clippy warning fails the run.
# It still ends with a totals line (a failed gate counts as one failure, as a build
# error does below), so a reader of the log's last line sees the run failed.
lint() {
  if ! "$@"; then
    echo "lint failed: $*" >&2
    echo "total: 0 passed, 1 failed, 0 skipped"
    exit 1
  fi
}
lint cargo fmt --all -- --check
lint cargo clippy --workspace --all-targets -- -D warnings

# The guest assets come from Debian's archive. Where it does not answer (exit 3), the
# reason is written beside them and the tests that boot a Linux guest under QEMU say
# NOT RUN (counted as skipped below); any other failure of the script fails the run.
assets=${FABRIC_ASSETS:-target/guest-assets}
set +e
scripts/guest-assets.sh
ga=$?
set -e
if [ "$ga" = 3 ]; then
  mkdir -p "$assets"
  echo "Debian's archive did not answer scripts/guest-assets.sh (no QEMU system emulator, no guest kernel)" > "$assets/UNAVAILABLE"
  echo "guest assets unavailable: the QEMU guest boots will say NOT RUN" >&2
elif [ "$ga" != 0 ]; then
  echo "scripts/guest-assets.sh failed (exit $ga)" >&2
  echo "total: 0 passed, 1 failed, 0 skipped"
  exit 1
fi

cargo build --release --workspace --bins

# Unit and end-to-end tests. The totals line at the end sums every test binary's
# result (cargo prints one line per binary); a boot a host cannot run is NOT RUN,
# counted as skipped, never as passed.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($i ~ /^passed;?$/) s += $(i-1)} END {print s + 0}' "$log")
failed=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($i ~ /^failed;?$/) s += $(i-1)} END {print s + 0}' "$log")
notrun=$(grep -c ' NOT RUN: ' "$log" || true)
grep ' NOT RUN: ' "$log" || true
if [ "$status" != 0 ] && [ "$failed" = 0 ]; then
  failed=1 # a build error or a test binary that did not finish
fi
echo "total: $passed passed, $failed failed, $notrun skipped"
exit "$status"
