//! Adaptive busy polling of an idle connection, for queue-depth-1 latency.
//!
//! Theory of operation: at queue depth 1 a client sends a request only after
//! it got the previous reply, so the worker that reads requests finds the
//! socket empty every time and sleeps in recv(2). The next request then has to
//! wake it: on a virtual machine that is a cross-CPU interrupt through the
//! hypervisor and a scheduler round trip, which costs more than serving a
//! 4 KiB request from the page cache. Polling the socket for a few
//! microseconds before sleeping catches a request that follows its reply
//! closely, with no wake-up at all (the same trade KVM's halt polling and
//! Linux's `net.core.busy_read` make).
//!
//! The poll window adapts per connection, as KVM's `halt_poll_ns` does: it
//! starts at zero (no polling); a wait that ended within the configured
//! maximum but after the window grows it (to [`GROW_START`], then doubling),
//! a wait longer than the maximum halves it (and below [`GROW_START`] drops
//! it to zero). So a client that pauses between requests, or an idle
//! connection, costs no CPU beyond one short poll, and only a connection whose
//! requests really follow each other closely polls.
//!
//! Polling burns a CPU, so at most [`BusyPoll::limit`] threads poll at once,
//! across all connections (half the CPUs, at least one); a worker that finds
//! them all taken sleeps at once, as it would without polling.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// First window a growing connection polls for.
pub const GROW_START: Duration = Duration::from_micros(10);

/// Default maximum poll window (`busy_poll_us` in the config).
pub const DEFAULT_MAX_US: u32 = 200;

/// The server-wide polling policy: the largest window, and how many threads
/// may poll at once.
#[derive(Debug)]
pub struct BusyPoll {
    max: Duration,
    limit: usize,
    polling: AtomicUsize,
}

impl BusyPoll {
    /// A policy with windows of up to `max_us` microseconds (0: never poll)
    /// and at most half the CPUs (at least one) polling at once.
    pub fn new(max_us: u32) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        BusyPoll {
            max: Duration::from_micros(max_us.into()),
            limit: (cpus / 2).max(1),
            polling: AtomicUsize::new(0),
        }
    }

    /// How many threads may poll at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn enter(&self) -> bool {
        self.polling
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn leave(&self) {
        self.polling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's poll window.
#[derive(Debug, Default)]
pub struct Window {
    cur: Duration,
}

impl Window {
    /// Polls `fd` for input for up to the current window (when the policy
    /// allows). Returns whether input arrived while polling.
    pub fn poll(&self, policy: &BusyPoll, fd: RawFd) -> bool {
        if self.cur.is_zero() || !policy.enter() {
            return false;
        }
        let t0 = Instant::now();
        let mut arrived = false;
        while t0.elapsed() < self.cur {
            if crate::sys::poll_readable(fd, Duration::ZERO).unwrap_or(true) {
                arrived = true;
                break;
            }
            // Yielding (rather than a pure spin) lets a runnable thread that
            // shares this CPU go first, so polling takes only idle time.
            std::thread::yield_now();
        }
        policy.leave();
        arrived
    }

    /// Adapts the window to a wait of `waited` that polling did not catch.
    pub fn missed(&mut self, policy: &BusyPoll, waited: Duration) {
        if waited > policy.max {
            self.cur /= 2;
            if self.cur < GROW_START {
                self.cur = Duration::ZERO;
            }
        } else if waited > self.cur {
            self.cur = (self.cur * 2).max(GROW_START).min(policy.max);
        }
    }

    /// The current window.
    pub fn current(&self) -> Duration {
        self.cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_on_short_waits_and_shrinks_on_long_ones() {
        let p = BusyPoll::new(50);
        let mut w = Window::default();
        assert_eq!(w.current(), Duration::ZERO);
        w.missed(&p, Duration::from_micros(30));
        assert_eq!(w.current(), GROW_START);
        w.missed(&p, Duration::from_micros(30));
        assert_eq!(w.current(), Duration::from_micros(20));
        w.missed(&p, Duration::from_micros(30));
        assert_eq!(w.current(), Duration::from_micros(40));
        w.missed(&p, Duration::from_micros(45));
        assert_eq!(
            w.current(),
            Duration::from_micros(50),
            "capped at the maximum"
        );
        w.missed(&p, Duration::from_millis(5));
        assert_eq!(w.current(), Duration::from_micros(25));
        w.missed(&p, Duration::from_millis(5));
        assert_eq!(
            w.current(),
            Duration::from_micros(12) + Duration::from_nanos(500)
        );
        w.missed(&p, Duration::from_millis(5));
        assert_eq!(w.current(), Duration::ZERO, "below the start: off");
    }

    #[test]
    fn zero_maximum_never_polls() {
        let p = BusyPoll::new(0);
        let mut w = Window::default();
        w.missed(&p, Duration::from_micros(1));
        assert_eq!(w.current(), Duration::ZERO);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!w.poll(&p, std::os::fd::AsRawFd::as_raw_fd(&a)));
    }

    #[test]
    fn poll_sees_input_and_respects_the_limit() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let p = BusyPoll::new(1000);
        let mut w = Window::default();
        for _ in 0..8 {
            w.missed(&p, Duration::from_micros(900));
        }
        assert_eq!(w.current(), Duration::from_millis(1));
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let t0 = Instant::now();
        assert!(!w.poll(&p, a.as_raw_fd()), "nothing sent yet");
        assert!(t0.elapsed() >= Duration::from_millis(1));
        b.write_all(b"x").unwrap();
        assert!(w.poll(&p, a.as_raw_fd()));
        // With every polling slot taken, a poll returns at once.
        for _ in 0..p.limit() {
            assert!(p.enter());
        }
        assert!(!w.poll(&p, a.as_raw_fd()));
    }
}
