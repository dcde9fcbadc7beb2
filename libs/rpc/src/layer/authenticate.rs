//! Who is calling: the end user behind the bearer credential (an access token or an API
//! key, checked by the listener's [`Authenticator`]) for VIEWER/USER/ADMIN RPCs, the kiln
//! workload of the client certificate for SERVICE RPCs, nobody for PUBLIC ones.
//!
//! This layer decides identity only and refuses nothing itself: it leaves the
//! [`Principal`] — or, when the credential did not check out, an
//! [`AuthenticationFailed`] — in the extensions. The rate limit after it charges the
//! right bucket by that outcome, and [`super::authorize`] refuses. The `authorization`
//! header stays on the request: a handler acting on the caller's behalf (the agent,
//! calling kiln-build as the user) forwards it.

use std::sync::Arc;

use futures::future::BoxFuture;
use http::{HeaderValue, Request};
use tonic::body::Body;

use super::{Admission, Route};
use crate::access::Access;
use crate::error::{ApiError, reason};
use crate::identity::{Authenticator, BearerToken, PeerInfo, Principal};
use crate::token::audience_admits;

/// Left in the request extensions when the credential did not check out.
#[derive(Debug, Clone)]
pub struct AuthenticationFailed(pub ApiError);

/// The authentication admission.
pub struct Authenticate {
    authenticator: Arc<dyn Authenticator>,
    /// SERVICE RPCs accept workload certificates of this trust domain only.
    trust_domain: String,
}

impl std::fmt::Debug for Authenticate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticate")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Authenticate {
    pub fn new(authenticator: Arc<dyn Authenticator>, trust_domain: String) -> Self {
        Self {
            authenticator,
            trust_domain,
        }
    }

    /// The end user behind the bearer credential, when that is known without I/O;
    /// `None` to ask [`Self::user_principal`].
    fn user_principal_now(
        &self,
        authorization: Option<&HeaderValue>,
        peer: &PeerInfo,
        path: &str,
    ) -> Option<Result<Principal, ApiError>> {
        let token = match bearer_token(authorization) {
            Ok(token) => token,
            Err(err) => return Some(Err(err)),
        };
        let outcome = self.authenticator.authenticate_now(&token, peer)?;
        Some(outcome.and_then(|principal| within_audience(principal, path)))
    }

    /// The end user behind the bearer credential.
    async fn user_principal(
        &self,
        authorization: Option<&HeaderValue>,
        peer: &PeerInfo,
        path: &str,
    ) -> Result<Principal, ApiError> {
        let token = bearer_token(authorization)?;
        let principal = self.authenticator.authenticate(&token, peer).await?;
        within_audience(principal, path)
    }

    fn workload_principal(&self, peer: &PeerInfo) -> Result<Principal, ApiError> {
        match &peer.workload {
            Some(id) if id.trust_domain == self.trust_domain => Ok(Principal::workload(id)),
            Some(id) => Err(ApiError::permission_denied(
                reason::WORKLOAD_IDENTITY_REQUIRED,
                format!("workload {id} is not of trust domain {}", self.trust_domain),
            )),
            None if peer.client_certificate => Err(ApiError::permission_denied(
                reason::WORKLOAD_IDENTITY_REQUIRED,
                "this RPC is for kiln services; the client certificate has no kiln workload identity",
            )),
            None => Err(ApiError::unauthenticated(
                reason::WORKLOAD_IDENTITY_REQUIRED,
                "this RPC is for kiln services and needs a workload client certificate",
            )),
        }
    }
}

/// The bearer credential of a call that needs one.
fn bearer_token(authorization: Option<&HeaderValue>) -> Result<BearerToken, ApiError> {
    BearerToken::from_header(authorization)?.ok_or_else(|| {
        ApiError::unauthenticated(
            reason::MISSING_CREDENTIALS,
            "this RPC needs `authorization: Bearer <token>` (log in, or use an API key)",
        )
    })
}

/// `principal`, unless it is a delegation and `path` is outside its audience: a
/// delegated token is valid at the one service it was minted for — never at kiln-auth (no
/// API keys, sessions or further delegations from it), never at the agent. Checked here,
/// for every authenticator and on both paths, before any handler runs.
fn within_audience(principal: Principal, path: &str) -> Result<Principal, ApiError> {
    if let Some(scope) = &principal.scope
        && !audience_admits(&scope.audience, path)
    {
        return Err(ApiError::unauthenticated(
            reason::TOKEN_AUDIENCE_MISMATCH,
            format!(
                "this delegated token is for {}, not for {path}",
                scope.audience
            ),
        ));
    }
    Ok(principal)
}

/// Leaves the outcome in the extensions (`None`: a PUBLIC call, nobody to name).
fn record(request: &mut Request<Body>, outcome: Option<Result<Principal, ApiError>>) {
    match outcome {
        None => {}
        Some(Ok(principal)) => {
            let span = tracing::Span::current();
            if !span.is_disabled() {
                // "spiffe://…/service/agent on behalf of alice" for a delegation.
                span.record("principal", principal.describe().as_str());
            }
            request.extensions_mut().insert(principal);
        }
        Some(Err(err)) => {
            request.extensions_mut().insert(AuthenticationFailed(err));
        }
    }
}

impl Admission for Authenticate {
    fn admit_now(&self, request: &mut Request<Body>) -> Option<Result<(), ApiError>> {
        let access = match Route::of(request) {
            None => return Some(Err(Route::missing())),
            Some(Route::Infrastructure) => return Some(Ok(())),
            Some(Route::Rpc(access)) => access,
        };
        let outcome = match access {
            Access::Public => None,
            Access::Service => {
                let peer = request.extensions().get::<PeerInfo>();
                Some(self.workload_principal(peer.unwrap_or(&PeerInfo::default())))
            }
            Access::Viewer | Access::User | Access::Admin => {
                let default_peer = PeerInfo::default();
                let peer = request
                    .extensions()
                    .get::<PeerInfo>()
                    .unwrap_or(&default_peer);
                let authorization = request.headers().get(http::header::AUTHORIZATION);
                Some(self.user_principal_now(authorization, peer, request.uri().path())?)
            }
        };
        record(request, outcome);
        Some(Ok(()))
    }

    fn admit_later<'a>(
        &'a self,
        request: &'a mut Request<Body>,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            // Only user credentials need I/O; anything else admit_now decides.
            if !matches!(
                Route::of(request),
                Some(Route::Rpc(Access::Viewer | Access::User | Access::Admin))
            ) {
                return self
                    .admit_now(request)
                    .unwrap_or_else(|| Err(Route::missing()));
            }
            // Copied out:
            // the request (its body) is not Sync, so it is not held across the
            // verification's await.
            let peer = request
                .extensions()
                .get::<PeerInfo>()
                .cloned()
                .unwrap_or_default();
            let authorization = request.headers().get(http::header::AUTHORIZATION).cloned();
            let path = request.uri().path().to_owned();
            let outcome = self
                .user_principal(authorization.as_ref(), &peer, &path)
                .await;
            record(request, Some(outcome));
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AuthMethod, DelegationScope, Role, WorkloadId};

    /// Accepts the token `alice` (role user) and `delegated` (scoped to kiln-build),
    /// through `authenticate` only (as for a token not seen before) or through
    /// `authenticate_now` too (as for a cached one).
    struct Fixed {
        decides_now: bool,
    }

    impl Fixed {
        fn check(token: &BearerToken) -> Result<Principal, ApiError> {
            let scope = match token.as_str() {
                "alice" => None,
                "delegated" => Some(DelegationScope {
                    audience: crate::token::BUILD_AUDIENCE.into(),
                    task_id: "t1".into(),
                    workspace_id: None,
                }),
                _ => return Err(ApiError::unauthenticated(reason::INVALID_TOKEN, "no")),
            };
            Ok(Principal {
                subject: "u-alice".into(),
                username: "alice".into(),
                role: Some(Role::User),
                auth_method: AuthMethod::Token,
                expires_at: None,
                session_id: None,
                api_key_id: None,
                actor: None,
                scope,
            })
        }
    }

    impl Authenticator for Fixed {
        fn authenticate<'a>(
            &'a self,
            token: &'a BearerToken,
            _peer: &'a PeerInfo,
        ) -> BoxFuture<'a, Result<Principal, ApiError>> {
            Box::pin(async move { Self::check(token) })
        }

        fn authenticate_now(
            &self,
            token: &BearerToken,
            _peer: &PeerInfo,
        ) -> Option<Result<Principal, ApiError>> {
            self.decides_now.then(|| Self::check(token))
        }
    }

    /// What the layer leaves for a call, the same whether the authenticator decides at
    /// once or only after I/O: the principal, the failure's reason, the request.
    async fn outcome(
        path: &str,
        access: Access,
        token: Option<&str>,
        peer: PeerInfo,
    ) -> (Option<Principal>, Option<String>, Request<Body>) {
        let mut outcomes = Vec::new();
        for decides_now in [false, true] {
            let layer = Authenticate::new(Arc::new(Fixed { decides_now }), "kiln.local".into());
            let mut request = crate::layer::testing::request(path);
            request.extensions_mut().insert(Route::Rpc(access));
            request.extensions_mut().insert(peer.clone());
            if let Some(token) = token {
                request.headers_mut().insert(
                    http::header::AUTHORIZATION,
                    HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
                );
            }
            match layer.admit_now(&mut request) {
                Some(admitted) => admitted.expect("refuses nothing"),
                None => {
                    assert!(
                        !decides_now,
                        "an authenticator that decides now is not waited for"
                    );
                    layer
                        .admit_later(&mut request)
                        .await
                        .expect("refuses nothing");
                }
            }
            let principal = request.extensions().get::<Principal>().cloned();
            let failure = request
                .extensions()
                .get::<AuthenticationFailed>()
                .map(|f| f.0.reason().to_owned());
            outcomes.push((principal, failure, request));
        }
        let now = outcomes.pop().expect("two");
        let later = outcomes.pop().expect("two");
        assert_eq!((&now.0, &now.1), (&later.0, &later.1), "both paths agree");
        now
    }

    const GET_BUILD: &str = "/kiln.build.v1.BuildService/GetBuild";

    #[tokio::test]
    async fn a_valid_token_leaves_the_principal_and_the_credential_for_delegation() {
        let (principal, failure, request) =
            outcome(GET_BUILD, Access::User, Some("alice"), PeerInfo::default()).await;
        assert_eq!(principal.expect("authenticated").username, "alice");
        assert_eq!(failure, None);
        assert_eq!(
            request.headers()[http::header::AUTHORIZATION],
            "Bearer alice",
            "handlers acting for the caller forward it"
        );
    }

    #[tokio::test]
    async fn missing_malformed_and_invalid_credentials_are_recorded_as_failures() {
        for (token, expected) in [
            (None, reason::MISSING_CREDENTIALS),
            (Some("a b"), reason::MALFORMED_CREDENTIALS),
            (Some("mallory"), reason::INVALID_TOKEN),
        ] {
            let (principal, failure, _) =
                outcome(GET_BUILD, Access::Viewer, token, PeerInfo::default()).await;
            assert_eq!(principal, None, "{token:?}");
            assert_eq!(failure.as_deref(), Some(expected), "{token:?}");
        }
    }

    #[tokio::test]
    async fn a_delegated_token_is_refused_outside_its_audience() {
        let (principal, _, _) = outcome(
            GET_BUILD,
            Access::User,
            Some("delegated"),
            PeerInfo::default(),
        )
        .await;
        assert!(principal.is_some(), "valid at kiln-build");
        let (principal, failure, _) = outcome(
            "/kiln.auth.v1.AuthService/CreateApiKey",
            Access::User,
            Some("delegated"),
            PeerInfo::default(),
        )
        .await;
        assert_eq!(principal, None);
        assert_eq!(failure.as_deref(), Some(reason::TOKEN_AUDIENCE_MISMATCH));
    }

    #[tokio::test]
    async fn service_rpcs_take_only_workloads_of_the_trust_domain() {
        let workload = |domain: &str| PeerInfo {
            client_certificate: true,
            workload: Some(WorkloadId {
                trust_domain: domain.into(),
                service: "agent".into(),
            }),
            ..PeerInfo::default()
        };
        let (principal, _, _) =
            outcome(GET_BUILD, Access::Service, None, workload("kiln.local")).await;
        assert_eq!(
            principal.expect("workload").auth_method,
            AuthMethod::Workload
        );
        let (principal, failure, _) = outcome(
            GET_BUILD,
            Access::Service,
            Some("alice"),
            workload("evil.example"),
        )
        .await;
        assert_eq!(principal, None, "a token does not make a workload");
        assert_eq!(failure.as_deref(), Some(reason::WORKLOAD_IDENTITY_REQUIRED));
    }

    #[tokio::test]
    async fn public_calls_are_not_authenticated_even_with_a_token() {
        let (principal, failure, _) = outcome(
            GET_BUILD,
            Access::Public,
            Some("alice"),
            PeerInfo::default(),
        )
        .await;
        assert_eq!((principal, failure), (None, None));
    }
}
