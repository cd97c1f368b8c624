//! The transmission phase on worker threads: what the socket halves must do
//! ([`SockRead`], [`SockWrite`]; the plain ones are in `sock`, the TLS ones in
//! `starttls`), the shared read / write locks, reading requests, writing
//! replies, deadlines, shutdown polling.
//!
//! A connection that fails (a reply cannot be sent, a deadline passed) is
//! marked broken and its socket shut down, so the reader blocked in recv or in
//! the budget wakes and every worker stops.

use super::*;

/// The read side of a connection, shared by the workers under a mutex.
pub(super) trait SockRead: Read + Send + AsRawFd {
    /// Bounds a blocking read so the reader can notice shutdown.
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// Whether more bytes (the next request) already wait to be read.
    fn has_pending(&self) -> bool {
        crate::sys::bytes_pending(self.as_raw_fd()).map_or(true, |n| n > 0)
    }
    /// Whether one thread must do all the reading and writing (a TLS stream
    /// is one state machine): the connection then gets a single worker.
    fn one_thread(&self) -> bool {
        false
    }
}

/// The write side of a connection: replies are written with vectored writes,
/// READ data may come straight from the disk file's mapping (by fd).
pub(super) trait SockWrite: Write + Send + AsRawFd {
    /// Bounds a blocking write (SO_SNDTIMEO), so a client that stops reading
    /// its replies cannot hold a worker forever.
    fn set_timeout(&self, _t: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }

    /// Whether bytes written to the fd directly are the stream (not under
    /// TLS: mapped READ data then goes through `write`).
    fn raw_fd(&self) -> bool {
        true
    }
}

/// How often a reader blocked on an idle socket looks at the shutdown flag.
pub(super) const SHUTDOWN_POLL: Duration = Duration::from_millis(200);
/// Worker threads per connection: requests in flight at once.
const WORKERS: usize = 16;

struct ReadState {
    /// Buffered: one recv can bring several pipelined request headers (large
    /// payloads bypass the buffer, as BufReader does).
    rd: BufReader<Box<dyn SockRead>>,
    grace_end: Option<Instant>,
    done: bool,
    /// Replies to requests run inline while more requests were already
    /// waiting: written together, in one write, once the input runs dry.
    held: Vec<Bytes>,
    held_bytes: usize,
    /// How long the reader polls an empty socket before sleeping.
    window: crate::poll::Window,
}

pub(super) struct Shared<'a> {
    ctx: &'a Ctx,
    sess: &'a Session,
    rd: Mutex<ReadState>,
    wr: Mutex<Box<dyn SockWrite>>,
    /// This connection's payload budget.
    pub(super) budget: Budget,
    /// Set once the connection failed: budget waits give up, workers stop.
    pub(super) broken: AtomicBool,
    /// Why it failed: the first failure (the others follow from it, like the
    /// EPIPE of the next reply after a send timeout shut the socket down).
    cause: Mutex<Option<ConnError>>,
    /// The socket, for shutting it down when the connection breaks.
    fd: std::os::fd::RawFd,
    /// Requests read and not yet answered (for `idle_timeout`).
    inflight: AtomicU64,
    /// When the connection last did something, in ms since `start`.
    last_active: AtomicU64,
    start: Instant,
}

impl Shared<'_> {
    /// Marks the connection broken by `e` (unless it already was) and shuts
    /// its socket down, so a reader blocked in recv or in the budget returns
    /// at once.
    fn break_off(&self, e: ConnError) {
        let mut cause = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        if !self.broken.swap(true, Ordering::AcqRel) {
            *cause = Some(e);
            crate::sys::shutdown_socket(self.fd);
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_active.store(ms, Ordering::Release);
    }

    fn idle_for(&self) -> Duration {
        let last = self.last_active.load(Ordering::Acquire);
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }

    /// Breaks the connection for an I/O failure writing a reply (a timeout
    /// is named as such).
    fn write_failed(&self, e: std::io::Error) {
        self.break_off(if is_timeout(&e) {
            ConnError::Timeout("sending a reply", self.ctx.limits.request_timeout)
        } else {
            ConnError::Io(e)
        });
    }
}

/// Whether an I/O error is a socket timeout (SO_RCVTIMEO / SO_SNDTIMEO).
pub(super) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// How long a started message may take to arrive.
#[derive(Clone, Copy)]
struct Deadline<'a> {
    limit: Duration,
    broken: &'a AtomicBool,
}

/// Fills `buf` completely. At a message boundary (`boundary`), an idle socket
/// lets `idle()` decide to stop (returns `Ok(false)`); EOF there is a clean end
/// (also `Ok(false)`). Inside a message, timeouts are waited out until
/// `dl.limit` after the message started (the first byte, or the call if not at
/// a boundary), and EOF is an error.
fn read_full(
    rd: &mut dyn Read,
    buf: &mut [u8],
    boundary: bool,
    mut idle: impl FnMut() -> bool,
    dl: Deadline<'_>,
) -> Result<bool, ConnError> {
    let mut got = 0;
    let mut started = (!boundary).then(Instant::now);
    while got < buf.len() {
        if dl.broken.load(Ordering::Acquire) {
            return Err(ConnError::Io(std::io::ErrorKind::ConnectionAborted.into()));
        }
        if started.is_some_and(|t| t.elapsed() >= dl.limit) {
            return Err(ConnError::Timeout("receiving a request", dl.limit));
        }
        match rd.read(&mut buf[got..]) {
            Ok(0) if got == 0 && boundary => return Ok(false),
            Ok(0) => {
                return Err(ConnError::Protocol(
                    "connection closed in the middle of a request".into(),
                ))
            }
            Ok(n) => {
                got += n;
                started.get_or_insert_with(Instant::now);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if got == 0 && boundary && idle() {
                    return Ok(false);
                }
            }
            Err(e) => return Err(ConnError::Io(e)),
        }
    }
    Ok(true)
}

/// Reads and drops `n` payload bytes.
fn skip(rd: &mut dyn Read, mut n: u64, dl: Deadline<'_>) -> Result<(), ConnError> {
    let mut sink = vec![0u8; 256 * 1024];
    while n > 0 {
        let k = n.min(sink.len() as u64) as usize;
        read_full(rd, &mut sink[..k], false, || false, dl)?;
        n -= k as u64;
    }
    Ok(())
}

/// Where a WRITE payload was read to.
enum Payload {
    /// No payload.
    None,
    /// The first `n` bytes of the worker's scratch buffer.
    Scratch(usize),
    /// A buffer of its own (larger than the scratch buffer may grow).
    Owned(Vec<u8>),
}

/// Largest payload read into a worker's reusable scratch buffer; larger ones
/// get a buffer of their own, so an idle worker never keeps more than this.
const SCRATCH_MAX: usize = 1024 * 1024;

/// A validated request, ready to execute.
struct Run<'a> {
    /// Its typed command (what [`validate`] returned).
    cmd: Command,
    req: Request,
    payload: Payload,
    /// The budget its payload holds.
    _mem: Option<BudgetGuard<'a>>,
}

/// What the reader got for a worker.
enum Next<'a> {
    /// A validated request to execute (payload read, its budget held).
    Run(Run<'a>),
    /// An answer that needs no execution: an invalid request, a request
    /// during shutdown, or a READ answered from the page cache.
    Answer(Out),
    /// The connection is over.
    Stop,
}

/// Reads the next request (header and payload). Called with the read lock held.
fn next<'s>(
    sh: &'s Shared<'_>,
    st: &mut ReadState,
    scratch: &mut Vec<u8>,
) -> Result<Next<'s>, ConnError> {
    // A client that keeps sending after the grace period is not waited for.
    if matches!(st.grace_end, Some(end) if Instant::now() >= end) {
        return Ok(Next::Stop);
    }
    let mut hdr = [0u8; REQUEST_LEN];
    // Nothing buffered: poll the socket briefly before sleeping in recv (see
    // `crate::poll`), and let the wait adapt the poll window.
    let idle = st.rd.buffer().is_empty();
    let t0 = idle.then(Instant::now);
    let caught = idle
        && st
            .window
            .poll(&sh.ctx.busy_poll, st.rd.get_ref().as_raw_fd());
    let shutdown = &sh.ctx.shutdown;
    let grace = &mut st.grace_end;
    let dl = Deadline {
        limit: sh.ctx.limits.request_timeout,
        broken: &sh.broken,
    };
    let mut idle_out = false;
    let got = read_full(
        &mut st.rd,
        &mut hdr,
        true,
        || {
            if grace.is_none() && *shutdown.borrow() {
                *grace = Some(Instant::now() + SHUTDOWN_GRACE);
            }
            if let Some(limit) = sh.ctx.limits.idle_timeout {
                if sh.inflight.load(Ordering::Acquire) == 0 && sh.idle_for() >= limit {
                    idle_out = true;
                    return true;
                }
            }
            matches!(grace, Some(end) if Instant::now() >= *end)
        },
        dl,
    )?;
    if idle_out {
        sh.ctx.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            idle = ?sh.ctx.limits.idle_timeout,
            "closing a connection idle for longer than idle_timeout"
        );
    }
    if let (Some(t0), false) = (t0, caught) {
        st.window.missed(&sh.ctx.busy_poll, t0.elapsed());
    }
    if !got {
        return Ok(Next::Stop);
    }
    sh.touch();
    if st.grace_end.is_none() && *shutdown.borrow() {
        st.grace_end = Some(Instant::now() + SHUTDOWN_GRACE);
    }
    let req = Request::parse(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
    if req.command() == Ok(Command::Disc) {
        return Ok(Next::Stop);
    }
    let plen = req.payload_len();
    if plen > MAX_PAYLOAD {
        // Too big to buffer: skip the payload as it streams past, then answer.
        skip(&mut st.rd, plen as u64, dl)?;
        sh.ctx
            .stats
            .invalid_requests
            .fetch_add(1, Ordering::Relaxed);
        let msg = format!("write of {plen} bytes exceeds the maximum {MAX_PAYLOAD}");
        return Ok(Next::Answer(Out::Segs(error_reply(
            sh.sess,
            req.handle,
            err::EINVAL,
            &msg,
        ))));
    }
    let n = plen as usize;
    let (payload, mem) = if n == 0 {
        (Payload::None, None)
    } else if n <= SCRATCH_MAX {
        let mem = sh
            .budget
            .take(n as u64, &sh.broken)
            .ok_or(ConnError::Io(std::io::ErrorKind::ConnectionAborted.into()))?;
        // The buffer only grows (zeroed once), so later payloads land in it
        // without an allocation or a memset.
        if scratch.len() < n {
            scratch.resize(n, 0);
        }
        read_full(&mut st.rd, &mut scratch[..n], false, || false, dl)?;
        (Payload::Scratch(n), Some(mem))
    } else {
        let mem = sh
            .budget
            .take(n as u64, &sh.broken)
            .ok_or(ConnError::Io(std::io::ErrorKind::ConnectionAborted.into()))?;
        let mut v = vec![0u8; n];
        read_full(&mut st.rd, &mut v, false, || false, dl)?;
        (Payload::Owned(v), Some(mem))
    };
    // The payload was read either way: the framing stays intact.
    if st.grace_end.is_some() {
        return Ok(Next::Answer(Out::Segs(error_reply(
            sh.sess,
            req.handle,
            err::ESHUTDOWN,
            "server is shutting down",
        ))));
    }
    match validate(sh.sess, &req) {
        Ok(cmd) => Ok(Next::Run(Run {
            cmd,
            req,
            payload,
            _mem: mem,
        })),
        Err((e, msg)) => {
            sh.ctx
                .stats
                .invalid_requests
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(handle = req.handle, kind = req.kind, error = e, %msg, "invalid request");
            Ok(Next::Answer(Out::Segs(error_reply(
                sh.sess, req.handle, e, &msg,
            ))))
        }
    }
}

/// The error for a reply still not sent at its deadline.
fn late() -> std::io::Error {
    std::io::ErrorKind::TimedOut.into()
}

/// Writes all of `reply` with vectored writes, by `deadline`.
fn write_segs(wr: &mut dyn SockWrite, reply: &[Bytes], deadline: Instant) -> std::io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < reply.len() {
        if Instant::now() >= deadline {
            return Err(late());
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(reply.len() - idx);
        slices.push(IoSlice::new(&reply[idx][off..]));
        for b in &reply[idx + 1..] {
            slices.push(IoSlice::new(b));
        }
        let mut n = match wr.write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 && idx < reply.len() {
            let left = reply[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while idx < reply.len() && reply[idx].len() == off {
            idx += 1;
            off = 0;
        }
    }
    Ok(())
}

/// Writes a READ reply whose data comes from the disk file's mapping. A page
/// may turn out unreadable after all (the file shrank or failed since
/// `populate`), when the header may already be on the wire: the rest is then
/// read with pread (bytes past the end of the host file as zeroes, as pread
/// reads them). A structured reply's final chunk (`m.tail`, NONE with DONE)
/// goes out only after all the data did: if that pread fails, the rest of the
/// promised data is sent as zeroes and the final chunk is an ERROR chunk, so
/// the client gets the error and the connection stays. A simple reply cannot
/// carry a late error, so that ends the connection.
fn write_mapped(
    wr: &mut dyn SockWrite,
    disk: &Disk,
    m: &MappedRead,
    deadline: Instant,
) -> std::io::Result<()> {
    if !wr.raw_fd() {
        wr.write_all(&m.hdr)?;
        let data = disk
            .read(m.offset, m.len)
            .map_err(|e| std::io::Error::other(crate::error_chain(&e)))?;
        wr.write_all(&data)?;
        return wr.write_all(&m.tail);
    }
    let fd = wr.as_raw_fd();
    let (mut head, mut done, mut tail) = (0usize, 0usize, 0usize);
    while head < m.hdr.len() || done < m.len || tail < m.tail.len() {
        if Instant::now() >= deadline {
            return Err(late());
        }
        match m.map.writev(
            fd,
            &m.hdr[head..],
            m.at + done,
            m.len - done,
            &m.tail[tail..],
        ) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                let h = n.min(m.hdr.len() - head);
                head += h;
                let d = (n - h).min(m.len - done);
                done += d;
                tail += n - h - d;
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                write_all_by(wr, &m.hdr[head..], deadline)?;
                return match disk.read(m.offset + done as u64, m.len - done) {
                    Ok(data) => {
                        write_all_by(wr, &data, deadline)?;
                        write_all_by(wr, &m.tail[tail..], deadline)
                    }
                    Err(e) if m.structured => {
                        tracing::warn!(disk = disk.name(), error = %crate::error_chain(&e), "READ failed after its reply began; sending an error chunk");
                        let zeroes = vec![0u8; (m.len - done).min(1 << 20)];
                        let mut left = m.len - done;
                        while left > 0 {
                            let k = left.min(zeroes.len());
                            write_all_by(wr, &zeroes[..k], deadline)?;
                            left -= k;
                        }
                        let mut b = BytesMut::new();
                        nbd_proto::emit_error_chunk(
                            &mut b,
                            m.handle,
                            e.nbd_errno(),
                            &crate::error_chain(&e),
                        );
                        write_all_by(wr, &b, deadline)
                    }
                    Err(e) => Err(std::io::Error::other(crate::error_chain(&e))),
                };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that gives up at `deadline` (each write is bounded by
/// SO_SNDTIMEO).
fn write_all_by(wr: &mut dyn SockWrite, mut buf: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        if Instant::now() >= deadline {
            return Err(late());
        }
        match wr.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_out(sh: &Shared<'_>, out: &Out) -> std::io::Result<()> {
    let mut wr = sh.wr.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = Instant::now() + sh.ctx.limits.request_timeout;
    match out {
        Out::Segs(r) => write_segs(&mut **wr, r, deadline)?,
        Out::Mapped(m) => write_mapped(&mut **wr, sh.sess.disk(), m, deadline)?,
    }
    wr.flush()
}

/// Largest READ / WRITE a worker executes while still holding the read lock.
const INLINE_MAX: u32 = 256 * 1024;

/// Whether a request is cheap enough (page-cache work, no fdatasync) to run
/// without handing the socket to another worker.
fn cheap(run: &Run<'_>) -> bool {
    match run.cmd {
        Command::Read => run.req.len <= INLINE_MAX,
        Command::Write => run.req.len <= INLINE_MAX && !run.req.has_flag(cflag::FUA),
        Command::BlockStatus => true,
        _ => false,
    }
}

/// Produces the reply to what the reader got (`None`: the connection is over).
fn answer(sh: &Shared<'_>, next: Next<'_>, scratch: &[u8]) -> Option<Out> {
    match next {
        Next::Stop => None,
        Next::Answer(out) => Some(out),
        Next::Run(run) => {
            sh.ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
            let data: &[u8] = match &run.payload {
                Payload::None => &[],
                // `n` is at most the length the reader grew `scratch` to.
                Payload::Scratch(n) => &scratch[..*n],
                Payload::Owned(v) => v,
            };
            let t0 = Instant::now();
            let out = execute(sh.sess, run.cmd, &run.req, data, &sh.budget, &sh.broken);
            sh.sess
                .disk()
                .io()
                .record(run.cmd, run.req.len, t0.elapsed());
            Some(out)
        }
    }
}

/// [`read_cached`], counted on the disk when it answers.
fn timed_read_cached(sess: &Session, req: &Request) -> Option<Reply> {
    let t0 = Instant::now();
    let r = read_cached(sess, req)?;
    sess.disk()
        .io()
        .record(Command::Read, req.len, t0.elapsed());
    Some(r)
}

/// Ends the connection: the workers stop (the cause is in `Shared::cause`).
fn fail(st: &mut ReadState) {
    st.done = true;
}

/// Most reply bytes held back for one combined write.
const HELD_MAX: usize = 64 * 1024;

/// Whether more request bytes are already buffered or waiting on the socket.
fn input_pending(st: &ReadState) -> bool {
    !st.rd.buffer().is_empty() || st.rd.get_ref().has_pending()
}

/// Writes the held replies, if any.
fn flush_held(sh: &Shared<'_>, st: &mut ReadState) -> std::io::Result<()> {
    if st.held.is_empty() {
        return Ok(());
    }
    let held = std::mem::take(&mut st.held);
    st.held_bytes = 0;
    let mut wr = sh.wr.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = Instant::now() + sh.ctx.limits.request_timeout;
    write_segs(&mut **wr, &held, deadline)?;
    wr.flush()
}

/// One worker: read a request under the read lock, run it, reply.
///
/// A cheap request (page-cache work, no fdatasync) runs on the worker that read
/// it, still holding the read lock, when nothing else waits on the socket
/// (queue depth 1: handing the socket to another worker would cost a thread
/// wake-up per request for nothing). A cheap WRITE runs there even when more
/// requests wait, and so does a small READ whose data is all in the page cache
/// (preadv2 RWF_NOWAIT; a miss is handed over): page-cache work costs less
/// than waking another thread. The reply is then held back and written
/// together with the replies of the requests behind it once the input runs dry
/// (one write instead of one per request; replies are held only while the
/// requests behind them are already arriving).
/// Everything else lets go of the socket first, so the next request is read
/// while this one runs.
fn worker(sh: &Shared<'_>) {
    let mut scratch = Vec::new();
    let mut st = sh.rd.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if st.done {
            return;
        }
        if !st.held.is_empty() && !input_pending(&st) {
            if let Err(e) = flush_held(sh, &mut st) {
                sh.write_failed(e);
                return fail(&mut st);
            }
            sh.touch();
        }
        let next = match next(sh, &mut st, &mut scratch) {
            Ok(n) => n,
            Err(e) => {
                sh.break_off(e);
                return fail(&mut st);
            }
        };
        if !matches!(next, Next::Stop) {
            sh.inflight.fetch_add(1, Ordering::AcqRel);
        }
        let inline = match &next {
            Next::Stop => {
                st.done = true;
                if let Err(e) = flush_held(sh, &mut st) {
                    tracing::debug!(error = %e, "cannot write the last replies");
                }
                return;
            }
            Next::Answer(_) => Inline::Write,
            Next::Run(run) if cheap(run) => {
                let pending = input_pending(&st);
                match run.cmd {
                    _ if !pending => Inline::Write,
                    Command::Write => Inline::Hold,
                    Command::Read => Inline::IfCached,
                    _ => Inline::No,
                }
            }
            Next::Run(_) => Inline::No,
        };
        // A small READ with more requests waiting runs here only if its data
        // is in the page cache (a cache miss must not hold up the socket).
        let (inline, next) = match (inline, next) {
            (Inline::IfCached, Next::Run(run)) => match timed_read_cached(sh.sess, &run.req) {
                Some(r) => {
                    sh.ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
                    (Inline::Hold, Next::Answer(Out::Segs(r)))
                }
                None => (Inline::No, Next::Run(run)),
            },
            other => other,
        };
        let res = if let Inline::Write | Inline::Hold = inline {
            match answer(sh, next, &scratch) {
                Some(Out::Segs(r))
                    if matches!(inline, Inline::Hold)
                        && st.held_bytes + r.iter().map(Bytes::len).sum::<usize>() <= HELD_MAX =>
                {
                    st.held_bytes += r.iter().map(Bytes::len).sum::<usize>();
                    st.held.extend(r);
                    Some(Ok(()))
                }
                Some(out) => Some(flush_held(sh, &mut st).and_then(|()| write_out(sh, &out))),
                None => None,
            }
        } else {
            if let Err(e) = flush_held(sh, &mut st) {
                sh.write_failed(e);
                return fail(&mut st);
            }
            drop(st);
            match answer(sh, next, &scratch).map(|r| write_out(sh, &r)) {
                Some(Err(e)) => {
                    // Before taking the read lock: wakes a reader blocked on
                    // the socket or the budget.
                    sh.write_failed(e);
                    st = sh.rd.lock().unwrap_or_else(|p| p.into_inner());
                    return fail(&mut st);
                }
                res => {
                    st = sh.rd.lock().unwrap_or_else(|p| p.into_inner());
                    res
                }
            }
        };
        sh.inflight.fetch_sub(1, Ordering::AcqRel);
        sh.touch();
        if let Some(Err(e)) = res {
            sh.write_failed(e);
            return fail(&mut st);
        }
    }
}

/// Whether a worker runs what it read itself, and what it does with the reply.
enum Inline {
    /// Yes, and writes the reply at once: nothing else waits on the socket.
    Write,
    /// Yes, and holds the reply back: more requests were already waiting, so
    /// their replies go out together with this one.
    Hold,
    /// If the data is in the page cache (a small READ, more requests waiting);
    /// the reply is then held back.
    IfCached,
    /// No: hand the socket to another worker first.
    No,
}

/// The transmission phase on `WORKERS` threads: each takes the read lock,
/// reads one request, releases the lock, executes it and writes its reply under
/// the write lock, so requests overlap and replies go out as they finish.
pub(super) fn transmission(
    ctx: &Ctx,
    sess: Session,
    rd: Box<dyn SockRead>,
    wr: Box<dyn SockWrite>,
) -> Result<(), ConnError> {
    rd.set_timeout(Some(SHUTDOWN_POLL))?;
    wr.set_timeout(Some(ctx.limits.request_timeout))?;
    let fd = rd.as_raw_fd();
    let workers = if rd.one_thread() { 1 } else { WORKERS };
    let sh = Shared {
        ctx,
        sess: &sess,
        budget: Budget::new(CONN_BUDGET),
        broken: AtomicBool::new(false),
        cause: Mutex::new(None),
        fd,
        inflight: AtomicU64::new(0),
        last_active: AtomicU64::new(0),
        start: Instant::now(),
        rd: Mutex::new(ReadState {
            rd: BufReader::with_capacity(64 * 1024, rd),
            grace_end: None,
            done: false,
            held: Vec::new(),
            held_bytes: 0,
            window: crate::poll::Window::default(),
        }),
        wr: Mutex::new(wr),
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            let sh = &sh;
            let spawned = std::thread::Builder::new()
                .name("stord-worker".into())
                .stack_size(512 * 1024)
                .spawn_scoped(s, move || worker(sh));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a worker thread; serving with fewer");
                break;
            }
        }
        worker(&sh);
    });
    if *ctx.shutdown.borrow() {
        let _ = sess.disk().flush();
    }
    match sh.cause.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
