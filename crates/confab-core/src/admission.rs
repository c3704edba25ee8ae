//! Admission control: at most `max` turns run at once, whatever route they
//! came in by (`POST /chat`, `POST /chat/stream`, `/v1/chat/completions`).
//!
//! A turn past the bound is refused at once — no queue, no wait — so an
//! overloaded server answers "at capacity" in microseconds instead of letting
//! the request wait for a connection or a CPU it will not get in time, and the
//! turns already admitted keep their pace. The permit is held by the turn's
//! begin task, then by its run task, until the turn is settled (its final
//! write included).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The bound when none is configured: in effect unbounded.
pub const UNBOUNDED: usize = Semaphore::MAX_PERMITS;

/// The shared bound on concurrent turns. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    max: usize,
}

/// One admitted turn; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    /// At most `max` turns at once (at least 1; capped at [`UNBOUNDED`]).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, UNBOUNDED);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A place for one more turn, or `None` when all are taken. Never waits.
    pub fn try_admit(&self) -> Option<Admitted> {
        self.permits
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| Admitted { _permit: permit })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Every place is taken: a turn asking now would be refused.
    pub fn is_full(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Turns admitted right now.
    pub fn in_flight(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(UNBOUNDED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bound_and_frees_places_on_drop() {
        let admission = Admission::new(2);
        let a = admission.try_admit().expect("first");
        let b = admission.try_admit().expect("second");
        assert!(admission.try_admit().is_none());
        assert_eq!(admission.in_flight(), 2);
        drop(a);
        assert_eq!(admission.in_flight(), 1);
        let _c = admission.try_admit().expect("a freed place");
        drop(b);
        assert_eq!(Admission::new(0).max(), 1);
    }
}
