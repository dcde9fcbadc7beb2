//! Login throttling with a growing lockout, per account and per peer IP, kept in the
//! store so that every auth replica on one database counts the same guesses: a second
//! replica is not a second set of guesses.
//!
//! An attempt is **reserved** before its password is hashed ([`LoginThrottle::reserve`])
//! and settled after: attempts in flight (rows of `login_attempts`) count as
//! failures-to-be, so however many guesses arrive at once, on however many replicas, no
//! more than the free failures of the account (and of the peer) are ever evaluated; the
//! others get the lockout answer at once. Reserving is one write transaction (SQLite's
//! one writer, or the per-schema advisory lock of `kiln_store::Database::begin` on
//! Postgres), so two reservations never both see the last free slot. A dropped
//! reservation (the caller went away) counts as nothing; one whose replica died stops
//! counting after [`RESERVATION_TTL`]. The policy and its defaults are documented on
//! [`ThrottleConfig`].

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use sqlx::Row;

use crate::config::ThrottleConfig;
use crate::error::Result;
use crate::store::{Store, duration_millis, from_millis, millis};

/// How long an unsettled reservation counts: far longer than a password check.
pub const RESERVATION_TTL: Duration = Duration::from_secs(60);

const ACCOUNT: &str = "account";
const PEER: &str = "peer";

/// One key's counter as stored.
#[derive(Debug, Clone, Copy)]
struct Counter {
    failures: u32,
    last_failure: SystemTime,
    locked_until: Option<SystemTime>,
}

/// Whether one more attempt may be evaluated: not locked, and the failures so far plus
/// the attempts in flight leave room below the lockout. `Err` says for how long to come
/// back (`base_lockout` when the room is taken by attempts in flight).
fn room(
    counter: Option<Counter>,
    pending: u32,
    free: u32,
    now: SystemTime,
    cfg: &ThrottleConfig,
) -> std::result::Result<(), Duration> {
    let (failures, locked_until) = match counter {
        Some(c) => {
            let stale = now
                .duration_since(c.last_failure)
                .is_ok_and(|idle| idle > cfg.failure_window);
            (if stale { 0 } else { c.failures }, c.locked_until)
        }
        None => (0, None),
    };
    if let Some(left) = locked_until
        .and_then(|until| until.duration_since(now).ok())
        .filter(|d| !d.is_zero())
    {
        return Err(left);
    }
    // Below the threshold: as many in flight as failures are left. Past it (a lockout
    // just expired): one at a time, whose failure locks again at once.
    let room = free.checked_sub(failures).filter(|r| *r > 0).unwrap_or(1);
    if pending >= room {
        return Err(cfg.base_lockout);
    }
    Ok(())
}

/// The counter after one more failure at `now`.
fn after_failure(
    counter: Option<Counter>,
    free: u32,
    now: SystemTime,
    cfg: &ThrottleConfig,
) -> Counter {
    let mut c = counter.unwrap_or(Counter {
        failures: 0,
        last_failure: now,
        locked_until: None,
    });
    if now
        .duration_since(c.last_failure)
        .is_ok_and(|idle| idle > cfg.failure_window)
    {
        c.failures = 0;
    }
    c.failures = c.failures.saturating_add(1);
    c.last_failure = now;
    if c.failures >= free {
        let doublings = (c.failures - free).min(20);
        let lockout = cfg
            .base_lockout
            .saturating_mul(1u32 << doublings)
            .min(cfg.max_lockout);
        c.locked_until = Some(now + lockout);
    }
    c
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

async fn counter(conn: &mut sqlx::AnyConnection, kind: &str, key: &str) -> Result<Option<Counter>> {
    let row = sqlx::query(
        "SELECT failures, last_failure, locked_until FROM login_counters \
         WHERE kind = $1 AND key = $2",
    )
    .bind(kind)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| {
        Ok(Counter {
            failures: u32::try_from(r.try_get::<i64, _>("failures")?).unwrap_or(u32::MAX),
            last_failure: from_millis(r.try_get("last_failure")?),
            locked_until: r
                .try_get::<Option<i64>, _>("locked_until")?
                .map(from_millis),
        })
    })
    .transpose()
}

async fn pending(
    conn: &mut sqlx::AnyConnection,
    kind: &str,
    key: &str,
    now: SystemTime,
) -> Result<u32> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM login_attempts WHERE kind = $1 AND key = $2 AND expires_at > $3",
    )
    .bind(kind)
    .bind(key)
    .bind(millis(now))
    .fetch_one(&mut *conn)
    .await?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// The login throttle: counters keyed by account name and by peer IP, in the store.
#[derive(Debug)]
pub struct LoginThrottle {
    cfg: ThrottleConfig,
}

impl LoginThrottle {
    pub fn new(cfg: ThrottleConfig) -> Self {
        Self { cfg }
    }

    fn free(&self, kind: &str) -> u32 {
        match kind {
            ACCOUNT => self.cfg.account_free_failures.max(1),
            _ => self.cfg.peer_free_failures.max(1),
        }
    }

    /// Reserves one attempt for `account` from `peer` before its password is checked;
    /// `Ok(Err(retry_after))` when the account or peer is locked, or when the attempts
    /// already in flight (on any replica) could lock it. Settle the reservation with
    /// [`Reservation::failed`] or [`Reservation::succeeded`]; dropping it releases it.
    pub async fn reserve<'a>(
        &'a self,
        store: &Store,
        account: &str,
        peer: Option<IpAddr>,
        now: SystemTime,
    ) -> Result<std::result::Result<Reservation<'a>, Duration>> {
        // The store keeps milliseconds: reckon in them, so that a lockout read back
        // lasts exactly as long as it was set for.
        let now = from_millis(millis(now));
        let mut keys = vec![(ACCOUNT, account.to_owned())];
        if let Some(ip) = peer {
            keys.push((PEER, peer_key(ip).to_string()));
        }
        let mut tx = store.begin().await?;
        let mut refusal: Option<Duration> = None;
        for (kind, key) in &keys {
            let c = counter(&mut tx, kind, key).await?;
            let p = pending(&mut tx, kind, key, now).await?;
            if let Err(wait) = room(c, p, self.free(kind), now, &self.cfg) {
                refusal = refusal.max(Some(wait));
            }
        }
        if let Some(wait) = refusal {
            return Ok(Err(wait));
        }
        let id = uuid::Uuid::new_v4().to_string();
        for (kind, key) in &keys {
            sqlx::query(
                "INSERT INTO login_attempts (id, kind, key, expires_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&id)
            .bind(*kind)
            .bind(key)
            .bind(millis(now).saturating_add(duration_millis(RESERVATION_TTL)))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Ok(Reservation {
            throttle: self,
            store: store.clone(),
            id: Some(id),
            keys,
        }))
    }

    /// Counts a failure against `keys` and forgets the attempt `id`, in one transaction;
    /// also drops counters and attempts that no longer matter (the table stays as small
    /// as the guessing going on).
    async fn failed(
        &self,
        store: &Store,
        id: &str,
        keys: &[(&'static str, String)],
        now: SystemTime,
    ) -> Result<()> {
        let now = from_millis(millis(now));
        let mut tx = store.begin().await?;
        release(&mut tx, id).await?;
        for (kind, key) in keys {
            let c = counter(&mut tx, kind, key).await?;
            let c = after_failure(c, self.free(kind), now, &self.cfg);
            sqlx::query(
                "INSERT INTO login_counters (kind, key, failures, last_failure, locked_until) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, key) DO UPDATE SET \
                 failures = excluded.failures, last_failure = excluded.last_failure, \
                 locked_until = excluded.locked_until",
            )
            .bind(*kind)
            .bind(key)
            .bind(i64::from(c.failures))
            .bind(millis(c.last_failure))
            .bind(c.locked_until.map(millis))
            .execute(&mut *tx)
            .await?;
        }
        let now_ms = millis(now);
        sqlx::query(
            "DELETE FROM login_counters WHERE last_failure < $1 \
             AND (locked_until IS NULL OR locked_until < $2)",
        )
        .bind(now_ms.saturating_sub(duration_millis(self.cfg.failure_window)))
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        for kind in [ACCOUNT, PEER] {
            bound(&mut tx, kind, self.cfg.max_entries).await?;
        }
        sqlx::query("DELETE FROM login_attempts WHERE expires_at < $1")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets the account's failures and the attempt `id`.
    async fn succeeded(&self, store: &Store, id: &str, account: &str) -> Result<()> {
        let mut tx = store.begin().await?;
        release(&mut tx, id).await?;
        sqlx::query("DELETE FROM login_counters WHERE kind = $1 AND key = $2")
            .bind(ACCOUNT)
            .bind(account)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Keeps at most `max` counters of `kind` (after the stale ones went): the oldest go
/// first. A guesser cycling through names cannot grow the table without bound.
async fn bound(conn: &mut sqlx::AnyConnection, kind: &str, max: usize) -> Result<()> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM login_counters WHERE kind = $1")
        .bind(kind)
        .fetch_one(&mut *conn)
        .await?;
    let excess = count.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
    if excess <= 0 {
        return Ok(());
    }
    let oldest: Vec<String> = sqlx::query_scalar(
        "SELECT key FROM login_counters WHERE kind = $1 ORDER BY last_failure LIMIT $2",
    )
    .bind(kind)
    .bind(excess)
    .fetch_all(&mut *conn)
    .await?;
    for key in oldest {
        sqlx::query("DELETE FROM login_counters WHERE kind = $1 AND key = $2")
            .bind(kind)
            .bind(key)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn release(conn: &mut sqlx::AnyConnection, id: &str) -> Result<()> {
    sqlx::query("DELETE FROM login_attempts WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One attempt reserved by [`LoginThrottle::reserve`].
#[derive(Debug)]
pub struct Reservation<'a> {
    throttle: &'a LoginThrottle,
    store: Store,
    /// `None` once settled.
    id: Option<String>,
    keys: Vec<(&'static str, String)>,
}

impl Reservation<'_> {
    /// The password was wrong: counts a failure against the account and the peer.
    pub async fn failed(mut self, now: SystemTime) -> Result<()> {
        let id = self.id.take().expect("unsettled");
        self.throttle
            .failed(&self.store, &id, &self.keys, now)
            .await
    }

    /// The password was right: forgets the account's failures.
    pub async fn succeeded(mut self) -> Result<()> {
        let id = self.id.take().expect("unsettled");
        self.throttle
            .succeeded(&self.store, &id, &self.keys[0].1)
            .await
    }
}

impl Drop for Reservation<'_> {
    /// The caller went away before the password was checked: the attempt counts as
    /// nothing. The delete runs on its own (Drop cannot wait); until it has run, or if
    /// it fails, the row stops counting at its expiry.
    fn drop(&mut self) {
        if let Some(id) = self.id.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let store = self.store.clone();
            handle.spawn(async move {
                if let Ok(mut conn) = store.write.acquire().await {
                    let _ = release(&mut conn, &id).await;
                }
            });
        }
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

    fn locked_for(c: Counter, now: SystemTime) -> Option<Duration> {
        c.locked_until?.duration_since(now).ok()
    }

    #[test]
    fn lockout_grows_and_is_capped() {
        let cfg = cfg();
        let now = SystemTime::now();
        let mut c = None;
        for _ in 0..2 {
            c = Some(after_failure(c, 3, now, &cfg));
        }
        assert_eq!(locked_for(c.unwrap(), now), None);
        for want in [10, 20, 35, 35] {
            c = Some(after_failure(c, 3, now, &cfg));
            assert_eq!(locked_for(c.unwrap(), now), Some(Duration::from_secs(want)));
        }
    }

    #[test]
    fn attempts_in_flight_take_the_room() {
        let cfg = cfg();
        let now = SystemTime::now();
        assert!(room(None, 2, 3, now, &cfg).is_ok());
        assert_eq!(room(None, 3, 3, now, &cfg), Err(cfg.base_lockout));
        let c = after_failure(None, 3, now, &cfg);
        assert!(room(Some(c), 1, 3, now, &cfg).is_ok());
        assert_eq!(room(Some(c), 2, 3, now, &cfg), Err(cfg.base_lockout));
        // Failures older than the window are forgotten.
        let later = now + cfg.failure_window + Duration::from_secs(1);
        assert!(room(Some(c), 2, 3, later, &cfg).is_ok());
    }

    #[test]
    fn ipv6_peers_are_counted_per_64_network() {
        let a: IpAddr = [0x2001, 0xdb8, 0, 1, 0, 0, 0, 1].into();
        let b: IpAddr = [0x2001, 0xdb8, 0, 1, 9, 9, 9, 9].into();
        let other: IpAddr = [0x2001, 0xdb8, 0, 2, 0, 0, 0, 1].into();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key(other));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(peer_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }
}
