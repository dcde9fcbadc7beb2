//! Counted slots per peer address, with an optional cap over all peers: what bounds the
//! connections one address may hold open and the unauthenticated long-lived streams
//! (Health/Watch, reflection) anyone may hold. A [`Slot`] gives its place back when
//! dropped, i.e. when the connection or the stream ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Counts {
    per_peer: HashMap<Option<IpAddr>, usize>,
    total: usize,
}

/// Slots of one kind (connections, or unauthenticated streams).
#[derive(Debug, Clone)]
pub struct PeerSlots {
    per_peer: usize,
    total: usize,
    counts: Arc<Mutex<Counts>>,
}

impl PeerSlots {
    /// At most `per_peer` slots per address and `total` over all.
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self {
            per_peer,
            total,
            counts: Arc::new(Mutex::new(Counts::default())),
        }
    }

    /// A slot for `peer`, or `None` when the peer or everybody is at the limit.
    pub fn try_acquire(&self, peer: Option<IpAddr>) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mine = counts.per_peer.get(&peer).copied().unwrap_or(0);
        if mine >= self.per_peer || counts.total >= self.total {
            return None;
        }
        counts.per_peer.insert(peer, mine + 1);
        counts.total += 1;
        Some(Slot {
            peer,
            counts: self.counts.clone(),
        })
    }
}

/// One taken slot; dropping it frees it.
#[derive(Debug)]
pub struct Slot {
    peer: Option<IpAddr>,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_peer_and_in_total_and_come_back() {
        let slots = PeerSlots::new(2, 3);
        let a: Option<IpAddr> = Some([10, 0, 0, 1].into());
        let b: Option<IpAddr> = Some([10, 0, 0, 2].into());
        let a1 = slots.try_acquire(a).expect("a1");
        let _a2 = slots.try_acquire(a).expect("a2");
        assert!(slots.try_acquire(a).is_none(), "per peer");
        let _b1 = slots.try_acquire(b).expect("b1");
        assert!(slots.try_acquire(b).is_none(), "in total");
        drop(a1);
        assert!(slots.try_acquire(a).is_some(), "given back");
    }
}
