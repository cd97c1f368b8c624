#!/usr/bin/env bash
# Builds a busybox initramfs for the guest tests.
#
#   scripts/mk-initramfs.sh OUT.cpio.gz INIT_SCRIPT [SRC:DEST ...]
#
# The image holds: static busybox with a link per applet, /init (INIT_SCRIPT),
# the virtio modules of the guest assets and /load-modules (insmods them in order),
# a udhcpc script at /usr/share/udhcpc/default.script (and /etc/udhcpc, where Debian's
# busybox looks) that configures the interface,
# its default route and /etc/resolv.conf, and each extra SRC copied to DEST.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT.cpio.gz INIT_SCRIPT [SRC:DEST ...]" >&2
  exit 2
fi
out=$1
init=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
ASSETS=${FABRIC_ASSETS:-$here/target/guest-assets}
[ -f "$ASSETS/READY" ] || { echo "guest assets missing: run scripts/guest-assets.sh" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,sbin,usr/bin,usr/sbin,usr/share/udhcpc,etc,proc,sys,dev,tmp,run,mnt,lib/modules}
cp "$ASSETS/busybox" "$work/bin/busybox"
for applet in $("$ASSETS/busybox" --list-full); do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$work/$(dirname "$applet")"
  ln -sf /bin/busybox "$work/$applet"
done

cp "$ASSETS"/modules/*.ko "$work/lib/modules/"
{
  echo '#!/bin/sh'
  echo '# Loads the virtio modules in dependency order.'
  while read -r m; do
    echo "insmod /lib/modules/$m 2>/dev/null || true"
  done < "$ASSETS/modules/load-order"
} > "$work/load-modules"
chmod +x "$work/load-modules"

cat > "$work/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc event script: applies the lease to the interface.
case "$1" in
  deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then
      for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    fi
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "lease: $ip/${mask:-24} router=$router dns=$dns" > /dev/console
    ;;
esac
exit 0
EOF
chmod +x "$work/usr/share/udhcpc/default.script"
# Debian's busybox looks for the script here.
mkdir -p "$work/etc/udhcpc"
ln -s /usr/share/udhcpc/default.script "$work/etc/udhcpc/default.script"

cp "$init" "$work/init"
chmod +x "$work/init"
for spec in "$@"; do
  src=${spec%%:*}
  dest=${spec#*:}
  mkdir -p "$work/$(dirname "$dest")"
  cp -a "$src" "$work/$dest"
done

(cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
