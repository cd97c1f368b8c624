//! The control side of a running router: [`RouterHandle`] (a cheap clone the
//! daemon keeps per NAT network) sends [`Command`]s over a bounded channel to the
//! router's task, each with a oneshot for the answer, and the router serves them
//! between two steps of its loop ([`Router::handle_command`]). No state is shared:
//! forwards, flows and counters are read and changed only on the router's thread.
//!
//! The answers ([`Stats`], [`FlowInfo`], the forward list) are what `netd flows` and
//! `netd forward list` print, so their serde form is part of the control API.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::config::{Cidr, Outbound};
use super::{Forward, NatError, Proto, Router};
pub use fabric_api::netd::PolicyList;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Frames from the switch.
    pub frames_in: u64,
    /// Frames to the switch.
    pub frames_out: u64,
    /// Malformed frames dropped.
    pub malformed: u64,
    /// Flows refused because the table was full (count or memory).
    pub flows_refused: u64,
    /// TCP connects refused or unreachable on the host (answered with a RST).
    pub connect_failed: u64,
    /// Datagrams or echo requests dropped (send failure, too large, no resolver).
    pub dropped: u64,
    /// Guest packets dropped: the source is not a unicast address of the subnet
    /// (0.0.0.0, the subnet's network or broadcast address, the router's own, or
    /// outside the subnet).
    pub bad_source: u64,
    /// Guest packets dropped: the destination is 0.0.0.0, broadcast, multicast or
    /// reserved.
    pub martian_dst: u64,
    /// Guest packets dropped: a TCP or UDP port is 0.
    pub port_zero: u64,
    /// Flows refused: the destination is the host's loopback (127.0.0.0/8).
    pub denied_loopback: u64,
    /// Flows refused: the destination is the host itself (the gateway address
    /// without `host_loopback`, or one of the host's addresses).
    pub denied_host: u64,
    /// Flows refused by `outbound_allow` / `outbound_deny`.
    pub denied_policy: u64,
    /// Flows refused: the guest is at `max_flows_per_guest` or
    /// `max_pending_per_guest` (a RST, or an ICMP unreachable for UDP).
    pub guest_quota: u64,
    /// Host sockets that could not be opened for lack of file descriptors.
    pub no_fds: u64,
    /// TCP flows removed because their socket was back in LISTEN (its SYN refused,
    /// or the guest reset the half-open connection).
    pub listen_reaped: u64,
    /// Times the router panicked and was restarted by its supervisor (its flows
    /// were dropped; its forwards, settings and counters kept).
    pub restarts: u64,
    /// TCP flows open now (port forwards' listeners not counted).
    pub flows_tcp: u64,
    /// UDP flows open now.
    pub flows_udp: u64,
    /// ICMP echo flows open now.
    pub flows_icmp: u64,
    /// IPv6 frames from the switch (of `frames_in`).
    pub frames_in6: u64,
    /// Flows open now from a guest's IPv6 address (TCP, UDP and ICMPv6; of the
    /// three above, port forwards not counted).
    pub flows_ipv6: u64,
}

/// One flow, as `netd flows NET` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowInfo {
    /// tcp, udp or icmp.
    pub proto: String,
    /// The guest's end.
    pub guest: String,
    /// The address the guest asked for.
    pub dst: String,
    /// The host-side peer.
    pub host_peer: String,
    /// A short state.
    pub state: String,
    /// Whether a port forward made it.
    pub forward: bool,
    /// Seconds since the last traffic.
    pub idle_s: u64,
}

impl FlowInfo {
    /// An `OPEN` flow of `proto`, not made by a forward, between the guest's
    /// `guest` and `dst`, carried by the host's `host_peer`, idle for `idle`;
    /// the other kinds of flow change a field or two of it.
    pub(super) fn open(
        proto: &str,
        guest: impl ToString,
        dst: impl ToString,
        host_peer: impl ToString,
        idle: Duration,
    ) -> FlowInfo {
        FlowInfo {
            proto: proto.into(),
            guest: guest.to_string(),
            dst: dst.to_string(),
            host_peer: host_peer.to_string(),
            state: "OPEN".into(),
            forward: false,
            idle_s: idle.as_secs(),
        }
    }
}

pub(super) enum Command {
    AttachReader(crate::port::InlineReader),
    AddForward(Forward, oneshot::Sender<Result<(), NatError>>),
    DelForward(Proto, SocketAddr, oneshot::Sender<Result<(), NatError>>),
    ListForwards(oneshot::Sender<Vec<Forward>>),
    Flows(oneshot::Sender<Vec<FlowInfo>>),
    Stats(oneshot::Sender<Stats>),
    Outbound(OutboundChange, oneshot::Sender<Outbound>),
    InjectPanic(oneshot::Sender<()>),
}

/// A change of a router's outbound lists (or none: just show them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundChange {
    /// Show the lists.
    Show,
    /// Add a CIDR (either family) to a list (no-op if there).
    Add(PolicyList, Cidr),
    /// Remove a CIDR from a list (no-op if absent).
    Del(PolicyList, Cidr),
}

/// A control request to a router, for callers on blocking threads (the daemon's
/// control handler).
#[derive(Debug, Clone)]
pub enum NatRequest {
    /// Add a port forward.
    AddForward(Forward),
    /// Remove the forward on this protocol and host address.
    DelForward(Proto, SocketAddr),
    /// List forwards.
    ListForwards,
    /// List flows.
    Flows,
    /// Counters.
    Stats,
    /// Show or change the outbound lists.
    Outbound(OutboundChange),
    /// Panic in the router's next step (the supervisor's test; the daemon allows
    /// it only with `NETD_FAULT_INJECTION=1` in its environment).
    InjectPanic,
}

/// Drives a running router: port forwards, flows, counters.
#[derive(Debug, Clone)]
pub struct RouterHandle {
    tx: mpsc::Sender<Command>,
}

impl RouterHandle {
    /// A handle sending on `tx` (the router holds the receiving end).
    pub(super) fn new(tx: mpsc::Sender<Command>) -> Self {
        RouterHandle { tx }
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl RouterHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NatError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| NatError::Stopped)?;
        rx.await.map_err(|_| NatError::Stopped)
    }

    /// Serves `req` from a blocking thread (not from inside the runtime's workers);
    /// the answer as JSON.
    pub fn request_blocking(&self, req: NatRequest) -> Result<serde_json::Value, NatError> {
        fn ask<T>(
            tx: &mpsc::Sender<Command>,
            make: impl FnOnce(oneshot::Sender<T>) -> Command,
        ) -> Result<T, NatError> {
            let (otx, orx) = oneshot::channel();
            tx.blocking_send(make(otx)).map_err(|_| NatError::Stopped)?;
            orx.blocking_recv().map_err(|_| NatError::Stopped)
        }
        let j = |v: serde_json::Result<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
        Ok(match req {
            NatRequest::AddForward(f) => {
                ask(&self.tx, |t| Command::AddForward(f, t))??;
                serde_json::Value::Null
            }
            NatRequest::DelForward(p, h) => {
                ask(&self.tx, |t| Command::DelForward(p, h, t))??;
                serde_json::Value::Null
            }
            NatRequest::ListForwards => {
                j(serde_json::to_value(ask(&self.tx, Command::ListForwards)?))
            }
            NatRequest::Flows => j(serde_json::to_value(ask(&self.tx, Command::Flows)?)),
            NatRequest::Stats => j(serde_json::to_value(ask(&self.tx, Command::Stats)?)),
            NatRequest::Outbound(c) => j(serde_json::to_value(ask(&self.tx, |t| {
                Command::Outbound(c, t)
            })?)),
            NatRequest::InjectPanic => {
                ask(&self.tx, Command::InjectPanic)?;
                serde_json::Value::Null
            }
        })
    }

    /// Adds a port forward (binds its host address now).
    pub async fn add_forward(&self, f: Forward) -> Result<(), NatError> {
        self.ask(|tx| Command::AddForward(f, tx)).await?
    }

    /// Removes the forward on `host`; its open connections are closed.
    pub async fn del_forward(&self, proto: Proto, host: SocketAddr) -> Result<(), NatError> {
        self.ask(|tx| Command::DelForward(proto, host, tx)).await?
    }

    /// The forwards in place.
    pub async fn forwards(&self) -> Result<Vec<Forward>, NatError> {
        self.ask(Command::ListForwards).await
    }

    /// The flows in the table.
    pub async fn flows(&self) -> Result<Vec<FlowInfo>, NatError> {
        self.ask(Command::Flows).await
    }

    /// The router's counters.
    pub async fn stats(&self) -> Result<Stats, NatError> {
        self.ask(Command::Stats).await
    }

    /// Hands the router a guest port to read on its own thread (see
    /// [`crate::port::InlineReader`]); gives it back if the router cannot take it
    /// now. Never blocks.
    pub fn attach_reader(
        &self,
        r: crate::port::InlineReader,
    ) -> Result<(), crate::port::InlineReader> {
        match self.tx.try_send(Command::AttachReader(r)) {
            Ok(()) => Ok(()),
            Err(e) => match e.into_inner() {
                Command::AttachReader(r) => Err(r),
                _ => Ok(()),
            },
        }
    }
}

impl Router {
    /// Serves one control request (between two steps of the loop).
    pub(super) fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::AttachReader(r) => self.attach_reader(r),
            Command::AddForward(f, tx) => {
                let _ = tx.send(self.add_forward(f));
            }
            Command::DelForward(proto, host, tx) => {
                let r = match proto {
                    Proto::Tcp => self.tcp.del_forward(host),
                    Proto::Udp => self.udp.del_forward(host),
                };
                let _ = tx.send(
                    r.then_some(())
                        .ok_or(NatError::NoSuchForward { proto, host }),
                );
            }
            Command::ListForwards(tx) => {
                let mut v = self.tcp.forwards();
                v.extend(self.udp.forwards());
                let _ = tx.send(v);
            }
            Command::Flows(tx) => {
                let mut v = self.tcp.flows();
                v.extend(self.udp.flows());
                v.extend(self.icmp.flows());
                let _ = tx.send(v);
            }
            Command::Stats(tx) => {
                let mut s = self.stats.clone();
                s.flows_tcp = self.tcp.len() as u64;
                s.flows_udp = self.udp.len() as u64;
                s.flows_icmp = self.icmp.len() as u64;
                s.flows_ipv6 = self.guest_flows.total_ipv6() as u64;
                let _ = tx.send(s);
            }
            Command::Outbound(c, tx) => {
                match c {
                    OutboundChange::Show => {}
                    OutboundChange::Add(l, cidr) => {
                        self.cfg.outbound_edit(l, cidr, true);
                        tracing::info!(list = ?l, %cidr, "outbound entry added");
                    }
                    OutboundChange::Del(l, cidr) => {
                        self.cfg.outbound_edit(l, cidr, false);
                        tracing::info!(list = ?l, %cidr, "outbound entry removed");
                    }
                }
                let _ = tx.send(self.outbound());
            }
            Command::InjectPanic(tx) => {
                tracing::warn!("fault injection: the router panics in its next step");
                self.inject_panic = true;
                let _ = tx.send(());
            }
        }
    }

    /// The outbound policy as shown by the control API.
    pub(super) fn outbound(&self) -> Outbound {
        Outbound {
            host_loopback: self.cfg.host_loopback,
            allow: show_list(&self.cfg.outbound_allow, &self.cfg.outbound_allow6),
            deny: show_list(&self.cfg.outbound_deny, &self.cfg.outbound_deny6),
        }
    }

    /// Adds a port forward, after the same checks as the configured ones.
    pub(super) fn add_forward(&mut self, f: Forward) -> Result<(), NatError> {
        self.cfg.check_forward(&f)?;
        match f.proto {
            Proto::Tcp => self.tcp.add_forward(f),
            Proto::Udp => self.udp.add_forward(f),
        }
    }
}

/// An outbound list as text: its IPv4 entries, then its IPv6 ones.
fn show_list(v4: &[(std::net::Ipv4Addr, u8)], v6: &[(std::net::Ipv6Addr, u8)]) -> Vec<String> {
    let v4 = v4.iter().map(|c| Cidr::V4(*c));
    v4.chain(v6.iter().map(|c| Cidr::V6(*c)))
        .map(|c| c.to_string())
        .collect()
}
