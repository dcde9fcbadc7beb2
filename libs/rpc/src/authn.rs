//! Token verification for every kiln service: the [`Authenticator`] the layer calls.
//!
//! - **Access JWTs** are verified locally against the JWKS fetched from kiln-auth over
//!   mTLS. The key set is cached; a token with an unknown `kid` triggers a refetch, at
//!   most once per `jwks_min_refresh` (1 s), so a flood of forged kids cannot hammer
//!   kiln-auth, while a token of a freshly rotated key is never refused.
//!   Verified tokens are cached by their SHA-256 until they expire, so a hot client pays
//!   one hash and one map look-up per call.
//! - **API keys** (`kiln_…`) are resolved through `AuthenticateApiKey` (a SERVICE RPC,
//!   hence the workload certificate). Answers are cached: accepted keys for
//!   `api_key_ttl` (default 30 s), refused keys for `api_key_negative_ttl` (default 5 s).
//!   A revoked key therefore stops working within 30 s on every service.
//! - Logging out revokes a session's refresh tokens; an access token already issued stays
//!   valid until its `exp` (15 min by default), as with any stateless JWT.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use tokio::sync::OnceCell;

use crate::client::{ClientConfig, KilnChannel};
use crate::error::{ApiError, reason};
use crate::identity::{AuthMethod, Authenticator, BearerToken, PeerInfo, Principal, Role};
use crate::token::{Jwks, TokenError, TokenVerifier, unix_now};

/// Settings of [`SuiteAuthenticator`]. Defaults are on the fields.
#[derive(Debug, Clone)]
pub struct AuthnConfig {
    /// How to reach kiln-auth: endpoint, CA and this service's workload certificate.
    pub auth: ClientConfig,
    /// Expected `iss`. Default: `kiln`.
    pub issuer: String,
    /// Expected `aud`. Default: `kiln`.
    pub audience: String,
    /// Least time between two JWKS fetches. Default: 1 s.
    pub jwks_min_refresh: Duration,
    /// How long an accepted API key is trusted without asking kiln-auth. Default: 30 s.
    pub api_key_ttl: Duration,
    /// How long a refused API key is refused without asking. Default: 5 s.
    pub api_key_negative_ttl: Duration,
    /// Most cached tokens and keys (each); past it, expired entries are dropped and, if
    /// that is not enough, the cache starts over. Default: 100 000.
    pub max_cached: usize,
}

impl AuthnConfig {
    pub fn new(auth: ClientConfig) -> Self {
        Self {
            auth,
            issuer: "kiln".into(),
            audience: "kiln".into(),
            jwks_min_refresh: Duration::from_secs(1),
            api_key_ttl: Duration::from_secs(30),
            api_key_negative_ttl: Duration::from_secs(5),
            max_cached: 100_000,
        }
    }
}

type Digest = [u8; 32];

fn digest(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Verifies JWTs against kiln-auth's JWKS and resolves API keys through kiln-auth.
pub struct SuiteAuthenticator {
    config: AuthnConfig,
    channel: OnceCell<KilnChannel>,
    verifier: RwLock<Arc<TokenVerifier>>,
    /// When the JWKS was last fetched (successfully or not).
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Verified access tokens → principal and `exp`.
    tokens: Mutex<HashMap<Digest, (Principal, u64)>>,
    /// API keys → principal (or refusal) and until when the answer holds.
    api_keys: Mutex<HashMap<Digest, (Option<Principal>, Instant)>>,
}

impl std::fmt::Debug for SuiteAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuiteAuthenticator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn invalid_token(why: impl std::fmt::Display) -> ApiError {
    ApiError::unauthenticated(
        reason::INVALID_TOKEN,
        format!("{why}; log in again or use a valid API key"),
    )
}

impl SuiteAuthenticator {
    pub fn new(config: AuthnConfig) -> Self {
        let empty = TokenVerifier::new(&Jwks::default(), &config.issuer, &config.audience);
        Self {
            config,
            channel: OnceCell::new(),
            verifier: RwLock::new(Arc::new(empty)),
            last_fetch: tokio::sync::Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            api_keys: Mutex::new(HashMap::new()),
        }
    }

    async fn client(&self) -> Result<AuthServiceClient<KilnChannel>, ApiError> {
        let channel = self
            .channel
            .get_or_try_init(|| async { self.config.auth.connect_lazy() })
            .await
            .map_err(ApiError::from)?;
        Ok(AuthServiceClient::new(channel.clone()))
    }

    fn current_verifier(&self) -> Arc<TokenVerifier> {
        self.verifier
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fetches the JWKS, at most once per `jwks_min_refresh`: a caller that comes too
    /// soon waits for the interval instead of failing, so a token of a freshly rotated
    /// key is accepted, while a flood of forged kids still causes at most one fetch per
    /// interval (callers queue on the lock).
    async fn refresh_jwks(&self, wanted_kid: Option<&str>) -> Result<(), ApiError> {
        let mut last = self.last_fetch.lock().await;
        if wanted_kid.is_some_and(|kid| self.current_verifier().knows(kid)) {
            return Ok(()); // fetched by someone else while we waited for the lock
        }
        if let Some(at) = *last {
            let next = at + self.config.jwks_min_refresh;
            tokio::time::sleep_until(next.into()).await;
        }
        *last = Some(Instant::now());
        let response = self
            .client()
            .await?
            .get_jwks(pb::GetJwksRequest::default())
            .await
            .map_err(|status| {
                tracing::warn!(%status, "cannot fetch the JWKS from kiln-auth");
                ApiError::unavailable("the identity service is unreachable; try again shortly")
            })?
            .into_inner();
        let jwks: Jwks = serde_json::from_str(&response.jwks_json)
            .map_err(|e| ApiError::internal("reading the JWKS from kiln-auth", &e))?;
        tracing::debug!(keys = jwks.keys.len(), "JWKS refreshed");
        let verifier = TokenVerifier::new(&jwks, &self.config.issuer, &self.config.audience);
        *self.verifier.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(verifier);
        Ok(())
    }

    async fn verify_jwt(&self, token: &str) -> Result<Principal, ApiError> {
        let key = digest(token);
        let now = unix_now();
        if let Some((principal, exp)) = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && *exp > now
        {
            return Ok(principal.clone());
        }
        let claims = match self.current_verifier().verify(token) {
            Err(TokenError::UnknownKey) => {
                let kid = jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid);
                self.refresh_jwks(kid.as_deref()).await?;
                self.current_verifier().verify(token)
            }
            other => other,
        }
        .map_err(invalid_token)?;
        let principal = claims
            .principal()
            .ok_or_else(|| invalid_token("the token has an unknown role"))?;
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        make_room(&mut tokens, self.config.max_cached, |(_, exp)| *exp > now);
        tokens.insert(key, (principal.clone(), claims.exp));
        Ok(principal)
    }

    async fn resolve_api_key(&self, key: &str) -> Result<Principal, ApiError> {
        let digest = digest(key);
        if let Some((answer, until)) = self
            .api_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            && *until > Instant::now()
        {
            return answer
                .clone()
                .ok_or_else(|| invalid_token("the API key is not valid"));
        }
        let result = self
            .client()
            .await?
            .authenticate_api_key(pb::AuthenticateApiKeyRequest {
                key: key.to_owned(),
            })
            .await;
        let (answer, ttl) = match result {
            Ok(response) => {
                let principal = response
                    .into_inner()
                    .principal
                    .and_then(principal_from_proto)
                    .ok_or_else(|| {
                        ApiError::internal("reading kiln-auth's answer", &"no usable principal")
                    })?;
                (Some(principal), self.config.api_key_ttl)
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
                ) =>
            {
                (None, self.config.api_key_negative_ttl)
            }
            Err(status) => {
                tracing::warn!(%status, "cannot resolve an API key through kiln-auth");
                return Err(ApiError::unavailable(
                    "the identity service is unreachable; try again shortly",
                ));
            }
        };
        let now = Instant::now();
        let mut keys = self.api_keys.lock().unwrap_or_else(|e| e.into_inner());
        make_room(&mut keys, self.config.max_cached, |(_, until)| *until > now);
        keys.insert(digest, (answer.clone(), now + ttl));
        answer.ok_or_else(|| invalid_token("the API key is not valid"))
    }
}

/// Keeps a cache under `max` entries: drops stale ones, and everything if still full.
fn make_room<V>(cache: &mut HashMap<Digest, V>, max: usize, fresh: impl Fn(&V) -> bool) {
    if cache.len() >= max {
        cache.retain(|_, v| fresh(v));
        if cache.len() >= max {
            cache.clear();
        }
    }
}

/// The kiln-rpc principal for a principal kiln-auth returned.
pub fn principal_from_proto(p: pb::Principal) -> Option<Principal> {
    let role = match pb::Role::try_from(p.role).ok()? {
        pb::Role::Viewer => Role::Viewer,
        pb::Role::User => Role::User,
        pb::Role::Admin => Role::Admin,
        pb::Role::Unspecified => return None,
    };
    let auth_method = match pb::AuthMethod::try_from(p.auth_method).ok()? {
        pb::AuthMethod::ApiKey => AuthMethod::ApiKey,
        _ => AuthMethod::Token,
    };
    let expires_at = p.expires_at.and_then(|t| {
        u64::try_from(t.seconds)
            .ok()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
    });
    Some(Principal {
        subject: p.user_id,
        username: p.username,
        role: Some(role),
        auth_method,
        expires_at,
        session_id: (!p.session_id.is_empty()).then_some(p.session_id),
        api_key_id: (!p.api_key_id.is_empty()).then_some(p.api_key_id),
    })
}

impl Authenticator for SuiteAuthenticator {
    fn authenticate<'a>(
        &'a self,
        token: &'a BearerToken,
        _peer: &'a PeerInfo,
    ) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async move {
            let token = token.as_str();
            let principal = if token.starts_with("kiln_") {
                self.resolve_api_key(token).await?
            } else {
                self.verify_jwt(token).await?
            };
            if principal
                .expires_at
                .is_some_and(|at| at <= SystemTime::now())
            {
                return Err(invalid_token("the credential has expired"));
            }
            Ok(principal)
        })
    }
}
