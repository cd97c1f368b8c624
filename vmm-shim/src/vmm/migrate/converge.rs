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
//! The throttle ([`Throttle`]): with `p` percent, a vCPU thread that has run a
//! [`PERIOD`] (or more) since its last nap sleeps, outside KVM_RUN, `p / (100 - p)`
//! times what it ran (see [`nap`] and `Control::throttle_nap`), so it runs `100 - p`
//! % of the time whatever its exits: at 99 % it runs 10 ms, then sleeps about a
//! second, as QEMU's throttle does. A ticker thread kicks the vCPU threads out of
//! KVM_RUN once a period, so a guest that makes no exits of its own is slowed too;
//! a kick that lands while a vCPU sleeps only makes its next run (and so its next
//! nap) longer. A pause or the end of the throttle wakes a napping vCPU at once. Dropping the [`Throttle`] stops the ticker and
//! lifts the throttle, whatever the migration's outcome (the destination runs at
//! full speed: the throttle is not part of the state).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::super::control::Control;

/// The time a throttled vCPU runs before it naps (its time slice).
pub(crate) const PERIOD: Duration = Duration::from_millis(10);
/// The longest nap (a run much longer than [`PERIOD`], after lost kicks, is not
/// paid for in full).
pub(crate) const MAX_NAP: Duration = Duration::from_secs(2);
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
/// throttle of `pct` percent: nothing before it ran a [`PERIOD`], then `ran × pct /
/// (100 - pct)` (at most [`MAX_NAP`]).
pub(crate) fn nap(pct: u8, ran: Duration) -> Option<Duration> {
    let pct = u32::from(pct.min(MAX_PCT));
    if pct == 0 || ran < PERIOD {
        return None;
    }
    Some((ran * pct / (100 - pct)).min(MAX_NAP))
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
    fn a_throttled_vcpu_sleeps_its_share_of_what_it_ran() {
        let ms = Duration::from_millis;
        assert_eq!(nap(0, Duration::from_secs(1)), None);
        // Not before a whole time slice.
        assert_eq!(nap(20, ms(9)), None);
        assert_eq!(nap(99, Duration::ZERO), None);
        // 20 %: 10 ms run, 2.5 ms asleep (a fifth of the time).
        assert_eq!(nap(20, ms(10)), Some(Duration::from_micros(2500)));
        assert_eq!(nap(50, ms(12)), Some(ms(12)));
        // 99 %: 10 ms run, 990 ms asleep.
        assert_eq!(nap(99, ms(10)), Some(ms(990)));
        // Never more than MAX_PCT: a vCPU always runs a little.
        assert_eq!(nap(100, ms(10)), Some(ms(990)));
        // A run far over the slice (kicks lost) does not sleep without end.
        assert_eq!(nap(99, ms(500)), Some(MAX_NAP));
    }
}
