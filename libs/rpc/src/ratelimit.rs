//! Rate limiting per caller and per method.
//!
//! The caller is the bearer credential when one is sent (keyed by its hash, before it is
//! verified, so a flood of bad tokens is throttled without costing verification), else
//! the peer's IP address. Each (caller, method) pair gets a token bucket; an empty bucket
//! answers RESOURCE_EXHAUSTED with RetryInfo saying when to come back. Health and
//! reflection are not limited (probes must always get through).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter as Governor};

use crate::error::ApiError;
use crate::identity::PeerInfo;

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
        }
    }

    /// Takes one request from the caller's bucket for `method`.
    pub fn check(
        &self,
        authorization: Option<&http::HeaderValue>,
        peer: &PeerInfo,
        method: &str,
    ) -> Result<(), ApiError> {
        let caller = match authorization {
            Some(value) => {
                let d = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
                let hex: String = d.as_ref()[..12]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("cred:{hex}")
            }
            None => format!(
                "peer:{}",
                peer.remote_addr
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default()
            ),
        };
        self.limiter
            .check_key(&format!("{caller} {method}"))
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let wait = wait.max(Duration::from_millis(1));
                ApiError::rate_limited(
                    format!(
                        "too many requests to {method}; retry in {} ms",
                        wait.as_millis()
                    ),
                    wait,
                )
            })
    }

    /// Forgets callers whose buckets are full again (bounded memory); call periodically.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
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
            limiter.check(None, &peer, "/a").expect("within burst");
        }
        let err = limiter.check(None, &peer, "/a").expect_err("over");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.reason(), "RATE_LIMITED");
        // Another method, and another caller, have their own buckets.
        limiter.check(None, &peer, "/b").expect("other method");
        let token = http::HeaderValue::from_static("Bearer x");
        limiter
            .check(Some(&token), &peer, "/a")
            .expect("other caller");
    }
}
