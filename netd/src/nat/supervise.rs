//! The router's supervisor: a router that panics (a guest or peer found a bug the
//! input checks missed) is restarted on its thread without its flows, keeping its
//! settings, forwards, counters and guest port (see [`crate::nat`], "Hostile
//! guests").

use std::time::Duration;

use smoltcp::iface::SocketSet;

use super::router::{make_iface, GuestCounts, Router};
use super::{frame, icmp, tcp, udp};

impl Router {
    /// Drops every flow and the smoltcp state after a panic (which may have left
    /// them half-changed) and starts afresh with the same settings, switch port,
    /// inline guest port, control channel, forwards and counters.
    pub(super) fn restart_after_panic(&mut self) {
        let mut forwards = self.tcp.forwards();
        forwards.extend(self.udp.forwards());
        // Old host sockets (and forward listeners) close first, so the forwards
        // can bind their addresses again.
        self.tcp = tcp::TcpTable::default();
        self.udp = udp::UdpTable::default();
        self.icmp = icmp::IcmpTable::default();
        self.sockets = SocketSet::new(Vec::new());
        self.dev.rx.clear();
        self.dev.tx.clear();
        self.inbox.clear();
        self.guest_flows = GuestCounts::default();
        self.guest_pending = GuestCounts::default();
        self.inject_panic = false;
        match make_iface(&self.cfg, self.mac, &mut self.dev) {
            Ok(i) => self.iface = i,
            Err(e) => tracing::error!(error = %e, "cannot rebuild the router's interface"),
        }
        for f in forwards {
            if let Err(e) = self.add_forward(f) {
                tracing::error!(error = %e, "forward lost in the router's restart");
            }
        }
        // The new interface learns the guests the old one knew, as if each had
        // asked for the gateway (their ARP caches still hold the router's MAC).
        for (ip, mac) in &self.guest_macs {
            let std::net::IpAddr::V4(ip) = ip else {
                continue;
            };
            if self.cfg.valid_guest_src(*ip) {
                self.dev
                    .rx
                    .push_back(frame::arp_request((*mac, *ip), self.cfg.gateway));
            }
        }
        if let Some(v6) = &mut self.v6 {
            v6.forget_neighbors();
        }
        self.stats.restarts += 1;
    }
}

/// Runs `router` on `rt` until its switch port goes away, restarting it after a
/// panic: the guest and every peer are hostile, and a panic that escaped the
/// input checks (here or inside smoltcp) must cost the network its flows, not the
/// router. The panic is logged with its message (the panic hook has printed where
/// it happened) and counted in `restarts`; other networks, on their own threads,
/// never notice. A router that keeps panicking restarts at most ten times a second.
pub(super) fn supervise(rt: &tokio::runtime::Runtime, mut router: Router) {
    tracing::info!(gateway = %router.cfg.gateway, dns = %router.cfg.dns, mtu = router.cfg.mtu, "NAT router up");
    loop {
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(router.serve())));
        match r {
            Ok(()) => break,
            Err(p) => {
                let cause = panic_message(p.as_ref());
                tracing::error!(%cause, restarts = router.stats.restarts + 1, "NAT router panicked; restarting it without its flows");
                let _guard = rt.enter();
                router.restart_after_panic();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    tracing::info!("NAT router stopped");
}

/// The message of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}
