//! What vmm-shim exports on `/metrics` (`--metrics ADDR`, or `metrics` in its TOML
//! file): per vCPU, its exits by reason ([`VcpuExits`], one relaxed atomic add per
//! exit on the vCPU's thread); per device, the counters every virtio device keeps
//! ([`Counters`], shared with the device, read at scrape time). The server runs on
//! threads of its own (see [`fabric_util::metrics`]); nothing waits for it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fabric_util::metrics::{Labels, Out, Source};

use crate::virtio::Counters;

/// Why KVM_RUN returned, as counted (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A port read (UART, i8042).
    IoIn,
    /// A port write.
    IoOut,
    /// An MMIO read (virtio-mmio registers).
    MmioRead,
    /// An MMIO write (virtio-mmio registers; a QueueNotify KVM did not take).
    MmioWrite,
    /// Interrupted (a signal, a kick), or KVM_RUN's EINTR / EAGAIN.
    Intr,
    /// A system event (reset, shutdown).
    SystemEvent,
    /// Anything that ends the VM (HLT, triple fault, internal error, failed entry, ...).
    Fatal,
}

impl Exit {
    const ALL: [Exit; 7] = [
        Exit::IoIn,
        Exit::IoOut,
        Exit::MmioRead,
        Exit::MmioWrite,
        Exit::Intr,
        Exit::SystemEvent,
        Exit::Fatal,
    ];

    fn label(self) -> &'static str {
        match self {
            Exit::IoIn => "io_in",
            Exit::IoOut => "io_out",
            Exit::MmioRead => "mmio_read",
            Exit::MmioWrite => "mmio_write",
            Exit::Intr => "intr",
            Exit::SystemEvent => "system_event",
            Exit::Fatal => "fatal",
        }
    }
}

/// One vCPU's exits, by [`Exit`].
#[derive(Debug, Default)]
pub struct VcpuExits([AtomicU64; Exit::ALL.len()]);

impl VcpuExits {
    /// Counts one exit.
    pub fn count(&self, e: Exit) {
        self.0[e as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Exits of one reason so far.
    pub fn get(&self, e: Exit) -> u64 {
        self.0[e as usize].load(Ordering::Relaxed)
    }
}

/// A device as exported: its name (`net0`, `blk0`), its type and its counters.
pub struct Device {
    /// `net0`, `blk1`, ...
    pub name: String,
    /// `virtio-net` or `virtio-blk`.
    pub kind: &'static str,
    /// The device's own counters.
    pub counters: Arc<Counters>,
}

/// The VM as a metrics [`Source`].
pub struct Metrics {
    /// One per vCPU, by id.
    pub vcpus: Arc<Vec<VcpuExits>>,
    /// Every virtio device.
    pub devices: Vec<Device>,
}

type Field = fn(&Counters) -> &AtomicU64;

impl Source for Metrics {
    fn collect(&self, out: &mut Out<'_>) -> fmt::Result {
        let exits: Vec<(Labels, u64)> = self
            .vcpus
            .iter()
            .enumerate()
            .flat_map(|(id, v)| {
                Exit::ALL.iter().map(move |&e| {
                    let l = vec![("vcpu", id.to_string()), ("reason", e.label().to_string())];
                    (l, v.get(e))
                })
            })
            .collect();
        out.counter(
            "vmm_vcpu_exits",
            "vCPU exits (KVM_RUN returns), by reason",
            &exits,
        )?;
        let rows: [(&str, &str, Field); 12] = [
            (
                "vmm_device_completed",
                "Requests (virtio-blk) or frames (virtio-net) completed",
                |c| &c.completed,
            ),
            (
                "vmm_device_bad_chains",
                "Malformed descriptor chains from the guest (answered with an error, dropped)",
                |c| &c.bad_chains,
            ),
            (
                "vmm_device_io_errors",
                "Back-end I/O errors reported to the guest",
                |c| &c.io_errors,
            ),
            (
                "vmm_device_dropped",
                "Frames dropped (too large for the guest's buffers, no buffers)",
                |c| &c.dropped,
            ),
            (
                "vmm_device_refused_mmio",
                "virtio-mmio register writes refused (out of the status state machine's order)",
                |c| &c.refused_mmio,
            ),
            (
                "vmm_net_rx_packets",
                "virtio-net: frames delivered to the guest (0 for other devices)",
                |c| &c.rx_packets,
            ),
            (
                "vmm_net_rx_bytes",
                "virtio-net: bytes delivered to the guest, without the virtio-net header",
                |c| &c.rx_bytes,
            ),
            (
                "vmm_net_tx_packets",
                "virtio-net: frames the guest sent that went out (0 for other devices)",
                |c| &c.tx_packets,
            ),
            (
                "vmm_net_tx_bytes",
                "virtio-net: bytes the guest sent, without the virtio-net header",
                |c| &c.tx_bytes,
            ),
            (
                "vmm_net_announce_frames",
                "virtio-net: RARP announces sent from the host side after a move",
                |c| &c.announce_frames,
            ),
            (
                "vmm_blk_reads",
                "virtio-blk: read requests completed (0 for other devices)",
                |c| &c.reads,
            ),
            (
                "vmm_blk_writes",
                "virtio-blk: write requests completed (0 for other devices)",
                |c| &c.writes,
            ),
        ];
        for (name, help, f) in rows {
            let samples: Vec<(Labels, u64)> = self
                .devices
                .iter()
                .map(|d| {
                    let l = vec![("device", d.name.clone()), ("type", d.kind.to_string())];
                    (l, Counters::get(f(&d.counters)))
                })
                .collect();
            out.counter(name, help, &samples)?;
        }
        Ok(())
    }
}
