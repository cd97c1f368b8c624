//! The saved state of a VM: what `PUT /snapshot` writes next to guest memory and what
//! a live migration sends after the last pages, and the file format both use.
//!
//! A state file is a fixed header, then a JSON body (serde):
//!
//! | bytes | what |
//! |---|---|
//! | 16 | magic `VMMSHIM-STATE\0\0\0` |
//! | 4 | format version, little endian ([`VERSION`]) |
//! | 8 | body length, little endian (at most [`MAX_BODY`]) |
//! | 4 | CRC-32 of the body, little endian |
//! | n | the body: a [`VmState`] as JSON |
//!
//! [`decode`] checks all of it before serde sees a byte: the magic, the version (a file
//! from another version is refused, naming both), the length against what is there
//! (a truncated or over-long file is refused) and the checksum (a corrupt one is
//! refused); then the JSON must parse into a [`VmState`]. [`VmState::check_shape`]
//! then refuses a state whose machine differs from the one being built (memory size,
//! vCPU count, the devices in order). Nothing here panics on what it reads.
//!
//! The KVM structures are kept as the kernel hands them out (kvm-bindings' serde
//! support: each is its bytes). The virtio transport and queue state and the UART's
//! are mirrored in plain structs here, so the format does not change when a crate's
//! internals do.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};

/// Words in the XSAVE area KVM_GET_XSAVE hands out.
pub const XSAVE_WORDS: usize = 1024;
use serde::{Deserialize, Serialize};

/// The state file's magic bytes.
pub const MAGIC: &[u8; 16] = b"VMMSHIM-STATE\0\0\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of header before the body.
pub const HEADER: usize = 16 + 4 + 8 + 4;
/// Largest body taken (32 vCPUs of XSAVE and LAPIC as JSON fit well below it).
pub const MAX_BODY: u64 = 16 << 20;

/// One vCPU's state, as KVM reports it.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area (the x87 FPU, SSE and AVX state): `kvm_xsave`'s 1024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Every MSR of KVM's index list that could be read: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
}

/// A virtqueue as the transport keeps it (virtio-queue's `QueueState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnap {
    /// Largest size the device offers.
    pub max_size: u16,
    /// The driver's chosen size.
    pub size: u16,
    /// Whether the driver made it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available entry the device will take.
    pub next_avail: u16,
    /// Next used entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx: bool,
}

/// One virtio-mmio device: the transport's registers, its queues, its config space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnap {
    /// Virtio device ID (1 net, 2 block).
    pub device_type: u32,
    /// Features the driver acked.
    pub acked: u64,
    /// The device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Whether the device was activated (DRIVER_OK with valid queues).
    pub active: bool,
    /// InterruptStatus.
    pub irq_status: u32,
    /// The queues, in order.
    pub queues: Vec<QueueSnap>,
    /// The config space as the guest read it (a NIC's MAC, a disk's capacity...).
    pub config: Vec<u8>,
}

/// The 8250 UART's registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnap {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Bytes received and not read by the guest yet.
    pub in_buffer: Vec<u8>,
}

/// The whole machine apart from guest memory.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// CRC-32 of guest memory (the memory file's, for a snapshot; unused, 0, in a
    /// migration, whose pages come in the stream).
    pub mem_crc32: u32,
    /// Each vCPU's state, by index.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel PIC master, PIC slave and IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock.
    pub clock: kvm_clock_data,
    /// The virtio-mmio devices in window order (disks, then NICs).
    pub devices: Vec<DeviceSnap>,
    /// The UART.
    pub serial: SerialSnap,
}

/// Why a state file or stream was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Not a state file.
    #[error("not a vmm-shim state file (bad magic)")]
    Magic,
    /// Shorter than its header, or than the length it gives.
    #[error("truncated: {have} bytes, {want} expected")]
    Truncated {
        /// Bytes there.
        have: u64,
        /// Bytes the header promises.
        want: u64,
    },
    /// Bytes after the body.
    #[error("{extra} bytes after the end of the state")]
    Trailing {
        /// How many.
        extra: u64,
    },
    /// Another format version.
    #[error("state format version {found}; this vmm-shim reads version {VERSION}")]
    Version {
        /// The file's.
        found: u32,
    },
    /// A body over [`MAX_BODY`].
    #[error("state body of {0} bytes is over the limit of {MAX_BODY}")]
    TooLarge(u64),
    /// The checksum does not match.
    #[error("checksum mismatch: the state is corrupt")]
    Checksum,
    /// The body is not a state.
    #[error("malformed state: {0}")]
    Malformed(String),
    /// The state is of another machine.
    #[error("the state is of another machine: {0}")]
    Shape(String),
}

/// Writes `state` in the file format of the module doc.
pub fn encode(state: &VmState) -> Vec<u8> {
    // Serializing plain structs, byte arrays and integers to JSON cannot fail.
    let body = serde_json::to_vec(state).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The body length a header gives, after its magic, version and size are checked.
pub fn header_len(h: &[u8]) -> Result<u64, StateError> {
    if h.len() < HEADER {
        return Err(StateError::Truncated {
            have: h.len() as u64,
            want: HEADER as u64,
        });
    }
    if &h[..16] != MAGIC {
        return Err(StateError::Magic);
    }
    let word = |r: std::ops::Range<usize>| h.get(r).unwrap_or_default();
    let version = u32::from_le_bytes(word(16..20).try_into().unwrap_or_default());
    if version != VERSION {
        return Err(StateError::Version { found: version });
    }
    let len = u64::from_le_bytes(word(20..28).try_into().unwrap_or_default());
    if len > MAX_BODY {
        return Err(StateError::TooLarge(len));
    }
    Ok(len)
}

/// Reads a state file's bytes (see the module doc for what is checked).
pub fn decode(bytes: &[u8]) -> Result<VmState, StateError> {
    let len = header_len(bytes)?;
    let have = (bytes.len() - HEADER) as u64;
    if have < len {
        return Err(StateError::Truncated {
            have: bytes.len() as u64,
            want: HEADER as u64 + len,
        });
    }
    if have > len {
        return Err(StateError::Trailing { extra: have - len });
    }
    let crc = u32::from_le_bytes(bytes[28..32].try_into().unwrap_or_default());
    let body = &bytes[HEADER..];
    if crc32fast::hash(body) != crc {
        return Err(StateError::Checksum);
    }
    let state: VmState =
        serde_json::from_slice(body).map_err(|e| StateError::Malformed(e.to_string()))?;
    state.check_inner()?;
    Ok(state)
}

impl VmState {
    /// What must hold within a state whatever machine it is restored on.
    fn check_inner(&self) -> Result<(), StateError> {
        let bad = |m: String| Err(StateError::Malformed(m));
        if self.irqchips.len() != 3 {
            return bad(format!("{} irqchips, 3 expected", self.irqchips.len()));
        }
        for (i, c) in self.irqchips.iter().enumerate() {
            if c.chip_id != i as u32 {
                return bad(format!("irqchip {i} has id {}", c.chip_id));
            }
        }
        if let Some(i) = self.vcpus.iter().position(|v| v.xsave.len() != XSAVE_WORDS) {
            return bad(format!("vCPU {i}: an XSAVE area of the wrong size"));
        }
        if self.serial.in_buffer.len() > 64 {
            return bad("serial FIFO over 64 bytes".into());
        }
        for (i, d) in self.devices.iter().enumerate() {
            if d.queues.iter().any(|q| q.size > q.max_size) {
                return bad(format!("device {i}: a queue larger than its maximum"));
            }
        }
        Ok(())
    }

    /// Refuses a state whose machine is not `mem_bytes` of memory, `cpus` vCPUs and
    /// the devices of `device_types` in this order.
    pub fn check_shape(
        &self,
        mem_bytes: u64,
        cpus: u8,
        device_types: &[u32],
    ) -> Result<(), StateError> {
        let shape = |m: String| Err(StateError::Shape(m));
        if self.mem_bytes != mem_bytes {
            return shape(format!(
                "its memory is {} MiB, this VM's {} MiB (--mem)",
                self.mem_bytes >> 20,
                mem_bytes >> 20
            ));
        }
        if self.vcpus.len() != usize::from(cpus) {
            return shape(format!(
                "it has {} vCPUs, this VM {} (--cpus)",
                self.vcpus.len(),
                cpus
            ));
        }
        let theirs: Vec<u32> = self.devices.iter().map(|d| d.device_type).collect();
        if theirs != device_types {
            return shape(format!(
                "its devices are [{}], this VM's [{}] (--disk, then --net)",
                kinds(&theirs),
                kinds(device_types)
            ));
        }
        Ok(())
    }
}

fn kinds(types: &[u32]) -> String {
    types
        .iter()
        .map(|t| match t {
            1 => "net".to_string(),
            2 => "disk".to_string(),
            t => format!("type {t}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut irqchips = vec![kvm_irqchip::default(); 3];
        for (i, c) in irqchips.iter_mut().enumerate() {
            c.chip_id = i as u32;
        }
        let regs = kvm_regs {
            rip: 0x100_0000,
            ..Default::default()
        };
        VmState {
            mem_bytes: 64 << 20,
            mem_crc32: 7,
            vcpus: vec![VcpuState {
                regs,
                sregs: Default::default(),
                xsave: vec![0; XSAVE_WORDS],
                xcrs: Default::default(),
                msrs: vec![(0x10, 12345)],
                lapic: Default::default(),
                events: Default::default(),
                mp_state: Default::default(),
                debugregs: Default::default(),
            }],
            irqchips,
            pit: Default::default(),
            clock: Default::default(),
            devices: vec![DeviceSnap {
                device_type: 2,
                acked: 1 << 32,
                status: 15,
                device_features_sel: 0,
                driver_features_sel: 0,
                queue_sel: 0,
                config_generation: 0,
                active: true,
                irq_status: 1,
                queues: vec![QueueSnap {
                    max_size: 256,
                    size: 8,
                    ready: true,
                    desc_table: 0x20_0000,
                    avail_ring: 0x20_1000,
                    used_ring: 0x20_2000,
                    next_avail: 3,
                    next_used: 3,
                    event_idx: false,
                }],
                config: vec![0; 8],
            }],
            serial: SerialSnap::default(),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let back = decode(&encode(&s)).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x100_0000);
        assert_eq!(back.vcpus[0].msrs, vec![(0x10, 12345)]);
        assert_eq!(back.devices, s.devices);
        assert!(back.check_shape(64 << 20, 1, &[2]).is_ok());
    }

    #[test]
    fn another_version_shape_or_magic_is_refused() {
        let mut f = encode(&sample());
        f[16] = 2;
        assert_eq!(decode(&f).err(), Some(StateError::Version { found: 2 }));
        f[0] = b'X';
        assert_eq!(decode(&f).err(), Some(StateError::Magic));
        let s = sample();
        let e = s.check_shape(128 << 20, 1, &[2]).unwrap_err().to_string();
        assert!(e.contains("64 MiB") && e.contains("128 MiB"), "{e}");
        assert!(s.check_shape(64 << 20, 2, &[2]).is_err());
        let e = s.check_shape(64 << 20, 1, &[2, 1]).unwrap_err().to_string();
        assert!(e.contains("[disk]") && e.contains("[disk, net]"), "{e}");
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let f = encode(&sample());
        for n in 0..f.len() {
            assert!(decode(&f[..n]).is_err(), "truncated to {n}");
        }
        let mut longer = f.clone();
        longer.push(b' ');
        assert!(matches!(
            decode(&longer),
            Err(StateError::Trailing { extra: 1 })
        ));
        // Every single bit flip anywhere (header or body) is caught.
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                assert!(decode(&g).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn random_bodies_with_a_good_checksum_never_panic() {
        // A body that passes the checksum but is not a state: random bytes, random
        // JSON-ish text, and a real state with its values swapped about.
        let mut rng = crate::virtio::testutil::Rng(0x5eed_1234);
        let real = serde_json::to_vec(&sample()).unwrap();
        let with_body = |body: &[u8]| {
            let mut out = Vec::new();
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&VERSION.to_le_bytes());
            out.extend_from_slice(&(body.len() as u64).to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
            out.extend_from_slice(body);
            out
        };
        for round in 0..2000 {
            let body: Vec<u8> = match round % 3 {
                0 => (0..rng.next() % 300).map(|_| rng.next() as u8).collect(),
                1 => {
                    let alphabet = b"{}[]\":,0123456789-e.truefalsnul ";
                    (0..rng.next() % 300)
                        .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                        .collect()
                }
                _ => {
                    let mut b = real.clone();
                    for _ in 0..4 {
                        let i = (rng.next() % b.len() as u64) as usize;
                        b[i] = b"0123456789[]{},\"-"[(rng.next() % 17) as usize];
                    }
                    b
                }
            };
            let _ = decode(&with_body(&body));
        }
        // Sizes are checked: a huge length in the header is refused before reading.
        let mut f = with_body(b"{}");
        f[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode(&f).err(), Some(StateError::TooLarge(u64::MAX)));
        // Three irqchips are required.
        let mut s = sample();
        s.irqchips.pop();
        assert!(matches!(decode(&encode(&s)), Err(StateError::Malformed(_))));
    }
}
