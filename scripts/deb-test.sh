#!/usr/bin/env bash
# Builds the fabric Debian package from the release binaries already built (never
# rebuilding the workspace), installs it with dpkg -i, verifies the installed units
# with systemd-analyze, starts the installed binaries with the installed example
# configs as their units would (stord as the stord user), checks they serve
# (nbdinfo on stord's socket, `netd net list` on netd's control socket), then
# purges the package and checks nothing is left. Run as root; prints PASS or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo-deb from crates.io; where the registry does not answer, from cargo's own cache.
command -v cargo-deb >/dev/null ||
  cargo install cargo-deb --version 2.7.0 --locked ||
  cargo install cargo-deb --version 2.7.0 --locked --offline
deb=$(cargo deb -p netd --no-build --no-strip -o target/debian/ 2>/dev/null | tail -1)
test -f "$deb"
dpkg -i "$deb"
cleanup() {
  [ -n "${stord_pid:-}" ] && kill "$stord_pid" 2>/dev/null || true
  [ -n "${netd_pid:-}" ] && kill "$netd_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${ns:-}" ] && ip netns del "$ns" 2>/dev/null || true
  dpkg --purge fabric >/dev/null 2>&1 || true
}
trap cleanup EXIT
for f in /usr/bin/netd /usr/bin/stord /usr/bin/vmm-shim; do test -x "$f"; done
grep -qx /etc/netd/netd.toml /var/lib/dpkg/info/fabric.conffiles
grep -qx /etc/stord/stord.toml /var/lib/dpkg/info/fabric.conffiles
getent passwd stord >/dev/null
[ "$(stat -c '%U %a' /var/lib/stord)" = "stord 700" ]
[ "$(stat -c '%U %a' /var/lib/netd)" = "root 750" ]
systemd-analyze verify /lib/systemd/system/netd.service /lib/systemd/system/stord.service /lib/systemd/system/stord.socket
# stord, as its unit runs it: the stord user, its runtime directory.
install -d -o stord -g stord -m 0755 /run/stord
setpriv --reuid stord --regid stord --init-groups /usr/bin/stord serve --config /etc/stord/stord.toml &
stord_pid=$!
for _ in $(seq 50); do [ -S /run/stord/nbd.sock ] && break; sleep 0.1; done
nbdinfo 'nbd+unix:///scratch?socket=/run/stord/nbd.sock' | grep -q 'export-size: 67108864'
[ "$(stat -c %U /var/lib/stord/disks)" = stord ]
# netd, with its installed example config, in a namespace of its own (its hostonly
# network's TAP and addresses stay out of this host's networking).
install -d -m 0755 /run/netd
ns=fabric-deb-$$
ip netns add "$ns"
ip netns exec "$ns" /usr/bin/netd serve --config /etc/netd/netd.toml &
netd_pid=$!
for _ in $(seq 50); do [ -S /run/netd/control.sock ] && break; sleep 0.1; done
/usr/bin/netd net list | grep -q hostonly
kill "$stord_pid" "$netd_pid"; wait "$stord_pid" "$netd_pid" || true
stord_pid= netd_pid=
rm -rf /run/stord /run/netd
dpkg --purge fabric
test ! -e /usr/bin/netd && test ! -e /etc/stord/stord.toml && test ! -e /var/lib/stord
! getent passwd stord >/dev/null
echo PASS
