//! `tap` ports (netd holds the TAP queue) and the hostonly network's `host` TAP.
//!
//! netd opens the queue with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (checksum and TCP
//! segmentation offload accepted: see [`crate::offload`]) and configures the kernel
//! side (MAC, MTU, up). With `netns` the queue is opened in netd's own namespace
//! under a temporary name and the device then moved and renamed into the target, so
//! that the queue pins netd's namespace, not the target's: deleting the target
//! namespace deletes the TAP (the port then waits for the namespace to come back and
//! reopens it) instead of keeping a dead namespace alive. The `host` TAP stays in
//! netd's namespace and gets the gateway address and forwarding turned off on it
//! (IPv4 and IPv6 `conf/IF/forwarding = 0`): on a host with `ip_forward = 1` the
//! guests still reach the host only, never past it.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::common::{tap_ifname_mtu, Cleanup};
use super::fd::{start_fd_port, start_reopening_port};
use super::{GiveReader, PortError, RunningPort};
use crate::config::{PortKind, PortSpec};
use crate::switch::{Network, Port, PortClass};
use crate::sys;

/// Starts a `tap` port: opens the TAP and reopens it if it goes away.
pub(super) fn start_tap_port(
    net: &Arc<Network>,
    spec: &PortSpec,
    inline: Option<(Arc<Port>, GiveReader<'_>)>,
) -> Result<RunningPort, PortError> {
    let (ifname, mtu) = tap_ifname_mtu(net, spec);
    let fd = open_tap(spec, &ifname, mtu)?;
    // If the TAP goes away (its namespace was deleted), make it again once
    // the namespace is back.
    let spec2 = spec.clone();
    let reopen = move || {
        open_tap(&spec2, &ifname, mtu).map_err(|e| io::Error::other(crate::error_chain(&e)))
    };
    start_reopening_port(
        net,
        spec,
        PortClass::Tap,
        fd,
        Box::new(reopen),
        Cleanup::None,
        inline,
    )
}

/// Starts the host TAP of a hostonly network: kernel side in netd's namespace,
/// with `addr`/`mask`.
pub fn start_host_port(
    net: &Arc<Network>,
    ifname: &str,
    addr: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
    addr6: Option<std::net::Ipv6Addr>,
) -> Result<RunningPort, PortError> {
    let spec = PortSpec {
        name: ifname.to_string(),
        kind: PortKind::Tap,
        ifname: Some(ifname.to_string()),
        mac: None,
        netns: None,
        path: None,
        vxlan: None,
        persistent: false,
        guard: None,
    };
    let fd = open_tap(&spec, ifname, net.mtu() as u32)?;
    let tap_err = |source| PortError::Tap {
        ifname: ifname.to_string(),
        source,
    };
    sys::if_set_ipv4(ifname, addr, mask).map_err(tap_err)?;
    if let Some(a6) = addr6 {
        sys::if_add_ipv6(ifname, a6, 64).map_err(tap_err)?;
    }
    // The host is an end of a hostonly network, not a router: even on a host with
    // `ip_forward = 1`, nothing the guests send is forwarded past it.
    sys::if_disable_forwarding(ifname).map_err(tap_err)?;
    start_fd_port(net, &spec, PortClass::Host, fd, Cleanup::None)
}

/// Creates (or attaches to) TAP `ifname` and configures its kernel side, in the
/// namespace `netns` if given. Returns the queue fd.
fn open_tap(spec: &PortSpec, ifname: &str, mtu: u32) -> Result<OwnedFd, PortError> {
    let mac = spec.mac;
    let configure = move |name: &str| -> io::Result<()> {
        if let Some(m) = mac {
            sys::if_set_mac(name, m)?;
        }
        sys::if_set_mtu(name, mtu)?;
        sys::if_up(name)
    };
    let tap_err = |source| PortError::Tap {
        ifname: ifname.to_string(),
        source,
    };
    let Some(ns) = &spec.netns else {
        let fd = sys::tap_open(ifname, true).map_err(tap_err)?;
        if spec.persistent {
            sys::tap_set_persist(&fd, true).map_err(tap_err)?;
        }
        configure(ifname).map_err(tap_err)?;
        return Ok(fd);
    };
    let netns_err = |source| PortError::Netns {
        netns: ns.clone(),
        source,
    };
    // The queue is opened in netd's own namespace (under a temporary name) and the
    // device then moved and renamed into the target: a TAP queue pins the namespace
    // it was opened in, and this way that is netd's, so deleting the target
    // namespace deletes the TAP (netd sees it and waits for the namespace to come
    // back) instead of keeping a dead namespace alive.
    let nsfile = sys::open_netns(ns).map_err(netns_err)?;
    let tmp = temp_ifname();
    let fd = sys::tap_open(&tmp, true).map_err(tap_err)?;
    let index = sys::if_index(&tmp).map_err(tap_err)?;
    sys::link_move_rename(index, &nsfile, ifname).map_err(tap_err)?;
    if spec.persistent {
        sys::tap_set_persist(&fd, true).map_err(tap_err)?;
    }
    let ns2 = ns.clone();
    let name = ifname.to_string();
    let h = std::thread::Builder::new()
        .name("netns-setup".into())
        .spawn(move || -> Result<io::Result<()>, io::Error> {
            sys::enter_netns(&ns2)?;
            Ok(configure(&name))
        })
        .map_err(PortError::Thread)?;
    match h.join() {
        Ok(Ok(r)) => r.map_err(tap_err)?,
        Ok(Err(source)) => return Err(netns_err(source)),
        Err(_) => {
            return Err(PortError::Thread(io::Error::other(
                "namespace setup thread panicked",
            )))
        }
    }
    Ok(fd)
}

/// A short interface name unique in this process, for a TAP before it is moved.
fn temp_ifname() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("ndt{:x}.{:x}", std::process::id() & 0xffff, n & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_unique_and_fit_an_interface_name() {
        let names: std::collections::HashSet<String> = (0..1000).map(|_| temp_ifname()).collect();
        assert_eq!(names.len(), 1000);
        for n in &names {
            assert!(sys::check_ifname(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn a_missing_namespace_is_an_error_naming_it() {
        let (net, _, _) = super::super::testing::sink();
        let mut s = super::super::testing::spec("t", PortKind::Tap);
        s.ifname = Some("ndtest0".into());
        s.netns = Some("netd-unit-test-no-such-namespace".into());
        match start_tap_port(&net, &s, None) {
            Err(PortError::Netns { netns, .. }) => {
                assert_eq!(netns, "netd-unit-test-no-such-namespace")
            }
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("started"),
        }
        assert!(net.port("t").is_none());
    }
}
