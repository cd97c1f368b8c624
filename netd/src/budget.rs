//! A byte bound for a queue of [`Bytes`] messages whose consumer is not ours to
//! change (the channel from the switch into a service such as the NAT router).
//!
//! Theory of operation. A queue bounded only in messages is not bounded in memory
//! when messages can be 64 KiB TCP super-frames: 4096 of them are 256 MiB. A
//! [`ByteBudget`] is charged when a message is made ([`ByteBudget::charge`]) and
//! refunded when the last [`Bytes`] referring to it is dropped, wherever that is
//! (the consumer dropping it after use, or a slice of it kept a little longer),
//! because the message owns its charge (`Bytes::from_owner`). A message that would
//! go over the bound is not made: the sender drops the frame and counts it, as for
//! a full channel. Each message is charged [`MSG_COST`] more than its length, so a
//! flood of tiny messages is bounded too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// What a message costs beyond its bytes (allocation and queue bookkeeping).
pub const MSG_COST: usize = 64;

/// Bytes held by the messages of one queue, against a bound.
#[derive(Debug)]
pub struct ByteBudget {
    used: AtomicUsize,
    max: usize,
}

impl ByteBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ByteBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A message holding `parts` one after the other, charged until its last
    /// reference is dropped; None (nothing charged) when it would go over the bound.
    pub fn charge(self: &Arc<Self>, parts: &[&[u8]]) -> Option<Bytes> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let charge = self.charge_len(len)?;
        let mut data = Vec::with_capacity(len);
        for p in parts {
            data.extend_from_slice(p);
        }
        Some(Bytes::from_owner(Charged {
            data,
            _charge: charge,
        }))
    }

    /// A charge of `len` bytes (and [`MSG_COST`]) for a message kept elsewhere,
    /// refunded when the [`Charge`] is dropped; None (nothing charged) when it
    /// would go over the bound.
    pub fn charge_len(self: &Arc<Self>, len: usize) -> Option<Charge> {
        let cost = self.reserve(len)?;
        Some(Charge {
            cost,
            budget: self.clone(),
        })
    }

    /// Charges a message of `len` bytes; its cost, or None when over the bound.
    fn reserve(&self, len: usize) -> Option<usize> {
        let cost = len.saturating_add(MSG_COST);
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(cost).filter(|n| *n <= self.max)?;
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(cost),
                Err(now) => used = now,
            }
        }
    }
}

/// A charge on a [`ByteBudget`] ([`ByteBudget::charge_len`]), refunded on drop.
#[derive(Debug)]
pub struct Charge {
    cost: usize,
    budget: Arc<ByteBudget>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.cost, Ordering::AcqRel);
    }
}

/// A message's bytes and its charge, refunded on drop.
struct Charged {
    data: Vec<u8>,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_charged_until_their_last_reference_goes() {
        let b = ByteBudget::new(3 * (1000 + MSG_COST));
        let m1 = b.charge(&[&[1u8; 400], &[2u8; 600]]).unwrap();
        assert_eq!(m1.len(), 1000);
        assert_eq!(&m1[399..401], &[1, 2]);
        let m2 = b.charge(&[&[0u8; 1000]]).unwrap();
        let m3 = b.charge(&[&[0u8; 1000]]).unwrap();
        assert!(b.charge(&[&[0u8; 1]]).is_none(), "over the bound");
        assert_eq!(b.used(), 3 * (1000 + MSG_COST));
        // A slice keeps its message charged.
        let tail = m1.slice(900..);
        drop(m1);
        assert!(b.charge(&[&[0u8; 1]]).is_none());
        drop(tail);
        assert!(
            b.charge(&[&[0u8; 1000]]).is_some(),
            "refunded, then freed again"
        );
        drop((m2, m3));
        assert_eq!(b.used(), 0);
    }

    /// Regression (issue 11, item 9): a queue of 4096 frames held 4096 x 64 KiB.
    #[test]
    fn super_frames_are_bounded_in_bytes_not_count() {
        let b = ByteBudget::new(16 << 20);
        let big = vec![0u8; 65_000];
        let held: Vec<Bytes> = std::iter::from_fn(|| b.charge(&[&big]))
            .take(4096)
            .collect();
        assert_eq!(held.len(), (16 << 20) / (65_000 + MSG_COST));
        assert!(b.used() <= 16 << 20);
    }

    /// The channel into a service that does not read holds at most
    /// [`crate::switch::SERVICE_QUEUE_BYTES`]; the rest is dropped and counted.
    #[test]
    fn a_service_channel_is_bounded_in_bytes() {
        use crate::switch::{Network, PortClass, PortTx, TxError, SERVICE_QUEUE_BYTES};
        struct NoTx;
        impl PortTx for NoTx {
            fn send(&self, _: &[u8]) -> Result<(), TxError> {
                Ok(())
            }
        }
        let net = Network::new("t", 65_000, 64, std::time::Duration::from_secs(60));
        let (_svc, _from_switch) = net.attach_service_direct("svc", 4096, true).unwrap();
        let src = net.add_port("src", PortClass::Tap, Box::new(NoTx)).unwrap();
        let mut f = vec![0u8; 60_000];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        for _ in 0..1000 {
            net.ingress(&src, &f);
        }
        let c = net.port("svc").unwrap().counters.snapshot();
        let fit = (SERVICE_QUEUE_BYTES / (60_010 + MSG_COST)) as u64;
        assert_eq!(c.tx_frames, fit, "{c:?}");
        assert_eq!(c.drop_full, 1000 - fit, "{c:?}");
    }
}
