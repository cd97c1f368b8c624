//! Control request dispatch: [`Daemon::handle`] serves one parsed [`Request`] of
//! the control API, from a blocking thread (a port add may block briefly, and a NAT
//! request waits for the router's answer). Arguments that are strings on the wire
//! (CIDRs, host addresses, ports) are parsed and checked here, at the edge, before
//! anything changes.

use std::sync::atomic::Ordering;

use fabric_api::netd::{ControlStats, DhcpStats, Request};
use fabric_util::MacAddr;

use super::{fault_injection, Daemon, DaemonError, FAULT_INJECTION_ENV};

impl Daemon {
    /// Sends a request to a NAT network's router (from a blocking thread).
    fn nat_request(
        &self,
        net: &str,
        req: crate::nat::NatRequest,
    ) -> Result<serde_json::Value, DaemonError> {
        let h = self
            .with_net(net, |st| st.nat.clone())?
            .ok_or_else(|| DaemonError::NotNat(net.to_string()))?;
        h.request_blocking(req)
            .map_err(|e| DaemonError::Nat(net.to_string(), e))
    }

    /// The DNS names table of a network that serves DNS.
    fn dns_names(&self, net: &str) -> Result<std::sync::Arc<crate::dns::LocalNames>, DaemonError> {
        self.with_net(net, |st| st.names.clone())?
            .ok_or_else(|| DaemonError::NoDns(net.to_string()))
    }

    /// Adds (`add`) or removes a static remote of a VXLAN port's flood list.
    fn vxlan_remote(
        &self,
        net: &str,
        port: &str,
        remote: std::net::Ipv4Addr,
        add: bool,
    ) -> Result<serde_json::Value, DaemonError> {
        let t = self.tunnel(net, port)?;
        let done = if add {
            t.add_remote(remote)
        } else {
            t.del_remote(remote)
        };
        done.map_err(|e| DaemonError::Vxlan(net.to_string(), port.to_string(), e))?;
        let what = if add { "added" } else { "removed" };
        tracing::info!(network = %net, port = %port, %remote, "vxlan remote {what}");
        Ok(serde_json::Value::Null)
    }

    /// Adds (`add`) or removes a CIDR of a NAT network's outbound list, and
    /// records the change in the runtime state.
    fn outbound(
        &self,
        net: &str,
        list: fabric_api::netd::PolicyList,
        cidr: &str,
        add: bool,
    ) -> Result<serde_json::Value, DaemonError> {
        let c = parse_cidr_arg(net, cidr)?;
        let change = if add {
            crate::nat::OutboundChange::Add(list, c)
        } else {
            crate::nat::OutboundChange::Del(list, c)
        };
        let v = self.nat_request(net, crate::nat::NatRequest::Outbound(change))?;
        self.record_outbound(net, list, c, add)?;
        Ok(v)
    }

    /// Serves one request.
    pub fn handle(&self, req: Request) -> Result<serde_json::Value, DaemonError> {
        let j = |v: serde_json::Result<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
        match req {
            Request::NetList => Ok(j(serde_json::to_value(self.net_list_full()))),
            Request::PortList { net } => self.with_net(&net, |st| {
                let infos = st.net.port_infos();
                let rows: Vec<serde_json::Value> = infos
                    .into_iter()
                    .map(|pi| {
                        let rp = st.ports.iter().find(|p| p.spec.name == pi.name);
                        let mut v = j(serde_json::to_value(&pi));
                        if let (Some(rp), Some(o)) = (rp, v.as_object_mut()) {
                            o.insert("ifname".into(), j(serde_json::to_value(&rp.spec.ifname)));
                            o.insert("netns".into(), j(serde_json::to_value(&rp.spec.netns)));
                            o.insert("path".into(), j(serde_json::to_value(&rp.spec.path)));
                            o.insert(
                                "mac".into(),
                                j(serde_json::to_value(rp.spec.mac.map(MacAddr))),
                            );
                            if let Some(t) = &rp.tunnel {
                                o.insert("vxlan".into(), j(serde_json::to_value(t.info())));
                            }
                        }
                        v
                    })
                    .collect();
                serde_json::Value::Array(rows)
            }),
            Request::PortAdd { net, port } => {
                let spec = crate::config::validate_port(&port, "<control>", "port")
                    .map_err(DaemonError::BadPort)?;
                let name = spec.name.clone();
                self.port_add(&net, spec)?;
                self.record_port_add(&net, port, name)?;
                Ok(serde_json::Value::Null)
            }
            Request::PortDel { net, name } => {
                self.port_del(&net, &name)?;
                self.record_port_del(&net, &name)?;
                Ok(serde_json::Value::Null)
            }
            Request::VxlanRemoteAdd { net, port, remote } => {
                let v = self.vxlan_remote(&net, &port, remote, true)?;
                self.record_remote(&net, &port, remote, true)?;
                Ok(v)
            }
            Request::VxlanRemoteDel { net, port, remote } => {
                let v = self.vxlan_remote(&net, &port, remote, false)?;
                self.record_remote(&net, &port, remote, false)?;
                Ok(v)
            }
            Request::VxlanShow { net, port } => {
                Ok(j(serde_json::to_value(self.tunnel(&net, &port)?.info())))
            }
            Request::Mac { net } => {
                self.with_net(&net, |st| j(serde_json::to_value(st.net.mac_table())))
            }
            Request::ForwardAdd { net, forward } => {
                let v =
                    self.nat_request(&net, crate::nat::NatRequest::AddForward(forward.clone()))?;
                self.record_forward_add(&net, forward)?;
                Ok(v)
            }
            Request::ForwardDel { net, proto, host } => {
                let host = crate::nat::parse_host_addr(&host).map_err(|e| {
                    DaemonError::Nat(
                        net.clone(),
                        crate::nat::NatError::Invalid {
                            key: "host",
                            reason: e,
                        },
                    )
                })?;
                let v = self.nat_request(&net, crate::nat::NatRequest::DelForward(proto, host))?;
                self.record_forward_del(&net, super::runtime::ForwardKey { proto, host })?;
                Ok(v)
            }
            Request::ForwardList { net } => {
                self.nat_request(&net, crate::nat::NatRequest::ListForwards)
            }
            Request::Flows { net } => self.nat_request(&net, crate::nat::NatRequest::Flows),
            Request::NatStats { net } => self.nat_request(&net, crate::nat::NatRequest::Stats),
            Request::OutboundList { net } => self.nat_request(
                &net,
                crate::nat::NatRequest::Outbound(crate::nat::OutboundChange::Show),
            ),
            Request::OutboundAdd { net, list, cidr } => self.outbound(&net, list, &cidr, true),
            Request::OutboundDel { net, list, cidr } => self.outbound(&net, list, &cidr, false),
            Request::NatFault { net } => {
                if !fault_injection() {
                    return Err(DaemonError::Nat(
                        net,
                        crate::nat::NatError::Invalid {
                            key: "nat_fault",
                            reason: format!(
                                "fault injection is off (start netd with {FAULT_INJECTION_ENV}=1)"
                            ),
                        },
                    ));
                }
                self.nat_request(&net, crate::nat::NatRequest::InjectPanic)
            }
            Request::Leases { net } => self.with_net(&net, |st| {
                let leases = st
                    .dhcp
                    .as_ref()
                    .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).db.leases())
                    .unwrap_or_default();
                // IPv6 rows (DHCPv6) follow the IPv4 ones, with their `duid` and `iaid`.
                let v6 = st
                    .ipv6
                    .as_ref()
                    .map(|s| {
                        s.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .dhcp6
                            .db
                            .leases()
                            .to_vec()
                    })
                    .unwrap_or_default();
                let mut rows = serde_json::to_value(leases);
                if let (Ok(serde_json::Value::Array(a)), Ok(serde_json::Value::Array(b))) =
                    (&mut rows, serde_json::to_value(v6))
                {
                    a.extend(b);
                }
                j(rows)
            }),
            Request::ControlStats => {
                let c = &self.control;
                let stats = ControlStats {
                    connections: c.open.load(Ordering::Relaxed),
                    max_connections: c.max.load(Ordering::Relaxed),
                    refused_full: c.refused_full.load(Ordering::Relaxed),
                    closed_idle: c.closed_idle.load(Ordering::Relaxed),
                };
                Ok(j(serde_json::to_value(stats)))
            }
            Request::DnsNames { net } => {
                let names = self.dns_names(&net)?;
                Ok(j(serde_json::to_value(
                    names.entries(crate::dns::unix_now()),
                )))
            }
            Request::DnsStats { net } => {
                let names = self.dns_names(&net)?;
                Ok(j(serde_json::to_value(names.stats(crate::dns::unix_now()))))
            }
            Request::NetAdd { network } => {
                self.net_add(network)?;
                Ok(serde_json::Value::Null)
            }
            Request::NetDel { name, force } => {
                Ok(serde_json::Value::String(self.net_del(&name, force)?))
            }
            Request::ReservationAdd { net, reservation } => {
                self.reservation_add(&net, reservation)?;
                Ok(serde_json::Value::Null)
            }
            Request::ReservationDel { net, mac } => {
                self.reservation_del(&net, &mac)?;
                Ok(serde_json::Value::Null)
            }
            Request::ReservationList { net } => {
                Ok(j(serde_json::to_value(self.reservation_list(&net)?)))
            }
            // serve_conn hands it to daemon/capture.rs before it gets here.
            Request::Capture { .. } => Err(DaemonError::CaptureStream),
            Request::DhcpStats { net } => {
                let (dhcp, v6) = self.with_net(&net, |st| (st.dhcp.clone(), st.ipv6.clone()))?;
                let mut out = match (&dhcp, &v6) {
                    (Some(d), _) => {
                        let stats: DhcpStats = d.lock().unwrap_or_else(|e| e.into_inner()).stats();
                        serde_json::to_value(stats).unwrap_or_default()
                    }
                    (None, Some(_)) => serde_json::json!({}),
                    (None, None) => return Err(DaemonError::NoDhcp(net.clone())),
                };
                // The IPv6 service's counters (RAs, NDP, DHCPv6) follow, additively.
                if let (Some(s), Some(o)) = (&v6, out.as_object_mut()) {
                    for (k, v) in s.lock().unwrap_or_else(|e| e.into_inner()).stats() {
                        o.insert(k.to_string(), v.into());
                    }
                }
                Ok(j(Ok::<_, serde_json::Error>(out)))
            }
        }
    }
}

/// A CIDR of an `outbound_*` request, parsed at the edge.
fn parse_cidr_arg(net: &str, cidr: &str) -> Result<crate::nat::Cidr, DaemonError> {
    crate::nat::parse_cidr_any(cidr).map_err(|reason| {
        DaemonError::Nat(
            net.to_string(),
            crate::nat::NatError::Invalid {
                key: "cidr",
                reason,
            },
        )
    })
}
