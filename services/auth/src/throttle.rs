//! Login throttling with a growing lockout, per account and per peer IP.
//!
//! An attempt is **reserved** before its password is hashed ([`LoginThrottle::reserve`])
//! and settled after: attempts in flight count as failures-to-be, so however many
//! guesses arrive at once, no more than the free failures of the account (and of the
//! peer) are ever evaluated; the others get the lockout answer at once. A dropped
//! reservation (the caller went away) counts as nothing.
//!
//! The counters live in memory: a restart forgives, which is acceptable for a single
//! process (the lockout only needs to make online guessing slow, and an attacker cannot
//! restart the server). The policy and its defaults are documented on
//! [`ThrottleConfig`].

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::config::ThrottleConfig;

#[derive(Debug, Clone, Copy)]
struct Counter {
    failures: u32,
    /// Reserved attempts not settled yet.
    pending: u32,
    last_failure: SystemTime,
    locked_until: Option<SystemTime>,
}

#[derive(Debug)]
struct Table<K> {
    free_failures: u32,
    counters: Mutex<HashMap<K, Counter>>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(free_failures: u32) -> Self {
        Self {
            free_failures,
            counters: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Counter>> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `key` is still locked at `now`.
    #[cfg(test)]
    fn locked_for(&self, key: &K, now: SystemTime) -> Option<Duration> {
        let until = self.lock().get(key)?.locked_until?;
        until.duration_since(now).ok().filter(|d| !d.is_zero())
    }

    fn failure(&self, key: &K, now: SystemTime, cfg: &ThrottleConfig) {
        let mut counters = self.lock();
        if !counters.contains_key(key) && counters.len() >= cfg.max_entries {
            evict(&mut counters, now, cfg);
        }
        let counter = counters.entry(key.clone()).or_insert(Counter {
            failures: 0,
            pending: 0,
            last_failure: now,
            locked_until: None,
        });
        if now
            .duration_since(counter.last_failure)
            .is_ok_and(|idle| idle > cfg.failure_window)
        {
            counter.failures = 0;
        }
        counter.failures = counter.failures.saturating_add(1);
        counter.last_failure = now;
        if counter.failures >= self.free_failures {
            let doublings = (counter.failures - self.free_failures).min(20);
            let lockout = cfg
                .base_lockout
                .saturating_mul(1u32 << doublings)
                .min(cfg.max_lockout);
            counter.locked_until = Some(now + lockout);
        }
    }

    fn clear(&self, key: &K) {
        if let Some(c) = self.lock().get_mut(key) {
            c.failures = 0;
            c.locked_until = None;
        }
    }

    /// Whether one more attempt may be evaluated: not locked, and the failures so far
    /// plus the attempts in flight leave room below the lockout. `Err` says for how long
    /// to come back (`base_lockout` when the room is taken by attempts in flight).
    fn room(
        counters: &HashMap<K, Counter>,
        key: &K,
        free: u32,
        now: SystemTime,
        cfg: &ThrottleConfig,
    ) -> Result<(), Duration> {
        let Some(c) = counters.get(key) else {
            return Ok(());
        };
        if let Some(left) = c
            .locked_until
            .and_then(|until| until.duration_since(now).ok())
            .filter(|d| !d.is_zero())
        {
            return Err(left);
        }
        let stale = now
            .duration_since(c.last_failure)
            .is_ok_and(|idle| idle > cfg.failure_window);
        let failures = if stale { 0 } else { c.failures };
        // Below the threshold: as many in flight as failures are left. Past it (a
        // lockout just expired): one at a time, whose failure locks again at once.
        let room = free.checked_sub(failures).filter(|r| *r > 0).unwrap_or(1);
        if c.pending >= room {
            return Err(cfg.base_lockout);
        }
        Ok(())
    }

    fn add_pending(
        counters: &mut HashMap<K, Counter>,
        key: &K,
        now: SystemTime,
        cfg: &ThrottleConfig,
    ) {
        if !counters.contains_key(key) && counters.len() >= cfg.max_entries {
            evict(counters, now, cfg);
        }
        counters
            .entry(key.clone())
            .or_insert(Counter {
                failures: 0,
                pending: 0,
                last_failure: now,
                locked_until: None,
            })
            .pending += 1;
    }

    fn release(&self, key: &K) {
        if let Some(c) = self.lock().get_mut(key) {
            c.pending = c.pending.saturating_sub(1);
        }
    }
}

/// Drops counters that no longer matter; if that frees nothing, the oldest one.
fn evict<K: Hash + Eq + Clone>(
    counters: &mut HashMap<K, Counter>,
    now: SystemTime,
    cfg: &ThrottleConfig,
) {
    counters.retain(|_, c| {
        let locked = c.locked_until.is_some_and(|until| until > now) || c.pending > 0;
        let recent = now
            .duration_since(c.last_failure)
            .map_or(true, |idle| idle <= cfg.failure_window);
        locked || recent
    });
    if counters.len() >= cfg.max_entries
        && let Some(oldest) = counters
            .iter()
            .min_by_key(|(_, c)| c.last_failure)
            .map(|(k, _)| k.clone())
    {
        counters.remove(&oldest);
    }
}

/// The peer a failure is counted against: the IPv4 address, or the /64 network of an
/// IPv6 address (one host usually has a whole /64 and could hop through it).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let net = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(net.into())
            }
        },
    }
}

/// The login throttle: one table keyed by account name, one by peer IP.
#[derive(Debug)]
pub struct LoginThrottle {
    cfg: ThrottleConfig,
    accounts: Table<String>,
    peers: Table<IpAddr>,
}

impl LoginThrottle {
    pub fn new(cfg: ThrottleConfig) -> Self {
        Self {
            accounts: Table::new(cfg.account_free_failures.max(1)),
            peers: Table::new(cfg.peer_free_failures.max(1)),
            cfg,
        }
    }

    /// `Some(retry_after)` while the account or the peer is locked out.
    #[cfg(test)]
    pub fn locked_for(
        &self,
        account: &str,
        peer: Option<IpAddr>,
        now: SystemTime,
    ) -> Option<Duration> {
        let by_account = self.accounts.locked_for(&account.to_owned(), now);
        let by_peer = peer.and_then(|ip| self.peers.locked_for(&peer_key(ip), now));
        by_account.max(by_peer)
    }

    /// Counts a failed attempt against both the account and the peer.
    #[cfg(test)]
    pub fn failure(&self, account: &str, peer: Option<IpAddr>, now: SystemTime) {
        self.accounts.failure(&account.to_owned(), now, &self.cfg);
        if let Some(ip) = peer {
            self.peers.failure(&peer_key(ip), now, &self.cfg);
        }
    }

    /// Forgets the account's failures after a successful login.
    #[cfg(test)]
    pub fn success(&self, account: &str) {
        self.accounts.clear(&account.to_owned());
    }

    /// Reserves one attempt for `account` from `peer` before its password is checked;
    /// `Err(retry_after)` when the account or peer is locked, or when the attempts
    /// already in flight could lock it. Settle the reservation with
    /// [`Reservation::failed`] or [`Reservation::succeeded`]; dropping it releases it.
    pub fn reserve(
        &self,
        account: &str,
        peer: Option<IpAddr>,
        now: SystemTime,
    ) -> Result<Reservation<'_>, Duration> {
        let account = account.to_owned();
        let peer = peer.map(peer_key);
        // One order of locks everywhere: accounts, then peers.
        let mut accounts = self.accounts.lock();
        let mut peers = self.peers.lock();
        let by_account = Table::room(
            &accounts,
            &account,
            self.accounts.free_failures,
            now,
            &self.cfg,
        );
        let by_peer = peer.map_or(Ok(()), |ip| {
            Table::room(&peers, &ip, self.peers.free_failures, now, &self.cfg)
        });
        if let Err(wait) = by_account.and(by_peer) {
            let other = by_account.err().max(by_peer.err()).unwrap_or(wait);
            return Err(other);
        }
        Table::add_pending(&mut accounts, &account, now, &self.cfg);
        if let Some(ip) = peer {
            Table::add_pending(&mut peers, &ip, now, &self.cfg);
        }
        Ok(Reservation {
            throttle: self,
            account,
            peer,
            settled: false,
        })
    }
}

/// One attempt reserved by [`LoginThrottle::reserve`].
#[derive(Debug)]
pub struct Reservation<'a> {
    throttle: &'a LoginThrottle,
    account: String,
    peer: Option<IpAddr>,
    settled: bool,
}

impl Reservation<'_> {
    fn release(&mut self) {
        if !self.settled {
            self.settled = true;
            self.throttle.accounts.release(&self.account);
            if let Some(ip) = self.peer {
                self.throttle.peers.release(&ip);
            }
        }
    }

    /// The password was wrong: counts a failure against the account and the peer.
    pub fn failed(mut self, now: SystemTime) {
        self.release();
        let t = self.throttle;
        t.accounts.failure(&self.account, now, &t.cfg);
        if let Some(ip) = self.peer {
            t.peers.failure(&ip, now, &t.cfg);
        }
    }

    /// The password was right: forgets the account's failures.
    pub fn succeeded(mut self) {
        self.release();
        self.throttle.accounts.clear(&self.account);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ThrottleConfig {
        ThrottleConfig {
            account_free_failures: 3,
            peer_free_failures: 5,
            base_lockout: Duration::from_secs(10),
            max_lockout: Duration::from_secs(35),
            ..ThrottleConfig::default()
        }
    }

    #[test]
    fn lockout_grows_and_is_capped() {
        let t = LoginThrottle::new(cfg());
        let now = SystemTime::now();
        for _ in 0..2 {
            t.failure("alice", None, now);
        }
        assert_eq!(t.locked_for("alice", None, now), None);
        t.failure("alice", None, now);
        assert_eq!(
            t.locked_for("alice", None, now),
            Some(Duration::from_secs(10))
        );
        t.failure("alice", None, now);
        assert_eq!(
            t.locked_for("alice", None, now),
            Some(Duration::from_secs(20))
        );
        t.failure("alice", None, now);
        assert_eq!(
            t.locked_for("alice", None, now),
            Some(Duration::from_secs(35))
        );
        assert_eq!(t.locked_for("bob", None, now), None);
        t.success("alice");
        assert_eq!(t.locked_for("alice", None, now), None);
    }

    #[test]
    fn peers_are_counted_across_accounts() {
        let t = LoginThrottle::new(cfg());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let now = SystemTime::now();
        for i in 0..5 {
            t.failure(&format!("user{i}"), Some(ip), now);
        }
        assert!(t.locked_for("fresh", Some(ip), now).is_some());
        assert!(
            t.locked_for("fresh", Some([10, 0, 0, 2].into()), now)
                .is_none()
        );
    }

    #[test]
    fn ipv6_peers_are_counted_per_64_network() {
        let t = LoginThrottle::new(cfg());
        let now = SystemTime::now();
        for i in 0..5u16 {
            let ip: IpAddr = [0x2001, 0xdb8, 0, 1, 0, 0, 0, i].into();
            t.failure(&format!("user{i}"), Some(ip), now);
        }
        let same_net: IpAddr = [0x2001, 0xdb8, 0, 1, 9, 9, 9, 9].into();
        let other_net: IpAddr = [0x2001, 0xdb8, 0, 2, 0, 0, 0, 1].into();
        assert!(t.locked_for("x", Some(same_net), now).is_some());
        assert!(t.locked_for("x", Some(other_net), now).is_none());
    }

    #[test]
    fn table_stays_bounded() {
        let t = LoginThrottle::new(ThrottleConfig {
            max_entries: 10,
            ..cfg()
        });
        let now = SystemTime::now();
        for i in 0..100 {
            t.failure(&format!("user{i}"), None, now);
        }
        assert!(t.accounts.lock().len() <= 10);
    }
}
