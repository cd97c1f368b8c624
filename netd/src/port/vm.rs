//! `vm` ports: a VMM (QEMU `-netdev tap,ifname=..`, Firecracker, cloud-hypervisor,
//! vmm-shim) holds the TAP queue, and netd moves frames through an AF_PACKET socket
//! bound to the TAP's kernel side (PACKET_IGNORE_OUTGOING, so netd does not read back
//! its own frames; PACKET_VNET_HDR, so offloaded frames keep their metadata).
//!
//! netd creates the TAP (persistent) if it is missing and brings its kernel side up.
//! An existing interface must be a TAP (asked of its driver, as `ethtool -i` does):
//! a host NIC or a veth named here would otherwise bridge that link in.
//! When the VMM goes away the TAP stays, sends count as `drop_down`, and traffic
//! resumes when a VMM attaches again; if the TAP itself disappears the port's thread
//! recreates it. A TAP netd created is deleted with the port unless `persistent`.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::common::{tap_ifname_mtu, Cleanup};
use super::fd::start_reopening_port;
use super::{GiveReader, PortError, RunningPort};
use crate::config::PortSpec;
use crate::switch::{Network, Port, PortClass};
use crate::sys;

/// Deletes a persistent TAP: clears its persist flag through a fresh queue (closing
/// that queue then removes it); if a VMM still holds it, falls back to
/// `ip link delete`.
pub(super) fn delete_persistent_tap(ifname: &str) {
    match sys::tap_open(ifname, false).and_then(|fd| sys::tap_set_persist(&fd, false)) {
        Ok(()) => tracing::info!(ifname, "deleted TAP"),
        Err(e) => {
            tracing::debug!(ifname, error = %e, "TAP busy, deleting with ip link");
            let ok = std::process::Command::new("ip")
                .args(["link", "delete", ifname])
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                tracing::warn!(ifname, "could not delete TAP");
            }
        }
    }
}

/// Makes sure the persistent TAP `ifname` exists and is up; returns whether netd
/// created it now. An existing interface that is not a TAP (a host NIC, a veth, a
/// bridge) is refused: a `vm` port on it would bridge that link into the network.
fn ensure_vm_tap(ifname: &str, mtu: u32) -> io::Result<bool> {
    let created = if sys::if_exists(ifname) {
        match sys::if_kind(ifname)? {
            sys::IfKind::Tap => {}
            sys::IfKind::Other(what) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{ifname} exists and is not a TAP ({what}); a vm port takes a TAP only"
                    ),
                ))
            }
        }
        false
    } else {
        let fd = sys::tap_open(ifname, false)?;
        sys::tap_set_persist(&fd, true)?;
        true
    };
    if created {
        sys::if_set_mtu(ifname, mtu)?;
    }
    sys::if_disable_ipv6(ifname);
    sys::if_up(ifname)?;
    Ok(created)
}

pub(super) fn start_vm_port(
    net: &Arc<Network>,
    spec: &PortSpec,
    inline: Option<(Arc<Port>, GiveReader<'_>)>,
) -> Result<RunningPort, PortError> {
    let (ifname, mtu) = tap_ifname_mtu(net, spec);
    let created = ensure_vm_tap(&ifname, mtu).map_err(|source| PortError::Tap {
        ifname: ifname.clone(),
        source,
    })?;
    let open = |ifname: &str| -> io::Result<OwnedFd> { sys::packet_socket(sys::if_index(ifname)?) };
    let fd = open(&ifname).map_err(|source| PortError::Packet {
        ifname: ifname.clone(),
        source,
    })?;
    let cleanup = cleanup_for(&ifname, created, spec.persistent);
    let reopen = move || ensure_vm_tap(&ifname, mtu).and_then(|_| open(&ifname));
    start_reopening_port(
        net,
        spec,
        PortClass::Vm,
        fd,
        Box::new(reopen),
        cleanup,
        inline,
    )
}

/// What removing the port undoes: a TAP netd created goes with it, unless kept
/// (`persistent`); a TAP that was there before (a VMM's, or kept from an earlier run)
/// is never netd's to delete.
fn cleanup_for(ifname: &str, created: bool, persistent: bool) -> Cleanup {
    if created && !persistent {
        Cleanup::DeleteTap(ifname.to_string())
    } else {
        Cleanup::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_tap_netd_created_and_need_not_keep_is_deleted() {
        assert!(matches!(cleanup_for("t0", true, false), Cleanup::DeleteTap(n) if n == "t0"));
        assert!(matches!(cleanup_for("t0", true, true), Cleanup::None));
        assert!(matches!(cleanup_for("t0", false, false), Cleanup::None));
        assert!(matches!(cleanup_for("t0", false, true), Cleanup::None));
    }
}
