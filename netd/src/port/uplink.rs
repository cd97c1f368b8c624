//! The `uplink` port of a bridged network: an AF_PACKET socket on a host NIC, in
//! promiscuous mode, so the VMs' frames go out on the LAN with their own MACs and the
//! LAN's frames for them come in. The host keeps using the NIC: the socket ignores
//! the host's own outgoing frames, and the kernel still receives what is addressed
//! to the host. The socket carries virtio-net headers, so a frame whose checksum was
//! left to "hardware" (a veth or bridge peer) or a coalesced TCP super-frame arrives
//! with what is needed to finish it (see [`crate::offload`]).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::common::Cleanup;
use super::fd::start_fd_port;
use super::{sys, PortError, RunningPort};
use crate::config::{PortKind, PortSpec};
use crate::switch::{Network, PortClass};

/// Starts the uplink port of a bridged network on host NIC `ifname`.
pub fn start_uplink(net: &Arc<Network>, ifname: &str) -> Result<RunningPort, PortError> {
    let perr = |source| PortError::Packet {
        ifname: ifname.to_string(),
        source,
    };
    let index = crate::sys::if_index(ifname).map_err(perr)?;
    let fd = crate::sys::packet_socket(index).map_err(perr)?;
    sys::set_promiscuous(fd.as_raw_fd(), index).map_err(perr)?;
    let spec = PortSpec {
        name: "uplink".into(),
        kind: PortKind::Vm,
        ifname: Some(ifname.to_string()),
        mac: None,
        netns: None,
        path: None,
        vxlan: None,
        persistent: true,
        guard: None,
    };
    start_fd_port(net, &spec, PortClass::Uplink, fd, Cleanup::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nic_is_an_error_naming_it_and_leaves_no_port() {
        let (net, _, _) = super::super::testing::sink();
        match start_uplink(&net, "ndnosuchnic0") {
            Err(PortError::Packet { ifname, .. }) => assert_eq!(ifname, "ndnosuchnic0"),
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("started"),
        }
        assert!(net.port("uplink").is_none());
    }
}
