//! Rate limiting per caller and per method.
//!
//! The caller is the **verified** identity: the principal's subject (user id, or a
//! workload's SPIFFE id) once the credential checked out. Anything else — PUBLIC RPCs,
//! missing, malformed or invalid credentials — is keyed by the peer's IP address, so a
//! junk `authorization` header per request does not buy a fresh bucket. A peer whose
//! bucket for a method is empty is refused before its next credential is verified
//! (verification can cost an API-key look-up at kiln-auth); that refusal is shared by
//! every caller behind the address until the bucket refills.
//!
//! Each (caller, method) pair gets a token bucket; an empty bucket answers
//! RESOURCE_EXHAUSTED with RetryInfo saying when to come back. Health and reflection are
//! not limited (probes must always get through).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter as Governor};

use crate::error::ApiError;
use crate::identity::{PeerInfo, Principal};

/// Requests per second and burst per (caller, method).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second. Default: 200.
    pub per_second: NonZeroU32,
    /// Requests allowed at once before the sustained rate applies. Default: 400.
    pub burst: NonZeroU32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: NonZeroU32::new(200).expect("non-zero"),
            burst: NonZeroU32::new(400).expect("non-zero"),
        }
    }
}

type Keyed = Governor<String, governor::state::keyed::DefaultKeyedStateStore<String>, DefaultClock>;

/// The keyed limiter of one listener.
pub struct RateLimiter {
    limiter: Keyed,
    /// Peer buckets found empty, and until when: refused before verification.
    blocked: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("keys", &self.limiter.len())
            .finish()
    }
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        Self {
            limiter: Governor::keyed(quota),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    fn peer_key(peer: &PeerInfo, method: &str) -> String {
        let ip = peer
            .remote_addr
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        format!("peer:{ip} {method}")
    }

    /// Takes one request from the bucket of a verified principal.
    pub fn check_principal(&self, principal: &Principal, method: &str) -> Result<(), ApiError> {
        self.take(&format!("sub:{} {method}", principal.subject), method)
    }

    /// Takes one request from the peer's bucket (unauthenticated or invalid callers).
    pub fn check_peer(&self, peer: &PeerInfo, method: &str) -> Result<(), ApiError> {
        let key = Self::peer_key(peer, method);
        self.take(&key, method).inspect_err(|err| {
            if let Some(wait) = err.retry_delay() {
                let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
                if blocked.len() >= MAX_BLOCKED {
                    blocked.clear();
                }
                blocked.insert(key.clone(), Instant::now() + wait);
            }
        })
    }

    /// Refuses a peer whose bucket for `method` was found empty and has not refilled.
    pub fn refuse_blocked_peer(&self, peer: &PeerInfo, method: &str) -> Result<(), ApiError> {
        let key = Self::peer_key(peer, method);
        let until = self
            .blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        match until.map(|u| u.saturating_duration_since(Instant::now())) {
            Some(wait) if !wait.is_zero() => Err(too_many(method, wait)),
            _ => Ok(()),
        }
    }

    fn take(&self, key: &str, method: &str) -> Result<(), ApiError> {
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                too_many(method, wait.max(Duration::from_millis(1)))
            })
    }

    /// Forgets callers whose buckets are full again (bounded memory); call periodically.
    pub fn forget_idle(&self) {
        let now = Instant::now();
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, until| *until > now);
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Most remembered blocked peers; past it the memory starts over (they are refused by
/// their empty buckets anyway, just after a verification).
const MAX_BLOCKED: usize = 100_000;

fn too_many(method: &str, wait: Duration) -> ApiError {
    ApiError::rate_limited(
        format!(
            "too many requests to {method}; retry in {} ms",
            wait.as_millis()
        ),
        wait,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_over_its_burst_is_told_when_to_retry_and_others_are_not_affected() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: NonZeroU32::new(1).expect("non-zero"),
            burst: NonZeroU32::new(3).expect("non-zero"),
        });
        let peer = PeerInfo {
            remote_addr: Some("127.0.0.1:5000".parse().expect("addr")),
            ..PeerInfo::default()
        };
        for _ in 0..3 {
            limiter.check_peer(&peer, "/a").expect("within burst");
        }
        let err = limiter.check_peer(&peer, "/a").expect_err("over");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.reason(), "RATE_LIMITED");
        limiter
            .refuse_blocked_peer(&peer, "/a")
            .expect_err("blocked before verification");
        // Another method, and a verified caller, have their own buckets.
        limiter.check_peer(&peer, "/b").expect("other method");
        limiter
            .refuse_blocked_peer(&peer, "/b")
            .expect("not blocked");
        let alice = Principal::workload(&crate::identity::WorkloadId {
            trust_domain: "kiln.local".into(),
            service: "build".into(),
        });
        limiter.check_principal(&alice, "/a").expect("other caller");
    }
}
