//! Live migration over TCP: `PUT /migrate {"to": "tcp:HOST:PORT"}` on the source,
//! `vmm-shim --incoming tcp:ADDR:PORT` (same `--mem`, `--cpus`, disks and NICs in the
//! same order) on the destination.
//!
//! The source ([`send`]): connects and says hello (magic, version, memory size, vCPU
//! count, device types), which the destination answers (refusing another shape).
//! Then pre-copy: guest RAM is registered again with KVM_MEM_LOG_DIRTY_PAGES, every
//! page is sent, and while the vCPUs run, rounds send the pages KVM_GET_DIRTY_LOG
//! reports until the dirty set would go in `max_downtime` at the rate the last
//! round ran (or [`MAX_ROUNDS`] are done); where the dirty set does not shrink
//! enough from round to round, the vCPUs are slowed down meanwhile (auto-converge,
//! see [`converge`]; the answer's `throttle_pct` is how much, 0 for not at all;
//! off with `"auto_converge": false`).
//! Then the VM is paused, the disks drained
//! and flushed, and the last dirty pages go. Devices write guest memory from
//! vmm-shim's own threads (a disk's reads, a NIC's frames, used rings), which KVM's
//! log does not see: the source keeps a CRC-32 of each page as it sent it and, once
//! paused, sends every page whose CRC changed too (a pass over guest memory that
//! counts in the downtime; a VM without virtio devices skips it). Last comes the device and vCPU
//! state (a state file, see [`super::state`]), and the hand-over below; the source
//! then exits 0. Where dirty logging cannot be turned on, the source
//! pauses first and copies everything (stop-and-copy); the answer's `mode` says so,
//! and its `dirty_logged_pages` and `device_written_pages` count the pages KVM's log
//! and the CRC check found.
//!
//! The hand-over, so that the VM never runs on both sides: once the state is in,
//! the destination restores the devices, the interrupt controllers and every vCPU
//! (everything but running them) and answers *ready*, or why it cannot (the source
//! shows that reason). Only then does the source send `GO` (a 0 byte); from that
//! write on it is committed and never resumes the VM itself. The destination starts
//! its vCPUs only once it has read `GO`: if the source dies, is cut off or does not
//! send it within the I/O timeout (30 s), the destination exits non-zero without
//! having run the guest. After `GO` the destination announces the NICs (see
//! `super::announce`), starts the vCPUs and answers *running*; a source that then
//! gets no answer (the destination died, or the answer was lost) cannot tell whether
//! the VM runs there, so it leaves it paused and says so: an operator resumes it
//! (`vmm-shim ctl resume`) only after checking the destination. Any failure before
//! `GO` (a refused hello, a connection that breaks, a destination that dies or fails
//! the state) resumes the VM on the source and says why; where the destination
//! failed, its own reason is in the message.
//!
//! The stream (little endian), after the hello and its answer:
//! `1, n: u32 (1..=256), n × (page: u64, kind: u8 [0 data + 4096 bytes, 1 zero]),
//! crc32: u32` is a batch of pages (the CRC over everything after the tag); `2,
//! len: u64, state file` ends it. An answer is `0` (fine) or `1, len: u16, message`:
//! the destination answers the hello, then *ready* after the state, then *running*
//! after the source's `GO` byte.
//! The destination ([`receive`]) trusts none of it: the magic and version, the
//! shape, every count, page number, kind and length, each batch's CRC and the state
//! file's own checks; anything else fails the incoming VM (vmm-shim exits non-zero,
//! the source is told why).

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::snapshot::Machine;
use super::state::{self, VmState};
use super::VmmError;
use crate::api::Migration;
use converge::{Converge, Throttle};

pub(super) mod converge;

/// The hello's magic bytes.
const MAGIC: &[u8; 16] = b"VMMSHIM-MIGRATE\0";
/// The stream's version.
const VERSION: u32 = 2;
/// Guest page size.
const PAGE: usize = 4096;
/// Bytes in a MiB (of `max_bandwidth_mib`).
const MIB: f64 = (1 << 20) as f64;
/// Most pages in one batch.
const BATCH: usize = 256;
/// Most pre-copy rounds after the first full copy.
pub const MAX_ROUNDS: u32 = 30;
/// How long either side waits for the other's next bytes.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const TAG_PAGES: u8 = 1;
const TAG_STATE: u8 = 2;
/// What the source sends once the destination is ready: the VM is the destination's.
const GO: u8 = 0;

/// The source's side of the stream: the connection, what was sent, and the CRC of
/// each page as it went.
struct Out<'a> {
    w: BufWriter<TcpStream>,
    mem: &'a GuestMemoryMmap,
    bytes: u64,
    /// The most bytes a second [`Out::pages`] sends (none: as fast as it goes).
    limit: Option<f64>,
    /// Each page's CRC as sent (empty when the VM has no virtio device, whose
    /// writes it exists to find).
    sent_crc: Vec<u32>,
    batch: Vec<u8>,
    in_batch: u32,
}

impl Out<'_> {
    /// Queues page `pfn` in the current batch (sending the batch when full).
    fn page(&mut self, pfn: usize) -> std::io::Result<()> {
        let mut buf = [0u8; PAGE];
        self.mem
            .read_slice(&mut buf, GuestAddress((pfn * PAGE) as u64))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Some(c) = self.sent_crc.get_mut(pfn) {
            *c = crc32fast::hash(&buf);
        }
        self.batch.extend_from_slice(&(pfn as u64).to_le_bytes());
        if buf.iter().all(|&b| b == 0) {
            self.batch.push(1);
        } else {
            self.batch.push(0);
            self.batch.extend_from_slice(&buf);
        }
        self.in_batch += 1;
        if self.in_batch as usize == BATCH {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> std::io::Result<()> {
        if self.in_batch == 0 {
            return Ok(());
        }
        let mut body = self.in_batch.to_le_bytes().to_vec();
        body.extend_from_slice(&self.batch);
        let crc = crc32fast::hash(&body);
        self.w.write_all(&[TAG_PAGES])?;
        self.w.write_all(&body)?;
        self.w.write_all(&crc.to_le_bytes())?;
        self.bytes += 1 + body.len() as u64 + 4;
        self.batch.clear();
        self.in_batch = 0;
        Ok(())
    }

    /// Sends these pages (at most [`Out::limit`] bytes a second, counted from the
    /// start of the call); returns how long that took.
    fn pages(&mut self, pfns: impl Iterator<Item = usize>) -> std::io::Result<Duration> {
        let t = Instant::now();
        let start = self.bytes;
        for p in pfns {
            let batches = self.bytes;
            self.page(p)?;
            if let (Some(limit), true) = (self.limit, self.bytes != batches) {
                pace(t, self.bytes - start, limit);
            }
        }
        self.flush_batch()?;
        self.w.flush()?;
        Ok(t.elapsed())
    }
}

/// Sleeps until `bytes` sent since `t` are within `limit` bytes a second.
fn pace(t: Instant, bytes: u64, limit: f64) {
    let due = Duration::from_secs_f64(bytes as f64 / limit);
    if let Some(wait) = due.checked_sub(t.elapsed()) {
        std::thread::sleep(wait);
    }
}

/// What the destination answered.
enum Reply {
    Ok,
    /// It said no, and why.
    Refused(String),
    /// No (whole) answer: the connection broke or timed out, or it was garbage.
    Silent(String),
}

/// Reads an answer: `0`, or `1` and a message.
fn read_reply(r: &mut impl Read) -> Reply {
    let mut b = [0u8; 1];
    if let Err(e) = r.read_exact(&mut b) {
        return Reply::Silent(format!("the destination did not answer: {e}"));
    }
    match b[0] {
        0 => Reply::Ok,
        1 => {
            let mut l = [0u8; 2];
            let mut m = Vec::new();
            let read = r.read_exact(&mut l).and_then(|()| {
                m.resize(usize::from(u16::from_le_bytes(l)), 0);
                r.read_exact(&mut m)
            });
            match read {
                Ok(()) => Reply::Refused(format!(
                    "the destination refused: {}",
                    String::from_utf8_lossy(&m)
                )),
                Err(e) => Reply::Silent(format!("the destination's answer was cut: {e}")),
            }
        }
        x => Reply::Silent(format!("the destination answered {x:#x}")),
    }
}

/// Reads an answer; anything but `0` is an error saying why.
fn read_answer(r: &mut impl Read) -> Result<(), String> {
    match read_reply(r) {
        Reply::Ok => Ok(()),
        Reply::Refused(m) | Reply::Silent(m) => Err(m),
    }
}

/// Why a migration failed, and whether the source may resume the VM.
enum Failure {
    /// Before `GO`: the VM did not run at the destination; it runs on here.
    Before(String),
    /// After `GO`: the VM may run at the destination; it stays paused here.
    Committed(String),
}

impl From<String> for Failure {
    fn from(m: String) -> Self {
        Failure::Before(m)
    }
}

/// Writes an answer (an error message is cut to 1000 bytes).
fn write_answer(w: &mut impl Write, r: Result<(), &str>) -> std::io::Result<()> {
    match r {
        Ok(()) => w.write_all(&[0])?,
        Err(m) => {
            let m = &m.as_bytes()[..m.len().min(1000)];
            w.write_all(&[1])?;
            w.write_all(&(m.len() as u16).to_le_bytes())?;
            w.write_all(m)?;
        }
    }
    w.flush()
}

/// The pages KVM logged as dirty since the last call (which cleared them).
fn dirty_pages(m: &Machine) -> Result<Vec<usize>, String> {
    let bitmap =
        m.vm.get_dirty_log(0, m.mem_bytes as usize)
            .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
    let mut out = Vec::new();
    for (w, &bits) in bitmap.iter().enumerate() {
        let mut b = bits;
        while b != 0 {
            let i = b.trailing_zeros() as usize;
            out.push(w * 64 + i);
            b &= b - 1;
        }
    }
    Ok(out)
}

/// `PUT /migrate`: see the module doc. On success the VM stays paused here (the API
/// then ends this vmm-shim); on failure it runs on.
pub(super) fn send(m: &Machine, how: &Migration) -> Result<Value, String> {
    let _one = m.busy.lock().unwrap_or_else(|e| e.into_inner());
    let was_paused = m.shared.control.pausing();
    let mut logging = false;
    let to = how.to.as_str();
    let r = migrate(m, how, &mut logging);
    if logging {
        let _ = super::set_memory_flags(&m.vm, &m.mem, 0);
    }
    match r {
        Ok(v) => Ok(v),
        Err(Failure::Before(e)) => {
            if !was_paused {
                m.shared.control.resume();
            }
            tracing::warn!(to, error = %e, "migration failed; the VM runs on here");
            Err(format!(
                "migration to {to} failed: {e}; the VM runs on here"
            ))
        }
        Err(Failure::Committed(e)) => {
            tracing::error!(to, error = %e, "migration handed over but not confirmed; the VM stays paused here");
            Err(format!(
                "migration to {to} handed the VM over but {e}; it may run there, so it stays paused here (resume it only once it surely does not)"
            ))
        }
    }
}

fn migrate(m: &Machine, how: &Migration, logging: &mut bool) -> Result<Value, Failure> {
    let t0 = Instant::now();
    let to = how.to.as_str();
    let max_downtime = Duration::from_millis(how.max_downtime_ms);
    let addr = crate::config::parse_tcp(to)?;
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    let io = |e: std::io::Error| format!("sending: {e}");
    conn.set_nodelay(true).map_err(io)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut rd = conn.try_clone().map_err(io)?;
    let pages = (m.mem_bytes as usize) / PAGE;
    // Only virtio devices write guest memory behind KVM's back (the UART does not).
    let has_devices = !m.shared.bus.devices().is_empty();
    let mut out = Out {
        w: BufWriter::with_capacity(1 << 20, conn),
        mem: &m.mem,
        bytes: 0,
        limit: (how.max_bandwidth_mib > 0).then_some(how.max_bandwidth_mib as f64 * MIB),
        sent_crc: vec![0; if has_devices { pages } else { 0 }],
        batch: Vec::with_capacity(BATCH * (PAGE + 9)),
        in_batch: 0,
    };
    let types: Vec<u8> = m
        .shared
        .bus
        .devices()
        .iter()
        .map(|d| {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .save()
                .device_type as u8
        })
        .collect();
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&m.mem_bytes.to_le_bytes());
    hello.push(m.shared.exits.len() as u8);
    hello.push(types.len() as u8);
    hello.extend_from_slice(&types);
    out.w.write_all(&hello).map_err(io)?;
    out.w.flush().map_err(io)?;
    read_answer(&mut rd)?;

    // Pre-copy where KVM logs dirty pages; stop-and-copy otherwise.
    let mode = match super::set_memory_flags(&m.vm, &m.mem, KVM_MEM_LOG_DIRTY_PAGES) {
        Ok(()) => {
            *logging = true;
            dirty_pages(m).map(|_| "pre-copy".to_string())
        }
        Err(e) => Err(crate::error_chain(&e)),
    }
    .unwrap_or_else(|e| format!("stop-and-copy (dirty logging unavailable: {e})"));
    let precopy = mode == "pre-copy";
    let mut rounds = 1u32;
    let mut pending: Vec<usize> = Vec::new();
    // Pages KVM's log reported, and pages found only by their CRC (device writes).
    let (mut logged, mut by_crc) = (0usize, 0usize);
    // Auto-converge: lifted when this returns, whatever the outcome.
    let mut converge = Converge::default();
    let mut throttle = Throttle::new(m.shared.control.clone());
    // Whether pre-copy ended with the rest fitting `max_downtime` (not at the limit).
    let mut converged = false;
    if precopy {
        let took = out.pages(0..pages).map_err(io)?;
        let mut rate = out.bytes as f64 / took.as_secs_f64().max(1e-6);
        let mut sent = pages;
        loop {
            pending = dirty_pages(m)?;
            logged += pending.len();
            let eta = Duration::from_secs_f64(pending.len() as f64 * PAGE as f64 / rate);
            if eta <= max_downtime || rounds > MAX_ROUNDS {
                converged = eta <= max_downtime;
                break;
            }
            if how.auto_converge {
                throttle.set(converge.after_round(sent, pending.len()));
            }
            sent = pending.len();
            let before = out.bytes;
            let took = out.pages(pending.drain(..)).map_err(io)?;
            rate = ((out.bytes - before) as f64 / took.as_secs_f64().max(1e-6)).max(1.0);
            rounds += 1;
        }
    }

    // Stop: pause, drain the disks, send what is left (at full speed: the VM waits
    // for it) and the state.
    m.shared.control.pause()?;
    out.limit = None;
    let paused = Instant::now();
    m.drain()?;
    let mut last = vec![false; pages];
    if precopy {
        let last_log = dirty_pages(m)?;
        logged += last_log.len();
        for p in pending.into_iter().chain(last_log) {
            if let Some(x) = last.get_mut(p) {
                *x = true;
            }
        }
        // Pages the devices wrote (KVM's log does not see vmm-shim's own writes).
        let mut buf = [0u8; PAGE];
        for (p, x) in last.iter_mut().enumerate() {
            if !*x && has_devices {
                m.mem
                    .read_slice(&mut buf, GuestAddress((p * PAGE) as u64))
                    .map_err(|e| e.to_string())?;
                *x = crc32fast::hash(&buf) != out.sent_crc[p];
                by_crc += usize::from(*x);
            }
        }
    } else {
        last.fill(true);
    }
    let todo: Vec<usize> = (0..pages).filter(|&p| last[p]).collect();
    out.pages(todo.into_iter()).map_err(io)?;
    rounds += 1;
    let st = state::encode(&m.capture(0)?);
    out.w.write_all(&[TAG_STATE]).map_err(io)?;
    out.w
        .write_all(&(st.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.w.write_all(&st).map_err(io)?;
    out.w.flush().map_err(io)?;
    out.bytes += 9 + st.len() as u64;
    // The destination is ready (or says why not); then the hand-over.
    read_answer(&mut rd)?;
    out.w
        .write_all(&[GO])
        .and_then(|()| out.w.flush())
        .map_err(io)?;
    match read_reply(&mut rd) {
        Reply::Ok => {}
        Reply::Refused(e) | Reply::Silent(e) => return Err(Failure::Committed(e)),
    }
    let downtime = paused.elapsed();
    let throttle_pct = converge.pct();
    tracing::info!(to, rounds, bytes = out.bytes, downtime_ms = downtime.as_millis() as u64, throttle_pct, %mode, "migrated");
    Ok(json!({
        "downtime_ms": downtime.as_secs_f64() * 1e3,
        "total_ms": t0.elapsed().as_secs_f64() * 1e3,
        "rounds": rounds,
        "bytes": out.bytes,
        "mode": mode,
        "dirty_logged_pages": logged,
        "device_written_pages": by_crc,
        "throttle_pct": throttle_pct,
        "converged": converged,
    }))
}

/// The destination's connection once the state is in: [`Incoming::commit`] says
/// *ready* and waits for `GO`, [`accepted`] says *running*. Dropped before either,
/// or after [`Incoming::fail`], it has told the source why the VM will not run here.
pub(super) struct Incoming {
    conn: TcpStream,
    /// Nothing more is to be said (the last answer went, or the source is gone).
    done: bool,
}

impl Incoming {
    /// Tells the source why the VM cannot run here (it then resumes the VM).
    pub(super) fn fail(&mut self, why: &str) {
        if !self.done {
            self.done = true;
            let _ = write_answer(&mut self.conn, Err(why));
        }
    }

    /// Tells the source that the VM is ready to run here and waits (at most the I/O
    /// timeout) for its `GO`; without it the VM must not run here.
    pub(super) fn commit(&mut self) -> Result<(), VmmError> {
        self.done = true;
        let err = |m: String| VmmError::Restore(format!("incoming migration: {m}"));
        write_answer(&mut self.conn, Ok(()))
            .map_err(|e| err(format!("telling the source that the VM is ready: {e}")))?;
        let mut b = [0u8; 1];
        match self.conn.read_exact(&mut b) {
            Ok(()) if b[0] == GO => Ok(()),
            Ok(()) => Err(err(format!("the source sent {:#x}, not GO", b[0]))),
            Err(e) => Err(err(format!(
                "the source did not hand the VM over ({e}); it never ran here"
            ))),
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.fail("the destination failed before it ran the VM");
    }
}

/// Passes `r` on; an error is first told to the source of `inc`, if any (see
/// [`Incoming::fail`]).
pub(super) fn told<T>(inc: &mut Option<Incoming>, r: Result<T, VmmError>) -> Result<T, VmmError> {
    if let (Err(e), Some(i)) = (&r, inc.as_mut()) {
        i.fail(&crate::error_chain(e));
    }
    r
}

/// Tells the source that the VM runs here.
pub(super) fn accepted(mut c: Incoming) {
    c.done = true;
    if let Err(e) = write_answer(&mut c.conn, Ok(())) {
        tracing::warn!(error = %e, "could not tell the migration source that the VM runs here");
    }
}

/// `--incoming`: takes one migration from `l` into `mem` (see the module doc) for a
/// VM of `cpus` vCPUs and these device types; returns the state to go on from and
/// the connection to answer once the vCPUs run. A failure is answered to the source
/// and fails the VM.
pub(super) fn receive(
    l: &TcpListener,
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    cpus: u8,
    types: &[u32],
) -> Result<(VmState, Incoming), VmmError> {
    let (conn, peer) = l.accept().map_err(|source| VmmError::Os {
        what: "accepting the incoming migration",
        source,
    })?;
    tracing::info!(%peer, "incoming migration");
    let fail = |m: String| VmmError::Restore(format!("incoming migration from {peer}: {m}"));
    let setup = conn
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| conn.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|_| conn.try_clone());
    let mut w = setup.map_err(|e| fail(e.to_string()))?;
    let mut r = BufReader::with_capacity(1 << 20, conn);
    match take(&mut r, &mut w, mem, mem_bytes, cpus, types) {
        Ok(s) => Ok((
            s,
            Incoming {
                conn: w,
                done: false,
            },
        )),
        Err(e) => {
            let _ = write_answer(&mut w, Err(&e));
            Err(fail(e))
        }
    }
}

/// Reads `n` bytes.
fn exact<const N: usize>(r: &mut impl Read) -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)
        .map_err(|e| format!("stream cut short: {e}"))?;
    Ok(b)
}

/// The destination's reading of the stream.
fn take(
    r: &mut impl Read,
    w: &mut impl Write,
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    cpus: u8,
    types: &[u32],
) -> Result<VmState, String> {
    if exact::<16>(r)? != *MAGIC {
        return Err("not a vmm-shim migration stream (bad magic)".into());
    }
    let v = u32::from_le_bytes(exact(r)?);
    if v != VERSION {
        return Err(format!(
            "migration stream version {v}; this vmm-shim takes version {VERSION}"
        ));
    }
    let their_mem = u64::from_le_bytes(exact(r)?);
    let [their_cpus, ndev] = exact::<2>(r)?;
    let mut their_types = vec![0u8; usize::from(ndev)];
    r.read_exact(&mut their_types)
        .map_err(|e| format!("stream cut short: {e}"))?;
    let mine: Vec<u8> = types.iter().map(|&t| t as u8).collect();
    if their_mem != mem_bytes || their_cpus != cpus || their_types != mine {
        return Err(format!(
            "the source's machine ({} MiB, {their_cpus} vCPUs, devices {their_types:?}) is not this one ({} MiB, {cpus} vCPUs, devices {mine:?})",
            their_mem >> 20,
            mem_bytes >> 20
        ));
    }
    write_answer(w, Ok(())).map_err(|e| e.to_string())?;
    let pages = mem_bytes / PAGE as u64;
    let mut buf = vec![0u8; PAGE];
    loop {
        match exact::<1>(r)?[0] {
            TAG_PAGES => {
                let nb = exact::<4>(r)?;
                let n = u32::from_le_bytes(nb);
                if n == 0 || n as usize > BATCH {
                    return Err(format!(
                        "a batch of {n} pages (1 to {BATCH} expected): the stream is corrupt"
                    ));
                }
                let mut crc = crc32fast::Hasher::new();
                crc.update(&nb);
                // Checked, then written: a batch is applied only once its CRC holds.
                let mut batch: Vec<(u64, bool, Vec<u8>)> = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let pb = exact::<8>(r)?;
                    let kind = exact::<1>(r)?;
                    crc.update(&pb);
                    crc.update(&kind);
                    let pfn = u64::from_le_bytes(pb);
                    if pfn >= pages {
                        return Err(format!(
                            "page {pfn} is past the guest's {pages} pages: the stream is corrupt"
                        ));
                    }
                    match kind[0] {
                        0 => {
                            r.read_exact(&mut buf)
                                .map_err(|e| format!("stream cut short: {e}"))?;
                            crc.update(&buf);
                            batch.push((pfn, false, buf.clone()));
                        }
                        1 => batch.push((pfn, true, Vec::new())),
                        k => return Err(format!("page kind {k}: the stream is corrupt")),
                    }
                }
                if u32::from_le_bytes(exact(r)?) != crc.finalize() {
                    return Err(
                        "a batch of pages failed its checksum: the stream is corrupt".into(),
                    );
                }
                for (pfn, zero, data) in batch {
                    let at = GuestAddress(pfn * PAGE as u64);
                    let res = if zero {
                        mem.write_slice(&[0u8; PAGE], at)
                    } else {
                        mem.write_slice(&data, at)
                    };
                    res.map_err(|e| e.to_string())?;
                }
            }
            TAG_STATE => {
                let len = u64::from_le_bytes(exact(r)?);
                if len > state::HEADER as u64 + state::MAX_BODY {
                    return Err(format!("a state of {len} bytes: the stream is corrupt"));
                }
                let mut st = vec![0u8; len as usize];
                r.read_exact(&mut st)
                    .map_err(|e| format!("stream cut short: {e}"))?;
                let s = state::decode(&st).map_err(|e| e.to_string())?;
                s.check_shape(mem_bytes, cpus, types)
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            t => return Err(format!("unknown record {t:#x}: the stream is corrupt")),
        }
    }
}
