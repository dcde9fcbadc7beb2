//! Rate limiting in the chain, at two places around authentication (the buckets and
//! their keys are [`crate::ratelimit`]'s):
//!
//! - **before** it, by the peer's address: a PUBLIC call takes from the peer's bucket,
//!   and a call needing a token from a peer whose bucket was found empty is refused
//!   before its credential is verified (verification can cost an API-key look-up);
//! - **after** it: a verified caller takes from its own bucket; a call whose credential
//!   did not check out takes from the peer's, and a rate-limit refusal then wins over the
//!   authentication error.
//!
//! Health and reflection are never limited: probes must always get through.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tonic::body::Body;

use kiln_metrics::{Counter, Family};

use super::metrics::{MethodLabels, RpcMetrics};
use super::{Admission, Route};
use crate::access::Access;
use crate::error::ApiError;
use crate::identity::{PeerInfo, Principal};
use crate::ratelimit::RateLimiter;

/// Where in the chain a [`RateLimitCheck`] sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitStage {
    BeforeAuthentication,
    AfterAuthentication,
}

/// One of the two rate-limit admissions; both share the listener's [`RateLimiter`].
#[derive(Debug, Clone)]
pub struct RateLimitCheck {
    limiter: Arc<RateLimiter>,
    stage: RateLimitStage,
    /// Refusals by method, when the listener has metrics.
    refused: Option<Family<MethodLabels, Counter>>,
}

impl RateLimitCheck {
    pub fn new(limiter: Arc<RateLimiter>, stage: RateLimitStage) -> Self {
        Self {
            limiter,
            stage,
            refused: None,
        }
    }

    /// Counts refusals in `metrics` (`kiln_rpc_rate_limited_total`).
    pub fn with_metrics(mut self, metrics: &RpcMetrics) -> Self {
        self.refused = Some(metrics.rate_limited.clone());
        self
    }

    fn check(&self, request: &Request<Body>) -> Result<(), ApiError> {
        let Some(route) = Route::of(request) else {
            return Err(Route::missing());
        };
        let Route::Rpc(access) = route else {
            return Ok(());
        };
        let path = request.uri().path();
        let default_peer = PeerInfo::default();
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .unwrap_or(&default_peer);
        match (self.stage, access) {
            (RateLimitStage::BeforeAuthentication, Access::Public) => {
                self.limiter.check_peer(peer, path)
            }
            (
                RateLimitStage::BeforeAuthentication,
                Access::Viewer | Access::User | Access::Admin,
            ) => self.limiter.refuse_blocked_peer(peer, path),
            (RateLimitStage::AfterAuthentication, Access::Public)
            | (RateLimitStage::BeforeAuthentication, Access::Service) => Ok(()),
            (RateLimitStage::AfterAuthentication, _) => {
                match request.extensions().get::<Principal>() {
                    Some(principal) => self.limiter.check_principal(principal, path),
                    None => self.limiter.check_peer(peer, path),
                }
            }
        }
    }
}

impl Admission for RateLimitCheck {
    fn admit_now(&self, request: &mut Request<Body>) -> Option<Result<(), ApiError>> {
        let checked = self.check(request);
        if let (Err(err), Some(refused)) = (&checked, &self.refused)
            && err.reason() == crate::error::reason::RATE_LIMITED
        {
            // Only paths the access layer admitted get here: the label set is bounded.
            refused
                .get_or_create(&MethodLabels::of_path(request.uri().path()))
                .inc();
        }
        Some(checked)
    }
}

/// Periodically drops the state of idle callers, so memory stays bounded; ends when the
/// limiter is gone.
pub fn spawn_housekeeping(
    limiter: &Arc<RateLimiter>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let limiter = Arc::downgrade(limiter);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            let Some(limiter) = limiter.upgrade() else {
                return;
            };
            limiter.forget_idle();
        }
    })
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::error::reason;
    use crate::identity::WorkloadId;
    use crate::layer::AuthenticationFailed;
    use crate::ratelimit::RateLimit;

    /// Two calls per method and caller, then refusals.
    fn checks() -> (RateLimitCheck, RateLimitCheck) {
        let limiter = Arc::new(RateLimiter::new(RateLimit {
            per_second: NonZeroU32::new(1).expect("non-zero"),
            burst: NonZeroU32::new(2).expect("non-zero"),
        }));
        (
            RateLimitCheck::new(limiter.clone(), RateLimitStage::BeforeAuthentication),
            RateLimitCheck::new(limiter, RateLimitStage::AfterAuthentication),
        )
    }

    fn request(route: Route, principal: Option<Principal>) -> Request<Body> {
        let mut request = crate::layer::testing::request("/kiln.build.v1.BuildService/GetBuild");
        request.extensions_mut().insert(route);
        request.extensions_mut().insert(PeerInfo {
            remote_addr: Some("127.0.0.1:4000".parse().expect("addr")),
            ..PeerInfo::default()
        });
        match principal {
            Some(principal) => {
                request.extensions_mut().insert(principal);
            }
            None => {
                request
                    .extensions_mut()
                    .insert(AuthenticationFailed(ApiError::unauthenticated(
                        reason::INVALID_TOKEN,
                        "bad",
                    )));
            }
        }
        request
    }

    fn alice() -> Principal {
        Principal::workload(&WorkloadId {
            trust_domain: "kiln.local".into(),
            service: "alice".into(),
        })
    }

    fn rate_limited(result: Result<(), ApiError>) -> bool {
        result.is_err_and(|e| e.reason() == reason::RATE_LIMITED)
    }

    #[test]
    fn public_calls_are_limited_by_peer_before_authentication() {
        let (before, after) = checks();
        let public = request(Route::Rpc(Access::Public), None);
        before.check(&public).expect("1");
        before.check(&public).expect("2");
        assert!(rate_limited(before.check(&public)));
        after.check(&public).expect("not charged twice");
    }

    #[test]
    fn failed_credentials_share_the_peer_bucket_and_a_blocked_peer_is_refused_before_verification()
    {
        let (before, after) = checks();
        let junk = request(Route::Rpc(Access::User), None);
        before.check(&junk).expect("not blocked yet");
        after.check(&junk).expect("1");
        after.check(&junk).expect("2");
        assert!(
            rate_limited(after.check(&junk)),
            "junk does not buy a fresh bucket"
        );
        assert!(
            rate_limited(before.check(&junk)),
            "the next credential is not even verified"
        );
        // A verified caller behind the same address has its own bucket.
        let verified = request(Route::Rpc(Access::Service), Some(alice()));
        after.check(&verified).expect("own bucket");
    }

    #[test]
    fn verified_callers_have_their_own_bucket_and_infrastructure_is_never_limited() {
        let (before, after) = checks();
        let verified = request(Route::Rpc(Access::User), Some(alice()));
        after.check(&verified).expect("1");
        after.check(&verified).expect("2");
        assert!(rate_limited(after.check(&verified)));
        let health = request(Route::Infrastructure, None);
        for _ in 0..10 {
            before.check(&health).expect("probes get through");
            after.check(&health).expect("probes get through");
        }
    }

    #[test]
    fn a_chain_without_the_access_layer_refuses() {
        let (before, _) = checks();
        let bare = crate::layer::testing::request("/kiln.build.v1.BuildService/GetBuild");
        let err = before.check(&bare).expect_err("fails closed");
        assert_eq!(err.code(), tonic::Code::Internal);
    }
}
