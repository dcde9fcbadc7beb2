//! kiln-auth: users, passwords, sessions, API keys, signing keys and the auth audit
//! trail of the kiln suite (`kiln.auth.v1.AuthService`, DESIGN §3.1).
//!
//! [`AuthApi::open`] opens the store, runs its migrations, bootstraps the first admin,
//! loads the signing keys and starts the rotation task; [`service`] wraps it for
//! `KilnServer::add_service`. The kiln layer authenticates callers and enforces each
//! RPC's access level before a handler runs; handlers read the resulting
//! [`kiln_rpc::Principal`] from the request extensions and check ownership.
//!
//! Modules: [`config`] (settings and defaults), `store` (SQLite or Postgres, migrations per engine), `password`
//! (rules, Argon2id pool), `secret` (random tokens, digests), `keys` (signing keys,
//! JWKS, rotation), `sessions` (login, refresh, logout, password change), `api_keys`,
//! `users` (admin RPCs), `revocations` (what ends access tokens everywhere), `delegation`
//! (ExchangeToken: delegated tokens for the agent), `audit`, `throttle`, `handlers` (the
//! gRPC trait), [`error`].

use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::auth::auth_service_server::AuthServiceServer;
use kiln_rpc::identity::PeerInfo;
use kiln_rpc::limit::MAX_MESSAGE_BYTES_CEILING;
use kiln_rpc::{Principal, Role};

mod api_keys;
mod audit;
mod bootstrap;
pub mod config;
mod convert;
mod delegation;
pub mod error;
mod handlers;
mod keys;
mod metrics;
mod paging;
mod password;
mod revocations;
mod secret;
mod sessions;
mod store;
mod throttle;
mod users;

pub use bootstrap::{ADMIN_PASSWORD_FILE, ADMIN_USERNAME};
pub use config::{
    AuthConfig, AuthFile, Clock, ManualClock, PasswordCost, SystemClock, ThrottleConfig,
};
pub use error::{AuthError, reason};
pub use password::{MAX_PASSWORD_BYTES, MAX_USERNAME_BYTES, MIN_PASSWORD_CHARS};
pub use store::DB_FILE;

use error::Result;
use keys::KeyRing;
use password::PasswordHasher;
use store::Store;
use throttle::LoginThrottle;

/// The auth service: implements `kiln_proto::auth::auth_service_server::AuthService`.
/// Cheap to clone (the state is shared).
#[derive(Debug, Clone)]
pub struct AuthApi {
    inner: Arc<Inner>,
}

/// The shared state behind [`AuthApi`]; each module adds its operations to it.
#[derive(Debug)]
pub(crate) struct Inner {
    config: AuthConfig,
    store: Store,
    hasher: PasswordHasher,
    keys: KeyRing,
    throttle: LoginThrottle,
    /// Stamps of token issue times and user-wide revocations (see `revocations`).
    stamps: revocations::Stamps,
    /// The aggregated audit of locked-out logins.
    refusals: audit::RefusalAggregates,
    metrics: metrics::AuthMetrics,
}

impl Inner {
    fn now(&self) -> SystemTime {
        self.config.clock.now()
    }
}

impl AuthApi {
    /// Opens the store (by default `<data_dir>/auth.db` — SQLite in WAL mode, file mode
    /// 0600 in a 0700 directory; or `database_url`) — runs the embedded migrations, creates the first admin on an
    /// empty store, loads or creates the signing key (rotating it if it is older than
    /// the rotation interval) and starts the background rotation task. The task stops
    /// when the last clone of the returned `AuthApi` is dropped.
    pub async fn open(config: AuthConfig) -> Result<AuthApi> {
        validate(&config)?;
        let store = Store::open(&config.database()).await?;
        let hasher = PasswordHasher::new(config.password_cost, config.hashing_concurrency).await?;
        let now = config.clock.now();
        bootstrap::ensure_admin(
            &store,
            &hasher,
            &config.data_dir,
            config.admin_password.as_deref(),
            now,
        )
        .await?;
        let keys = KeyRing::load(&store, now, config.max_token_lifetime()).await?;
        keys.rotate_if_due(&store, now, config.key_rotation_interval)
            .await?;
        let stamps = revocations::Stamps::load(&store).await?;
        let inner = Arc::new(Inner {
            throttle: LoginThrottle::new(config.throttle.clone()),
            stamps,
            refusals: audit::RefusalAggregates::default(),
            metrics: metrics::AuthMetrics::default(),
            config,
            store,
            hasher,
            keys,
        });
        tokio::spawn(rotate_on_schedule(Arc::downgrade(&inner)));
        Ok(AuthApi { inner })
    }

    /// Rotates the signing key now (on demand, e.g. after a suspected key leak, or from
    /// an operator command) and returns the new key id. Tokens signed by the previous
    /// key keep verifying until they expire; it stays in the JWKS until then.
    pub async fn rotate_signing_key(&self) -> Result<String> {
        self.inner
            .keys
            .rotate(&self.inner.store, self.inner.now())
            .await
    }

    /// Adds this service's metrics (`kiln_auth_…`) to `registry`.
    pub fn register_metrics(&self, registry: &mut kiln_metrics::Registry) {
        self.inner.metrics.register(registry);
    }

    /// What this service needs in order to serve (its database), for health.
    pub fn readiness(&self) -> Vec<Arc<dyn kiln_rpc::readiness::Readiness>> {
        let store = self.inner.store.clone();
        vec![kiln_rpc::readiness::check_fn("auth store", move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
        })]
    }

    /// The id of the key that signs new tokens.
    pub fn current_key_id(&self) -> String {
        self.inner.keys.current_kid()
    }

    /// Closes the store's connections (for a clean shutdown; dropping also works).
    pub async fn close(&self) {
        self.inner.store.close().await;
    }
}

fn validate(config: &AuthConfig) -> Result<()> {
    let bad = |what: &str| Err(AuthError::Config(what.to_owned()));
    if config.issuer.is_empty() || config.audience.is_empty() {
        return bad("issuer and audience must not be empty");
    }
    if config.access_ttl < Duration::from_secs(1) {
        return bad("access_ttl must be at least 1 second");
    }
    if config.refresh_idle_ttl.is_zero() || config.refresh_absolute_ttl < config.refresh_idle_ttl {
        return bad("refresh_idle_ttl must be positive and at most refresh_absolute_ttl");
    }
    if config.key_rotation_interval < config.access_ttl {
        return bad("key_rotation_interval must be at least access_ttl");
    }
    if config.key_rotation_check.is_zero() {
        return bad("key_rotation_check must be positive");
    }
    if config.delegation_max_lifetime < Duration::from_secs(1) {
        return bad("delegation_max_lifetime must be at least 1 second");
    }
    Ok(())
}

/// Checks every `key_rotation_check` whether the signing key is due, until the service
/// is dropped. A failed rotation is logged and retried at the next check; the old key
/// keeps signing meanwhile.
async fn rotate_on_schedule(inner: Weak<Inner>) {
    let Some(period) = inner.upgrade().map(|i| i.config.key_rotation_check) else {
        return;
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let (now, interval) = (inner.now(), inner.config.key_rotation_interval);
        if let Err(e) = inner.keys.rotate_if_due(&inner.store, now, interval).await {
            tracing::error!(error = %e, "scheduled signing-key rotation failed; will retry");
        }
    }
}

/// The tonic service, ready for `KilnServer::add_service`. Its own decode limit is set to
/// the ceiling because the kiln layer enforces the configured limit (answering
/// RESOURCE_EXHAUSTED, as gRPC clients expect) before a message reaches tonic.
pub fn service(api: AuthApi) -> AuthServiceServer<AuthApi> {
    AuthServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES_CEILING)
}

/// Who is calling, taken from the request extensions the kiln layer filled.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    principal: Option<Principal>,
    /// The peer address for the audit trail, `unknown` when not known.
    peer: String,
    /// The peer's IP, for throttling.
    ip: Option<IpAddr>,
}

impl Caller {
    fn of<T>(request: &tonic::Request<T>) -> Self {
        let addr = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote_addr)
            .or_else(|| request.remote_addr());
        Self {
            principal: request.extensions().get::<Principal>().cloned(),
            peer: addr.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            ip: addr.map(|a| a.ip()),
        }
    }

    /// The authenticated end user (a token or API key; not a workload, and not a
    /// delegated token, which the layer already refuses here: one made for kiln-build
    /// must never create keys, sessions or users).
    fn user(&self) -> Result<&Principal> {
        let principal = self.principal.as_ref().ok_or(AuthError::MissingPrincipal)?;
        if principal.role.is_none() {
            return Err(AuthError::PermissionDenied {
                reason: kiln_rpc::error::reason::INSUFFICIENT_ROLE,
                message: "this RPC is for end users, not services".into(),
            });
        }
        if principal.scope.is_some() {
            return Err(AuthError::Unauthenticated {
                reason: kiln_rpc::error::reason::TOKEN_AUDIENCE_MISMATCH,
                message: "a delegated token is not valid at kiln-auth".into(),
            });
        }
        Ok(principal)
    }

    /// The calling kiln workload (SERVICE RPCs), e.g. `spiffe://kiln.local/service/agent`.
    fn workload(&self) -> Result<&Principal> {
        match &self.principal {
            Some(p) if p.auth_method == kiln_rpc::identity::AuthMethod::Workload => Ok(p),
            Some(_) => Err(AuthError::PermissionDenied {
                reason: kiln_rpc::error::reason::WORKLOAD_IDENTITY_REQUIRED,
                message: "this RPC is for kiln services and needs a workload certificate".into(),
            }),
            None => Err(AuthError::MissingPrincipal),
        }
    }

    /// The caller, if it is an admin. The layer already enforces ADMIN RPCs; this
    /// second check keeps a handler safe if it is ever mounted without the layer.
    fn admin(&self) -> Result<&Principal> {
        let principal = self.user()?;
        if principal.role != Some(Role::Admin) {
            return Err(AuthError::PermissionDenied {
                reason: reason::NOT_ADMIN,
                message: "this RPC needs the admin role".into(),
            });
        }
        Ok(principal)
    }
}

/// Unix seconds of `t`.
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
