//! Per-flow readiness: which flows' host sockets woke up since the last step.
//!
//! # Theory of operation
//!
//! A router holding thousands of idle flows must not look at each of them on every
//! wake-up: polling every host socket's readiness and pumping every flow per step
//! made the router's work grow with the flow count, not with the traffic (the soak
//! bench's 10,000 flows took the throughput of one busy flow down to a third).
//! Instead each flow has a [`Waker`] of its own ([`Ready::waker`]), which is what it
//! registers with its host socket (`poll_read_ready(&mut Context::from_waker(..))`):
//! when the reactor sees the socket ready, that waker records the flow's key in the
//! shared list and wakes the router's task. A step then takes the list
//! ([`Ready::take`]) and works on those flows only; a flow nobody woke costs
//! nothing.
//!
//! Wake-ups come from the router's own (single-threaded) runtime, so the lock is
//! never contended; it is there because a [`Waker`] must be `Send + Sync`.

use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};

struct Shared<K> {
    keys: Vec<K>,
    /// The router task's waker, from its last poll.
    task: Option<Waker>,
}

/// The flows woken since the last [`Ready::take`], and the wakers that record them.
pub(super) struct Ready<K> {
    shared: Arc<Mutex<Shared<K>>>,
}

impl<K> Default for Ready<K> {
    fn default() -> Self {
        Ready {
            shared: Arc::new(Mutex::new(Shared {
                keys: Vec::new(),
                task: None,
            })),
        }
    }
}

struct FlowWaker<K> {
    key: K,
    shared: Arc<Mutex<Shared<K>>>,
}

impl<K: Copy + Send + Sync + 'static> Wake for FlowWaker<K> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // A poisoned lock (a panic while it was held) still holds a usable list.
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.keys.push(self.key);
        if let Some(t) = s.task.take() {
            t.wake();
        }
    }
}

impl<K: Copy + Send + Sync + 'static> Ready<K> {
    /// A waker that marks `key` ready (and wakes the router's task).
    pub(super) fn waker(&self, key: K) -> Waker {
        Waker::from(Arc::new(FlowWaker {
            key,
            shared: Arc::clone(&self.shared),
        }))
    }

    /// Remembers the router task's waker; true if some flow is ready already.
    pub(super) fn poll(&self, task: &Waker) -> bool {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if !s.keys.is_empty() {
            return true;
        }
        match &s.task {
            Some(t) if t.will_wake(task) => {}
            _ => s.task = Some(task.clone()),
        }
        false
    }

    /// The keys woken since the last call (a key may appear more than once, and
    /// may name a flow that is gone).
    pub(super) fn take(&self, into: &mut Vec<K>) {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        into.append(&mut s.keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_flow_waker_records_its_key_and_wakes_the_task() {
        let ready = Ready::<u32>::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(Arc::clone(&count));
        assert!(!ready.poll(&task), "nothing woken yet");
        let (a, b) = (ready.waker(7), ready.waker(9));
        b.wake_by_ref();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        // The task was woken once; it is not woken again until it polls again.
        a.wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(ready.poll(&task), "keys are waiting");
        let mut keys = Vec::new();
        ready.take(&mut keys);
        assert_eq!(keys, vec![9, 7]);
        assert!(!ready.poll(&task));
        b.wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
    }
}
