//! Auto-converge: where a guest dirties memory faster than pre-copy can send it, the
//! dirty set stops shrinking from round to round and the migration would end at
//! [`super::MAX_ROUNDS`] with a downtime over its goal. As QEMU's auto-converge
//! (`cpu-throttle-initial`, `-increment`, `-tailslow` off) does, the source then slows
//! the vCPUs down.
//!
//! The decision ([`Converge::after_round`]): a round is *high* when what the guest
//! dirtied while it ran is at least [`TRIGGER_PCT`] of what the round sent (the dirty
//! set of the round before). After [`HIGH_ROUNDS`] high rounds the throttle starts at
//! [`FIRST_PCT`], and every [`HIGH_ROUNDS`] high rounds more it grows by [`STEP_PCT`],
//! up to [`MAX_PCT`]; a round that shrinks the set enough starts the count again.
//!
//! The throttle ([`Throttle`]): with `p` percent, each vCPU thread sleeps `p` % of
//! every [`PERIOD`] outside KVM_RUN (see `Control::throttle_nap`); a ticker thread
//! kicks the vCPU threads out of KVM_RUN once a period, so a guest that makes no
//! exits of its own is slowed too. Dropping the [`Throttle`] stops the ticker and
//! lifts the throttle, whatever the migration's outcome (the destination runs at
//! full speed: the throttle is not part of the state).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::super::control::Control;

/// The time slice a throttled vCPU sleeps a share of.
pub(crate) const PERIOD: Duration = Duration::from_millis(10);
/// A round is high when the pages dirtied meanwhile are at least this share of
/// the pages it sent.
pub(super) const TRIGGER_PCT: usize = 50;
/// High rounds (not necessarily in a row, reset by a shrinking round) per step.
pub(super) const HIGH_ROUNDS: u32 = 2;
/// The first throttle.
pub(super) const FIRST_PCT: u8 = 20;
/// Each further step.
pub(super) const STEP_PCT: u8 = 10;
/// The most (a vCPU then still runs 1 % of the time).
pub(super) const MAX_PCT: u8 = 99;

/// The auto-converge decision, round by round.
#[derive(Debug, Default)]
pub(super) struct Converge {
    pct: u8,
    high: u32,
}

impl Converge {
    /// A round sent `sent` pages and the guest dirtied `dirtied` meanwhile: the
    /// throttle (percent) to run the next round with.
    pub(super) fn after_round(&mut self, sent: usize, dirtied: usize) -> u8 {
        if sent > 0 && dirtied * 100 >= sent * TRIGGER_PCT {
            self.high += 1;
            if self.high >= HIGH_ROUNDS {
                self.high = 0;
                self.pct = match self.pct {
                    0 => FIRST_PCT,
                    p => p.saturating_add(STEP_PCT).min(MAX_PCT),
                };
            }
        } else {
            self.high = 0;
        }
        self.pct
    }

    /// The throttle now (percent).
    pub(super) fn pct(&self) -> u8 {
        self.pct
    }
}

/// How long a vCPU that has run `ran` since its last nap sleeps now under a
/// throttle of `pct` percent: `pct` % of [`PERIOD`] once it ran the rest of one.
pub(crate) fn nap(pct: u8, ran: Duration) -> Option<Duration> {
    let pct = u32::from(pct.min(MAX_PCT));
    if pct == 0 || ran < PERIOD * (100 - pct) / 100 {
        return None;
    }
    Some(PERIOD * pct / 100)
}

/// A throttle on the vCPUs while it lives (see the module doc).
pub(super) struct Throttle {
    control: Arc<Control>,
    done: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Throttle {
    /// No throttle yet.
    pub(super) fn new(control: Arc<Control>) -> Throttle {
        Throttle {
            control,
            done: Arc::new(AtomicBool::new(false)),
            ticker: None,
        }
    }

    /// Throttles the vCPUs by `pct` percent (0: not at all); starts the ticker the
    /// first time.
    pub(super) fn set(&mut self, pct: u8) {
        self.control.set_throttle(pct);
        if pct == 0 || self.ticker.is_some() {
            return;
        }
        let (control, done) = (self.control.clone(), self.done.clone());
        let spawned = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    control.kick_vcpus();
                    std::thread::sleep(PERIOD);
                }
            });
        match spawned {
            Ok(h) => self.ticker = Some(h),
            // Without the ticker only a guest's own exits let the throttle act.
            Err(e) => tracing::warn!(error = %e, "no throttle ticker thread"),
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(h) = self.ticker.take() {
            let _ = h.join();
        }
        self.control.set_throttle(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrinking_dirty_set_is_never_throttled() {
        let mut c = Converge::default();
        let mut sent = 16384;
        for _ in 0..30 {
            let dirtied = sent * 4 / 10;
            assert_eq!(c.after_round(sent, dirtied), 0);
            sent = dirtied.max(1);
        }
    }

    #[test]
    fn a_dirty_set_that_does_not_shrink_is_throttled_more_and_more() {
        let mut c = Converge::default();
        // The first high round only counts.
        assert_eq!(c.after_round(4096, 4096), 0);
        assert_eq!(c.after_round(4096, 2048), FIRST_PCT);
        assert_eq!(c.after_round(2048, 2048), FIRST_PCT);
        assert_eq!(c.after_round(2048, 3000), FIRST_PCT + STEP_PCT);
        let mut p = 0;
        for _ in 0..40 {
            p = c.after_round(4096, 4096);
        }
        assert_eq!(p, MAX_PCT);
        assert_eq!(c.pct(), MAX_PCT);
    }

    #[test]
    fn a_shrinking_round_restarts_the_count_but_keeps_the_throttle() {
        let mut c = Converge::default();
        assert_eq!(c.after_round(4096, 4000), 0);
        assert_eq!(c.after_round(4000, 100), 0);
        assert_eq!(c.after_round(100, 90), 0);
        assert_eq!(c.after_round(90, 90), FIRST_PCT);
        assert_eq!(c.after_round(90, 10), FIRST_PCT);
        assert_eq!(c.after_round(10, 10), FIRST_PCT);
        // Nothing sent: nothing to compare, not high.
        assert_eq!(c.after_round(0, 5), FIRST_PCT);
        assert_eq!(c.after_round(5, 5), FIRST_PCT);
    }

    #[test]
    fn a_throttled_vcpu_naps_its_share_of_each_period() {
        assert_eq!(nap(0, Duration::from_secs(1)), None);
        assert_eq!(nap(20, Duration::from_millis(7)), None);
        assert_eq!(
            nap(20, Duration::from_millis(8)),
            Some(Duration::from_millis(2))
        );
        assert_eq!(nap(99, Duration::ZERO), None);
        assert_eq!(
            nap(99, Duration::from_micros(100)),
            Some(Duration::from_micros(9900))
        );
        // Never more than MAX_PCT: a vCPU always runs a little.
        assert_eq!(
            nap(100, Duration::from_micros(100)),
            Some(Duration::from_micros(9900))
        );
    }
}
