//! Token verification for every kiln service: the [`Authenticator`] the layer calls.
//!
//! - **Access JWTs** are verified locally against the JWKS fetched from kiln-auth over
//!   mTLS. The key set is cached; a token with an unknown `kid` joins one shared fetch
//!   (single flight) that starts after the token arrived, so a token of a freshly
//!   rotated key is accepted after at most one refresh. Fetches start at most once per
//!   `jwks_min_refresh` (1 s) and nobody queues behind anybody: a flood of forged kids
//!   causes one fetch a second and delays no valid token beyond one refresh.
//!   Verified tokens are cached by their SHA-256 until they expire, so a hot client pays
//!   one hash and one map look-up per call.
//! - **Revocation** (DESIGN §3.1): a background task polls kiln-auth's
//!   `ListRevocations` (SERVICE) every `revocation_poll` (1 s) into an in-memory view
//!   (module `revocation`); every token, cached or not, is checked against it (no call
//!   per request). A token is accepted only while the view is at most
//!   `revocation_max_staleness` (3 s) old, counted from when its poll was sent. **Bound:**
//!   a token revoked by Logout, ChangePassword, UpdateUser (role, disable, password
//!   reset), DeleteUser or RevokeUserSessions is refused (UNAUTHENTICATED,
//!   `TOKEN_REVOKED`) by every service at most 3 s after the revocation committed. If
//!   kiln-auth cannot be reached for longer, the service **fails closed** for tokens:
//!   UNAVAILABLE, `TOKEN_VERIFICATION_UNAVAILABLE`, until a poll succeeds again.
//! - **Delegated tokens** (kiln-auth's `ExchangeToken`: `act`, `task`, a service `aud`)
//!   verify like access tokens, with the same revocation check (`sub` is the user, `sid`
//!   the delegation); their `Principal` carries `actor` and `scope`, and the layer refuses
//!   them outside the service of their audience (`TOKEN_AUDIENCE_MISMATCH`).
//! - **API keys** (`kiln_…`) are resolved through `AuthenticateApiKey` (a SERVICE RPC,
//!   hence the workload certificate). Answers are cached: accepted keys for
//!   `api_key_ttl` (default 30 s), refused keys for `api_key_negative_ttl` (default 5 s).
//!   A revoked key therefore stops working within 30 s on every service; the cached
//!   keys of a user are dropped at once when a user-wide revocation arrives (delete,
//!   disable, role change), so those reach API keys within the token bound.
//! - **Metrics**: `kiln_authn_cache_lookups_total{kind="token|api_key",result="hit|miss"}`
//!   counts the look-ups of both caches ([`SuiteAuthenticator::register_metrics`]). A
//!   cached refusal of an API key is a hit; an expired entry is a miss. A miss of a token
//!   costs a signature check, a miss of a key a call to kiln-auth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use kiln_metrics::{Counter, EncodeLabelSet, Family};
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use tokio::sync::OnceCell;

use crate::client::{ClientConfig, KilnChannel};
use crate::error::{ApiError, reason};
use crate::identity::{AuthMethod, Authenticator, BearerToken, PeerInfo, Principal, Role};
use crate::revocation::RevocationView;
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
    /// Least time between the starts of two JWKS fetches. Default: 1 s.
    pub jwks_min_refresh: Duration,
    /// How often revocations are fetched from kiln-auth. Default: 1 s.
    pub revocation_poll: Duration,
    /// Oldest revocation view tokens are accepted with; past it, tokens are refused
    /// with UNAVAILABLE (fail closed). This is the revocation bound. Default: 3 s.
    pub revocation_max_staleness: Duration,
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
            revocation_poll: Duration::from_secs(1),
            revocation_max_staleness: Duration::from_secs(3),
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

/// Verifies JWTs against kiln-auth's JWKS and revocations, and resolves API keys
/// through kiln-auth.
pub struct SuiteAuthenticator {
    shared: Arc<State>,
    /// Set once the revocation poller runs (started by the first call, which has a
    /// runtime; it stops when the authenticator is dropped).
    poller: OnceLock<()>,
}

/// A JWKS fetch that waiters share; its error is a message (the future must be Clone).
type SharedFetch = Shared<BoxFuture<'static, Result<(), String>>>;

#[derive(Default)]
struct JwksFetches {
    /// When the newest scheduled fetch starts (or started).
    last_start: Option<Instant>,
    /// That fetch, for callers that arrive before it starts.
    pending: Option<(Instant, SharedFetch)>,
}

struct State {
    config: AuthnConfig,
    channel: OnceCell<KilnChannel>,
    verifier: RwLock<Arc<TokenVerifier>>,
    jwks_fetches: Mutex<JwksFetches>,
    revocations: RwLock<RevocationView>,
    /// When the poll behind the current revocation view was sent; `None` before the
    /// first successful one.
    synced: tokio::sync::watch::Sender<Option<Instant>>,
    /// Verified access tokens → principal, `exp` and `iat_ms`.
    tokens: Mutex<HashMap<Digest, (Principal, u64, u64)>>,
    /// API keys → principal (or refusal) and until when the answer holds.
    api_keys: Mutex<HashMap<Digest, (Option<Principal>, Instant)>>,
    cache_lookups: Family<CacheLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CacheLabels {
    kind: &'static str,
    result: &'static str,
}

impl State {
    fn count_lookup(&self, kind: &'static str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache_lookups
            .get_or_create(&CacheLabels { kind, result })
            .inc();
    }
}

impl std::fmt::Debug for SuiteAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuiteAuthenticator")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

fn invalid_token(why: impl std::fmt::Display) -> ApiError {
    ApiError::unauthenticated(
        reason::INVALID_TOKEN,
        format!("{why}; log in again or use a valid API key"),
    )
}

fn unreachable_auth() -> ApiError {
    ApiError::unavailable("the identity service is unreachable; try again shortly")
}

impl SuiteAuthenticator {
    pub fn new(config: AuthnConfig) -> Self {
        let empty = TokenVerifier::new(&Jwks::default(), &config.issuer, &config.audience);
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        // All four series from the start, so a hit ratio is defined before the first miss.
        for kind in ["token", "api_key"] {
            for result in ["hit", "miss"] {
                drop(cache_lookups.get_or_create(&CacheLabels { kind, result }));
            }
        }
        Self {
            shared: Arc::new(State {
                config,
                channel: OnceCell::new(),
                verifier: RwLock::new(Arc::new(empty)),
                jwks_fetches: Mutex::new(JwksFetches::default()),
                revocations: RwLock::new(RevocationView::default()),
                synced: tokio::sync::watch::Sender::new(None),
                tokens: Mutex::new(HashMap::new()),
                api_keys: Mutex::new(HashMap::new()),
                cache_lookups,
            }),
            poller: OnceLock::new(),
        }
    }

    /// Adds `kiln_authn_cache_lookups_total` to `registry`. One authenticator per
    /// listener, so a process registers it once.
    pub fn register_metrics(&self, registry: &mut kiln_metrics::Registry) {
        registry.sub_registry_with_prefix("authn").register(
            "cache_lookups",
            "Look-ups of the verified-token and API-key caches, by kind (token, api_key) and result (hit, miss)",
            self.shared.cache_lookups.clone(),
        );
    }

    fn start_poller(&self) {
        self.poller.get_or_init(|| {
            tokio::spawn(poll_revocations(Arc::downgrade(&self.shared)));
        });
    }
}

/// Polls `ListRevocations` every `revocation_poll` until the authenticator is dropped.
async fn poll_revocations(state: Weak<State>) {
    loop {
        let Some(state) = state.upgrade() else { return };
        let sent = Instant::now();
        match state.sync_revocations().await {
            Ok(()) => {
                state.synced.send_replace(Some(sent));
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot fetch revocations from kiln-auth")
            }
        }
        let period = state.config.revocation_poll;
        drop(state);
        tokio::time::sleep(period).await;
    }
}

impl State {
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

    /// Fetches revocations until kiln-auth says there are no more.
    async fn sync_revocations(&self) -> Result<(), ApiError> {
        let mut client = self.client().await?;
        loop {
            let after = self
                .revocations
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .cursor;
            let page = client
                .list_revocations(pb::ListRevocationsRequest {
                    after,
                    page_size: 0,
                })
                .await
                .map_err(|status| {
                    tracing::debug!(%status, "ListRevocations failed");
                    unreachable_auth()
                })?
                .into_inner();
            let users = self
                .revocations
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .apply(&page);
            if !users.is_empty() {
                // A deleted, disabled or demoted user's keys must be asked about again.
                self.api_keys
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, (p, _)| p.as_ref().is_none_or(|p| !users.contains(&p.subject)));
            }
            if !page.more {
                return Ok(());
            }
        }
    }

    /// Fails closed while the revocation view is older than the bound; waits (at most
    /// the bound) for the first poll or a late one instead of refusing at once.
    /// Whether the revocation view is recent enough to trust without waiting.
    fn revocations_fresh(&self) -> bool {
        let limit = self.config.revocation_max_staleness;
        self.synced.borrow().is_some_and(|at| at.elapsed() <= limit)
    }

    async fn fresh_revocations(&self) -> Result<(), ApiError> {
        if self.revocations_fresh() {
            return Ok(());
        }
        let limit = self.config.revocation_max_staleness;
        let fresh = |at: &Option<Instant>| at.is_some_and(|at| at.elapsed() <= limit);
        let mut synced = self.synced.subscribe();
        let _ = tokio::time::timeout(limit, synced.wait_for(fresh)).await;
        if fresh(&synced.borrow()) {
            return Ok(());
        }
        Err(ApiError::new(
            tonic::Code::Unavailable,
            reason::TOKEN_VERIFICATION_UNAVAILABLE,
            "cannot learn token revocations from the identity service; try again shortly",
        ))
    }

    /// The JWKS fetch that starts no earlier than `arrived`: joins a scheduled one, or
    /// schedules one at most `jwks_min_refresh` after the previous start. Every caller
    /// waits for at most one fetch; nobody waits behind another caller.
    fn jwks_fetch(self: &Arc<Self>, arrived: Instant) -> SharedFetch {
        let mut fetches = self.jwks_fetches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((start, fetch)) = &fetches.pending
            && *start >= arrived
        {
            return fetch.clone();
        }
        let now = Instant::now();
        let start = fetches
            .last_start
            .map_or(now, |last| (last + self.config.jwks_min_refresh).max(now));
        fetches.last_start = Some(start);
        let state = self.clone();
        let fetch = async move {
            tokio::time::sleep_until(start.into()).await;
            state.fetch_jwks().await.map_err(|e| e.message().to_owned())
        }
        .boxed()
        .shared();
        fetches.pending = Some((start, fetch.clone()));
        fetch
    }

    async fn fetch_jwks(&self) -> Result<(), ApiError> {
        let response = self
            .client()
            .await?
            .get_jwks(pb::GetJwksRequest::default())
            .await
            .map_err(|status| {
                tracing::warn!(%status, "cannot fetch the JWKS from kiln-auth");
                unreachable_auth()
            })?
            .into_inner();
        let jwks: Jwks = serde_json::from_str(&response.jwks_json)
            .map_err(|e| ApiError::internal("reading the JWKS from kiln-auth", &e))?;
        tracing::debug!(keys = jwks.keys.len(), "JWKS refreshed");
        let verifier = TokenVerifier::new(&jwks, &self.config.issuer, &self.config.audience);
        *self.verifier.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(verifier);
        Ok(())
    }

    async fn verify_jwt(self: &Arc<Self>, token: &str) -> Result<Principal, ApiError> {
        let arrived = Instant::now();
        let key = digest(token);
        let now = unix_now();
        let cached = self.cached_token(&key, now);
        self.count_lookup("token", cached.is_some());
        let (principal, iat_ms) = match cached {
            Some(hit) => hit,
            None => {
                let claims = match self.current_verifier().verify(token) {
                    Err(TokenError::UnknownKey) => {
                        self.jwks_fetch(arrived)
                            .await
                            .map_err(|_| unreachable_auth())?;
                        self.current_verifier().verify(token)
                    }
                    other => other,
                }
                .map_err(invalid_token)?;
                let principal = claims
                    .principal()
                    .ok_or_else(|| invalid_token("the token has an unknown role"))?;
                let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
                make_room(&mut tokens, self.config.max_cached, |(_, exp, _)| {
                    *exp > now
                });
                tokens.insert(key, (principal.clone(), claims.exp, claims.iat_ms));
                (principal, claims.iat_ms)
            }
        };
        self.fresh_revocations().await?;
        self.not_revoked(principal, iat_ms)
    }

    /// [`Self::verify_jwt`] for a token verified before, when revocations are fresh: no
    /// signature, no wait. `None` otherwise (nothing counted: `verify_jwt` then does).
    fn verify_cached_jwt(&self, token: &str) -> Option<Result<Principal, ApiError>> {
        let (principal, iat_ms) = self.cached_token(&digest(token), unix_now())?;
        if !self.revocations_fresh() {
            return None;
        }
        self.count_lookup("token", true);
        Some(self.not_revoked(principal, iat_ms))
    }

    /// The cached principal and `iat_ms` of a token verified before, unless it has
    /// expired since (`now` in Unix seconds).
    fn cached_token(&self, key: &Digest, now: u64) -> Option<(Principal, u64)> {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .filter(|(_, exp, _)| *exp > now)
            .map(|(principal, _, iat_ms)| (principal.clone(), *iat_ms))
    }

    /// `principal`, unless the current revocations revoke its token (issued at
    /// `iat_ms`).
    fn not_revoked(&self, principal: Principal, iat_ms: u64) -> Result<Principal, ApiError> {
        let revoked = self
            .revocations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .revokes(&principal.subject, principal.session_id.as_deref(), iat_ms);
        if revoked {
            return Err(ApiError::unauthenticated(
                reason::TOKEN_REVOKED,
                "the token was revoked (logout, a password or role change, or the account \
                 changed); log in again",
            ));
        }
        Ok(principal)
    }

    /// kiln-auth's answer for an API key, when it is cached and still holds: the
    /// principal, or `None` for a key it refused.
    fn cached_api_key(&self, digest: &Digest) -> Option<Option<Principal>> {
        self.api_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(answer, _)| answer.clone())
    }

    /// [`Self::resolve_api_key`] for a key whose answer is cached; `None` otherwise.
    fn resolve_cached_api_key(&self, key: &str) -> Option<Result<Principal, ApiError>> {
        let answer = self.cached_api_key(&digest(key))?;
        self.count_lookup("api_key", true);
        Some(answer.ok_or_else(|| invalid_token("the API key is not valid")))
    }

    async fn resolve_api_key(&self, key: &str) -> Result<Principal, ApiError> {
        let digest = digest(key);
        let cached = self.cached_api_key(&digest);
        self.count_lookup("api_key", cached.is_some());
        if let Some(answer) = cached {
            return answer.ok_or_else(|| invalid_token("the API key is not valid"));
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
        // kiln-auth resolves API keys only; a key is never a delegation.
        actor: None,
        scope: None,
    })
}

impl Authenticator for SuiteAuthenticator {
    fn authenticate<'a>(
        &'a self,
        token: &'a BearerToken,
        _peer: &'a PeerInfo,
    ) -> BoxFuture<'a, Result<Principal, ApiError>> {
        self.start_poller();
        Box::pin(async move {
            let token = token.as_str();
            let principal = if token.starts_with(API_KEY_PREFIX) {
                self.shared.resolve_api_key(token).await
            } else {
                self.shared.verify_jwt(token).await
            };
            unexpired(principal?)
        })
    }

    fn authenticate_now(
        &self,
        token: &BearerToken,
        _peer: &PeerInfo,
    ) -> Option<Result<Principal, ApiError>> {
        self.start_poller();
        let token = token.as_str();
        let principal = if token.starts_with(API_KEY_PREFIX) {
            self.shared.resolve_cached_api_key(token)
        } else {
            self.shared.verify_cached_jwt(token)
        }?;
        Some(principal.and_then(unexpired))
    }
}

/// What every API key starts with (an access token never does).
const API_KEY_PREFIX: &str = "kiln_";

/// `principal`, unless its credential has expired.
fn unexpired(principal: Principal) -> Result<Principal, ApiError> {
    if principal
        .expires_at
        .is_some_and(|at| at <= SystemTime::now())
    {
        return Err(invalid_token("the credential has expired"));
    }
    Ok(principal)
}
