//! A blocking NBD client: fixed newstyle handshake, `OPT_STRUCTURED_REPLY`, `OPT_GO`,
//! and pipelined transmission (several requests in flight per batch).
//!
//! Theory of operation: the virtio-blk device hands a batch of requests to
//! [`NbdClient::submit`]; they are all written to the socket (each with a unique cookie)
//! and then replies are read until every cookie is answered, in whatever order the server
//! answers. Replies may be simple or structured (`OFFSET_DATA`, `OFFSET_HOLE`, `ERROR`,
//! `ERROR_OFFSET`, `NONE`), and a read's data is assembled from its chunks. To rule out a
//! deadlock (both sides blocked writing large payloads), a batch never mixes requests
//! that carry data (writes) with requests whose replies carry data (reads): a batch is
//! all-writes-and-small, or all-reads-and-small. Every length the server sends is bounded
//! ([`MAX_PAYLOAD`]) and checked against the request it answers; a protocol violation
//! fails the connection ([`NbdError::Protocol`]), which the device reports to the guest as
//! I/O errors. A per-request NBD error (EIO, ENOSPC, EPERM...) fails only that request.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::config::NbdAddr;

/// Largest payload of one request or reply chunk (requests are split to fit).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// How long one read or write on the connection may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest number of requests in flight at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// Most chunks without read content (NONE, errors, unknown types) per request.
const MAX_OTHER_CHUNKS: u32 = 16;
/// Most replies accepted to one NBD_OPT_GO (a handful of NBD_REP_INFO, then the ACK).
const MAX_GO_REPLIES: u32 = 64;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server takes FLUSH.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server takes TRIM.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server takes WRITE_ZEROES.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// An NBD client error.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// could not connect to the NBD server
    #[error("could not connect to NBD server {addr}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// the connection failed
    #[error("NBD connection I/O failed")]
    Io(#[from] io::Error),
    /// the server broke the protocol
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// the server refused the export
    #[error("NBD server refused export {export:?}: {message}")]
    Refused {
        /// Export name.
        export: String,
        /// The server's reason.
        message: String,
    },
    /// the connection is already failed
    #[error("NBD connection is down after an earlier error")]
    Down,
}

/// One block request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload.
        data: Vec<u8>,
    },
    /// Flush.
    Flush,
    /// Discard a range.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write zeroes to a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Whether the server may punch a hole.
        may_trim: bool,
    },
}

impl Request {
    fn carries_data(&self) -> bool {
        matches!(self, Request::Write { .. })
    }
    fn returns_data(&self) -> bool {
        matches!(self, Request::Read { .. })
    }
}

/// The outcome of one request: read data, or unit; `Err(errno)` for a server error.
pub type Outcome = Result<Vec<u8>, u32>;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connected, negotiated NBD client.
pub struct NbdClient {
    stream: io::BufReader<Stream>,
    size: u64,
    flags: u16,
    structured: bool,
    next_cookie: u64,
    down: bool,
}

fn rd<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}
fn rd_u16(r: &mut impl Read) -> io::Result<u16> {
    Ok(u16::from_be_bytes(rd(r)?))
}
fn rd_u32(r: &mut impl Read) -> io::Result<u32> {
    Ok(u32::from_be_bytes(rd(r)?))
}
fn rd_u64(r: &mut impl Read) -> io::Result<u64> {
    Ok(u64::from_be_bytes(rd(r)?))
}
fn rd_vec(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}
fn proto(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

impl NbdClient {
    /// Connects and negotiates the export.
    pub fn connect(addr: &NbdAddr, export: &str) -> Result<Self, NbdError> {
        let stream = match addr {
            NbdAddr::Tcp(h, p) => {
                let s =
                    TcpStream::connect((h.as_str(), *p)).map_err(|source| NbdError::Connect {
                        addr: format!("{h}:{p}"),
                        source,
                    })?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            NbdAddr::Unix(p) => {
                Stream::Unix(UnixStream::connect(p).map_err(|source| NbdError::Connect {
                    addr: p.display().to_string(),
                    source,
                })?)
            }
        };
        let mut c = NbdClient {
            stream: io::BufReader::with_capacity(256 << 10, stream),
            size: 0,
            flags: 0,
            structured: false,
            next_cookie: 1,
            down: false,
        };
        c.set_timeout(Some(Duration::from_secs(30)))?;
        c.handshake(export)?;
        Ok(c)
    }

    fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        match self.stream.get_ref() {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn w(&mut self) -> &mut Stream {
        self.stream.get_mut()
    }

    fn handshake(&mut self, export: &str) -> Result<(), NbdError> {
        let r = &mut self.stream;
        if rd_u64(r)? != NBDMAGIC {
            return Err(proto("no NBDMAGIC: not an NBD server"));
        }
        if rd_u64(r)? != IHAVEOPT {
            return Err(proto("oldstyle server: only newstyle is supported"));
        }
        let sflags = rd_u16(r)?;
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("server is not fixed-newstyle"));
        }
        let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (sflags & FLAG_NO_ZEROES));
        self.w().write_all(&cflags.to_be_bytes())?;

        // Structured replies: optional; a refusal means simple replies.
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (ty, data) = self.read_option_reply(OPT_STRUCTURED_REPLY)?;
        self.structured = ty == REP_ACK;
        if ty != REP_ACK && ty & REP_ERR_BIT == 0 {
            return Err(proto(format!("unexpected reply {ty} to STRUCTURED_REPLY")));
        }
        let _ = data;

        let name = export.as_bytes();
        let mut payload = Vec::with_capacity(name.len() + 6);
        payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
        payload.extend_from_slice(name);
        payload.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &payload)?;
        let mut got_export = false;
        // A server may send several NBD_REP_INFO before the ACK, but not an endless
        // stream of them: that would keep the VMM in its handshake for ever.
        let mut replies = 0;
        loop {
            replies += 1;
            if replies > MAX_GO_REPLIES {
                return Err(proto(format!("more than {MAX_GO_REPLIES} replies to GO")));
            }
            let (ty, data) = self.read_option_reply(OPT_GO)?;
            match ty {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() >= 2 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                        let d: [u8; 10] = data
                            .get(2..12)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| proto("short NBD_INFO_EXPORT"))?;
                        self.size = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
                        self.flags = u16::from_be_bytes([d[8], d[9]]);
                        got_export = true;
                    }
                }
                t if t & REP_ERR_BIT != 0 => {
                    return Err(NbdError::Refused {
                        export: export.to_string(),
                        message: format!(
                            "error {:#x}: {}",
                            t,
                            String::from_utf8_lossy(&data)
                                .chars()
                                .take(200)
                                .collect::<String>()
                        ),
                    })
                }
                t => return Err(proto(format!("unexpected reply {t} to GO"))),
            }
        }
        if !got_export {
            return Err(proto("GO acknowledged without NBD_INFO_EXPORT"));
        }
        // A server that stops answering fails the connection (the guest sees I/O
        // errors) instead of wedging the vCPU that waits for it.
        self.set_timeout(Some(IO_TIMEOUT))?;
        Ok(())
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.w().write_all(&b)
    }

    fn read_option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let r = &mut self.stream;
        if rd_u64(r)? != REPLY_MAGIC_OPT {
            return Err(proto("bad option reply magic"));
        }
        if rd_u32(r)? != opt {
            return Err(proto("option reply for another option"));
        }
        let ty = rd_u32(r)?;
        let len = rd_u32(r)?;
        if len > 64 << 10 {
            return Err(proto(format!("option reply of {len} bytes")));
        }
        Ok((ty, rd_vec(r, len)?))
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Runs requests, pipelined; one outcome per request, in order.
    ///
    /// An `Err` return means the connection failed (all requests are lost and every
    /// later call fails with [`NbdError::Down`]).
    pub fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        if self.down {
            return Err(NbdError::Down);
        }
        let res = self.submit_inner(reqs);
        if res.is_err() {
            self.down = true;
        }
        res
    }

    fn submit_inner(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        let mut out: Vec<Outcome> = Vec::with_capacity(reqs.len());
        let mut i = 0;
        while i < reqs.len() {
            // One batch: up to MAX_IN_FLIGHT requests, never mixing writes with reads;
            // a FLUSH goes alone, since it only covers writes already answered.
            let (mut has_w, mut has_r) = (false, false);
            let mut j = i;
            while j < reqs.len() && j - i < MAX_IN_FLIGHT {
                let r = &reqs[j];
                if (r.carries_data() && has_r)
                    || (r.returns_data() && has_w)
                    || (j > i && (*r == Request::Flush || reqs[i] == Request::Flush))
                {
                    break;
                }
                has_w |= r.carries_data();
                has_r |= r.returns_data();
                j += 1;
            }
            out.extend(self.batch(&reqs[i..j])?);
            i = j;
        }
        Ok(out)
    }

    fn batch(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        let base = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(reqs.len() as u64);
        let mut buf = Vec::new();
        for (k, r) in reqs.iter().enumerate() {
            let (ty, flags, offset, len, data): (u16, u16, u64, u32, &[u8]) = match r {
                Request::Read { offset, len } => (CMD_READ, 0, *offset, *len, &[]),
                Request::Write { offset, data } => {
                    (CMD_WRITE, 0, *offset, data.len() as u32, data.as_slice())
                }
                Request::Flush => (CMD_FLUSH, 0, 0, 0, &[]),
                Request::Trim { offset, len } => (CMD_TRIM, 0, *offset, *len, &[]),
                Request::WriteZeroes {
                    offset,
                    len,
                    may_trim,
                } => (
                    CMD_WRITE_ZEROES,
                    if *may_trim { 0 } else { 2 }, // NBD_CMD_FLAG_NO_HOLE
                    *offset,
                    *len,
                    &[],
                ),
            };
            buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            buf.extend_from_slice(&flags.to_be_bytes());
            buf.extend_from_slice(&ty.to_be_bytes());
            buf.extend_from_slice(&(base.wrapping_add(k as u64)).to_be_bytes());
            buf.extend_from_slice(&offset.to_be_bytes());
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend_from_slice(data);
        }
        self.w().write_all(&buf)?;

        let mut out: Vec<Option<Outcome>> = vec![None; reqs.len()];
        // Read buffers for reads being assembled from structured chunks.
        let mut partial: Vec<Option<Vec<u8>>> = reqs
            .iter()
            .map(|r| match r {
                Request::Read { len, .. } => Some(vec![0u8; *len as usize]),
                _ => None,
            })
            .collect();
        let mut errs: Vec<Option<u32>> = vec![None; reqs.len()];
        // What a request's chunks have covered so far, and how many chunks without
        // content it got: a live server streaming chunks without end (overlapping
        // ones, empty ones, NONE or unknown ones, never DONE) must fail the
        // connection, not hold the vCPU for ever.
        let mut covered: Vec<u64> = vec![0; reqs.len()];
        let mut other_chunks: Vec<u32> = vec![0; reqs.len()];
        let mut pending = reqs.len();
        while pending > 0 {
            let r = &mut self.stream;
            let magic = rd_u32(r)?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let err = rd_u32(r)?;
                    let cookie = rd_u64(r)?;
                    let k = slot(cookie, base, reqs.len())?;
                    if out[k].is_some() {
                        return Err(proto("second reply to one request"));
                    }
                    let res = match (&reqs[k], err) {
                        (Request::Read { len, .. }, 0) => Ok(rd_vec(r, *len)?),
                        (_, 0) => Ok(Vec::new()),
                        (_, e) => Err(e),
                    };
                    out[k] = Some(res);
                    pending -= 1;
                }
                STRUCTURED_REPLY_MAGIC if self.structured => {
                    let flags = rd_u16(r)?;
                    let ty = rd_u16(r)?;
                    let cookie = rd_u64(r)?;
                    let len = rd_u32(r)?;
                    let k = slot(cookie, base, reqs.len())?;
                    if out[k].is_some() {
                        return Err(proto("chunk after the final reply"));
                    }
                    if !matches!(ty, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE) {
                        other_chunks[k] += 1;
                        if other_chunks[k] > MAX_OTHER_CHUNKS {
                            return Err(proto("too many chunks for one request"));
                        }
                    }
                    if len > MAX_PAYLOAD + 8 {
                        return Err(proto(format!("reply chunk of {len} bytes")));
                    }
                    match ty {
                        REPLY_TYPE_NONE if len == 0 => {}
                        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                            let Request::Read { offset, len: rlen } = reqs[k] else {
                                return Err(proto("data chunk for a non-read"));
                            };
                            if len < 8 || (ty == REPLY_TYPE_OFFSET_HOLE && len != 12) {
                                return Err(proto("short data chunk"));
                            }
                            let off = rd_u64(r)?;
                            let n = if ty == REPLY_TYPE_OFFSET_DATA {
                                len - 8
                            } else {
                                rd_u32(r)?
                            };
                            if n == 0 {
                                return Err(proto("empty data chunk"));
                            }
                            covered[k] += u64::from(n);
                            if covered[k] > u64::from(rlen) {
                                return Err(proto("chunks cover more than the request"));
                            }
                            // Every sum is checked: a lying server can send any offset
                            // and length, and must get a protocol error, not an overflow.
                            let b = off
                                .checked_sub(offset)
                                .and_then(|s| Some((s, s.checked_add(u64::from(n))?)))
                                .filter(|&(_, e)| e <= u64::from(rlen))
                                .and_then(|(s, e)| {
                                    let (s, e) =
                                        (usize::try_from(s).ok()?, usize::try_from(e).ok()?);
                                    partial[k].as_mut()?.get_mut(s..e)
                                })
                                .ok_or_else(|| proto("chunk outside the request"))?;
                            if ty == REPLY_TYPE_OFFSET_DATA {
                                r.read_exact(b)?;
                            } else {
                                b.fill(0);
                            }
                        }
                        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                            if len < 6 {
                                return Err(proto("short error chunk"));
                            }
                            let e = rd_u32(r)?;
                            let _msg = rd_vec(r, len - 4)?;
                            errs[k] = Some(if e == 0 { 5 } else { e });
                        }
                        t => {
                            // Unknown chunk types are skipped (their length is bounded).
                            if t & (1 << 15) != 0 {
                                errs[k] = Some(5);
                            }
                            rd_vec(r, len)?;
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        out[k] = Some(match errs[k] {
                            Some(e) => Err(e),
                            None => Ok(partial[k].take().unwrap_or_default()),
                        });
                        pending -= 1;
                    }
                }
                m => return Err(proto(format!("bad reply magic {m:#x}"))),
            }
        }
        Ok(out.into_iter().map(|o| o.unwrap_or(Err(5))).collect())
    }

    /// Flushes (if the server supports it) and sends NBD_CMD_DISC.
    pub fn close(&mut self) -> Result<(), NbdError> {
        if self.down {
            return Err(NbdError::Down);
        }
        if self.flags & TFLAG_SEND_FLUSH != 0 && !self.read_only() {
            if let Some(Err(e)) = self.submit(&[Request::Flush])?.pop() {
                tracing::warn!(errno = e, "final NBD flush failed");
            }
        }
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_DISC.to_be_bytes());
        b.extend_from_slice(&self.next_cookie.to_be_bytes());
        b.extend_from_slice(&[0u8; 12]);
        self.w().write_all(&b)?;
        self.down = true;
        match self.stream.get_ref() {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both)?,
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both)?,
        }
        Ok(())
    }
}

fn slot(cookie: u64, base: u64, n: usize) -> Result<usize, NbdError> {
    let k = cookie.wrapping_sub(base);
    if k < n as u64 {
        Ok(k as usize)
    } else {
        Err(proto(format!("reply for unknown cookie {cookie}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn w(s: &mut UnixStream, parts: &[&[u8]]) {
        for p in parts {
            s.write_all(p).unwrap();
        }
    }

    fn opt_reply(s: &mut UnixStream, opt: u32, ty: u32, data: &[u8]) {
        w(
            s,
            &[
                &REPLY_MAGIC_OPT.to_be_bytes(),
                &opt.to_be_bytes(),
                &ty.to_be_bytes(),
                &(data.len() as u32).to_be_bytes(),
                data,
            ],
        );
    }

    fn chunk(s: &mut UnixStream, flags: u16, ty: u16, cookie: u64, payload: &[u8]) {
        w(
            s,
            &[
                &STRUCTURED_REPLY_MAGIC.to_be_bytes(),
                &flags.to_be_bytes(),
                &ty.to_be_bytes(),
                &cookie.to_be_bytes(),
                &(payload.len() as u32).to_be_bytes(),
                payload,
            ],
        );
    }

    /// Reads one request: (type, cookie, offset, len), skipping a write's payload.
    fn request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
        assert_eq!(rd_u32(s).unwrap(), REQUEST_MAGIC);
        let _flags = rd_u16(s).unwrap();
        let ty = rd_u16(s).unwrap();
        let cookie = rd_u64(s).unwrap();
        let off = rd_u64(s).unwrap();
        let len = rd_u32(s).unwrap();
        if ty == CMD_WRITE {
            rd_vec(s, len).unwrap();
        }
        (ty, cookie, off, len)
    }

    /// The server side of the handshake: structured replies, a 1 MiB export.
    fn handshake(s: &mut UnixStream) {
        w(
            s,
            &[
                &NBDMAGIC.to_be_bytes(),
                &IHAVEOPT.to_be_bytes(),
                &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes(),
            ],
        );
        let _client_flags = rd_u32(s).unwrap();
        for _ in 0..2 {
            assert_eq!(rd_u64(s).unwrap(), IHAVEOPT);
            let opt = rd_u32(s).unwrap();
            let len = rd_u32(s).unwrap();
            rd_vec(s, len).unwrap();
            if opt == OPT_GO {
                let mut info = vec![0u8, 0];
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&(1u16 | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM).to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info);
            }
            opt_reply(s, opt, REP_ACK, &[]);
        }
    }

    /// A scripted server: handshake, then answers a batch of three requests out of
    /// order with data/hole chunks, a simple reply and an error chunk, then sends a
    /// reply for a cookie nobody asked about.
    fn serve(mut s: UnixStream) {
        handshake(&mut s);
        let reqs: Vec<_> = (0..3).map(|_| request(&mut s)).collect();
        // Third request (a read): EIO as an error chunk.
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&4u16.to_be_bytes());
        e.extend_from_slice(b"oops");
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, reqs[2].1, &e);
        // Second (a write): simple reply.
        w(
            &mut s,
            &[
                &SIMPLE_REPLY_MAGIC.to_be_bytes(),
                &0u32.to_be_bytes(),
                &reqs[1].1.to_be_bytes(),
            ],
        );
        // First (read 1024 at 4096): data for the second half, a hole for the first.
        let mut d = (4096u64 + 512).to_be_bytes().to_vec();
        d.extend_from_slice(&[0xaa; 512]);
        chunk(&mut s, 0, REPLY_TYPE_OFFSET_DATA, reqs[0].1, &d);
        let mut h = 4096u64.to_be_bytes().to_vec();
        h.extend_from_slice(&512u32.to_be_bytes());
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_HOLE,
            reqs[0].1,
            &h,
        );
        // Next batch: answered with a cookie from nowhere.
        let r = request(&mut s);
        w(
            &mut s,
            &[
                &SIMPLE_REPLY_MAGIC.to_be_bytes(),
                &0u32.to_be_bytes(),
                &(r.1 + 1000).to_be_bytes(),
            ],
        );
    }

    #[test]
    fn structured_replies_out_of_order_errors_and_a_lying_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || serve(l.accept().unwrap().0));
        let mut c = NbdClient::connect(&NbdAddr::Unix(path), "e").unwrap();
        assert!(c.structured());
        assert_eq!(c.size(), 1 << 20);
        assert!(!c.read_only());
        let out = c
            .submit(&[
                Request::Read {
                    offset: 4096,
                    len: 1024,
                },
                Request::Trim {
                    offset: 0,
                    len: 512,
                },
                Request::Read {
                    offset: 0,
                    len: 512,
                },
            ])
            .unwrap();
        let mut want = vec![0u8; 512];
        want.extend_from_slice(&[0xaa; 512]);
        assert_eq!(out[0], Ok(want));
        assert_eq!(out[1], Ok(vec![]));
        assert_eq!(out[2], Err(5));
        let err = c.submit(&[Request::Flush]).unwrap_err();
        assert!(matches!(err, NbdError::Protocol(_)), "{err}");
        assert!(matches!(c.submit(&[Request::Flush]), Err(NbdError::Down)));
        server.join().unwrap();
    }

    #[test]
    fn not_an_nbd_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        });
        let err = NbdClient::connect(&NbdAddr::Unix(path), "e").err().unwrap();
        assert!(err.to_string().contains("not an NBD server"), "{err}");
        t.join().unwrap();
    }

    #[test]
    fn chunk_offsets_that_overflow_are_a_protocol_error() {
        // A hole or data chunk whose offset lies so far past the request that
        // offset + length wraps around u64 must fail the connection, not overflow.
        for ty in [REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_OFFSET_DATA] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("nbd.sock");
            let l = UnixListener::bind(&path).unwrap();
            let server = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                handshake(&mut s);
                let (_, cookie, _, _) = request(&mut s);
                let mut p = (u64::MAX - 4).to_be_bytes().to_vec();
                if ty == REPLY_TYPE_OFFSET_HOLE {
                    p.extend_from_slice(&512u32.to_be_bytes());
                } else {
                    p.extend_from_slice(&[0x55; 512]);
                }
                chunk(&mut s, REPLY_FLAG_DONE, ty, cookie, &p);
            });
            let mut c = NbdClient::connect(&NbdAddr::Unix(path), "e").unwrap();
            let err = c
                .submit(&[Request::Read {
                    offset: 0,
                    len: 1024,
                }])
                .unwrap_err();
            assert!(
                err.to_string().contains("chunk outside the request"),
                "{err}"
            );
            server.join().unwrap();
        }
    }

    #[test]
    fn endless_info_replies_end_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            w(
                &mut s,
                &[
                    &NBDMAGIC.to_be_bytes(),
                    &IHAVEOPT.to_be_bytes(),
                    &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes(),
                ],
            );
            let _client_flags = rd_u32(&mut s).unwrap();
            for _ in 0..2 {
                assert_eq!(rd_u64(&mut s).unwrap(), IHAVEOPT);
                let opt = rd_u32(&mut s).unwrap();
                let len = rd_u32(&mut s).unwrap();
                rd_vec(&mut s, len).unwrap();
                if opt == OPT_STRUCTURED_REPLY {
                    opt_reply(&mut s, opt, REP_ACK, &[]);
                }
            }
            // GO: INFO replies (an unknown info type) until the client hangs up.
            let mut sent = 0u32;
            loop {
                let ok = s
                    .write_all(&REPLY_MAGIC_OPT.to_be_bytes())
                    .and_then(|_| s.write_all(&OPT_GO.to_be_bytes()))
                    .and_then(|_| s.write_all(&REP_INFO.to_be_bytes()))
                    .and_then(|_| s.write_all(&2u32.to_be_bytes()))
                    .and_then(|_| s.write_all(&[0, 9]));
                if ok.is_err() || sent > 100_000 {
                    return sent;
                }
                sent += 1;
            }
        });
        let err = NbdClient::connect(&NbdAddr::Unix(path), "e").err().unwrap();
        assert!(err.to_string().contains("replies to GO"), "{err}");
        assert!(server.join().unwrap() < 100_000);
    }

    #[test]
    fn endless_chunks_for_one_request_are_a_protocol_error() {
        // Overlapping holes, then (second round) NONE chunks, never DONE.
        for round in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("nbd.sock");
            let l = UnixListener::bind(&path).unwrap();
            let server = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                handshake(&mut s);
                let (_, cookie, off, _) = request(&mut s);
                let mut h = off.to_be_bytes().to_vec();
                h.extend_from_slice(&512u32.to_be_bytes());
                let mut sent = 0;
                while sent < 10_000 {
                    let (ty, p): (u16, &[u8]) = if round == 0 {
                        (REPLY_TYPE_OFFSET_HOLE, &h)
                    } else {
                        (REPLY_TYPE_NONE, &[])
                    };
                    let hdr = [
                        &STRUCTURED_REPLY_MAGIC.to_be_bytes()[..],
                        &0u16.to_be_bytes(),
                        &ty.to_be_bytes(),
                        &cookie.to_be_bytes(),
                        &(p.len() as u32).to_be_bytes(),
                        p,
                    ]
                    .concat();
                    if s.write_all(&hdr).is_err() {
                        break;
                    }
                    sent += 1;
                }
                sent
            });
            let mut c = NbdClient::connect(&NbdAddr::Unix(path), "e").unwrap();
            let err = c
                .submit(&[Request::Read {
                    offset: 4096,
                    len: 1024,
                }])
                .unwrap_err();
            // Without the bounds the client reads all 10 000 chunks, then EOF: Io.
            assert!(matches!(err, NbdError::Protocol(_)), "{err}");
            drop(c);
            server.join().unwrap();
        }
    }
}
