//! A kiln-auth service on a real store — SQLite in a temporary directory, or a fresh
//! Postgres database in the Postgres half of a `kiln_testkit::both_backends!` test — called the way
//! the kiln layer calls it: with the caller's `Principal` and `PeerInfo` in the request
//! extensions. Principals of access tokens are made by verifying the token against the
//! service's own JWKS, as the layer does.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_auth::{AuthApi, AuthConfig, ManualClock, PasswordCost};
use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_server::AuthService;
use kiln_rpc::identity::{AuthMethod, PeerInfo};
use kiln_rpc::token::{Jwks, TokenVerifier};
use kiln_rpc::{Principal, Role};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
pub const PEER: &str = "192.0.2.10:40000";

pub struct Harness {
    pub api: AuthApi,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
    pub config: AuthConfig,
}

/// Test settings: cheap Argon2 (the OWASP cost is checked separately), a manual clock,
/// a known admin password; the store on the current test's backend.
pub async fn test_config(dir: &std::path::Path, clock: &Arc<ManualClock>) -> AuthConfig {
    let mut config = AuthConfig::new(dir.to_path_buf());
    config.password_cost = PasswordCost::INSECURE_FOR_TESTS;
    config.admin_password = Some(ADMIN_PASSWORD.into());
    config.clock = clock.clone();
    config.database_url = kiln_testkit::database_url().await;
    config
}

pub async fn harness() -> Harness {
    harness_with(|_| {}).await
}

pub async fn harness_with(tweak: impl FnOnce(&mut AuthConfig)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new());
    let mut config = test_config(&dir.path().join("data"), &clock).await;
    tweak(&mut config);
    let api = AuthApi::open(config.clone())
        .await
        .expect("auth service opens");
    Harness {
        api,
        clock,
        dir,
        config,
    }
}

/// A request as the layer hands it over: principal (if any) and peer address.
pub fn req<T>(message: T, principal: Option<&Principal>, peer: &str) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(p) = principal {
        request.extensions_mut().insert(p.clone());
    }
    let addr: SocketAddr = peer.parse().expect("peer address");
    request.extensions_mut().insert(PeerInfo {
        remote_addr: Some(addr),
        ..PeerInfo::default()
    });
    request
}

pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

pub fn retry_after(status: &Status) -> Option<Duration> {
    status.get_error_details().retry_info()?.retry_delay
}

pub fn violations(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

pub fn assert_status(status: &Status, code: Code, reason_: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(status), reason_, "{status:?}");
}

pub fn unix(t: &prost_types::Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(t.seconds).expect("positive"))
}

impl Harness {
    pub async fn jwks(&self) -> pb::GetJwksResponse {
        self.api
            .get_jwks(req(pb::GetJwksRequest {}, None, PEER))
            .await
            .expect("jwks")
            .into_inner()
    }

    pub async fn verifier(&self) -> TokenVerifier {
        let jwks = self.jwks().await;
        let parsed: Jwks = serde_json::from_str(&jwks.jwks_json).expect("jwks json");
        TokenVerifier::new(&parsed, &jwks.issuer, &jwks.audience)
    }

    /// The principal the layer would derive from an access token.
    pub async fn principal(&self, access_token: &str) -> Principal {
        self.verifier()
            .await
            .verify(access_token)
            .expect("token verifies")
            .principal()
            .expect("known role")
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<pb::LoginResponse, Status> {
        self.login_from(username, password, PEER).await
    }

    pub async fn login_from(
        &self,
        username: &str,
        password: &str,
        peer: &str,
    ) -> Result<pb::LoginResponse, Status> {
        let message = pb::LoginRequest {
            username: username.into(),
            password: password.into(),
        };
        self.api
            .login(req(message, None, peer))
            .await
            .map(|r| r.into_inner())
    }

    /// Logs in and returns the session's principal.
    pub async fn session(&self, username: &str, password: &str) -> (pb::LoginResponse, Principal) {
        let login = self.login(username, password).await.expect("login");
        let principal = self.principal(&login.access_token).await;
        (login, principal)
    }

    pub async fn admin(&self) -> Principal {
        self.session("admin", ADMIN_PASSWORD).await.1
    }

    /// Creates a user with `role` and returns its id and password.
    pub async fn user(&self, username: &str, role: pb::Role) -> (String, String) {
        let admin = self.admin().await;
        let password = format!("{username}-secret-pw");
        let user = self
            .api
            .create_user(req(
                pb::CreateUserRequest {
                    username: username.into(),
                    password: password.clone(),
                    role: role as i32,
                    request_id: String::new(),
                },
                Some(&admin),
                PEER,
            ))
            .await
            .expect("user created")
            .into_inner();
        (user.id, password)
    }

    pub async fn refresh(&self, token: &str) -> Result<pb::RefreshResponse, Status> {
        self.api
            .refresh(req(
                pb::RefreshRequest {
                    refresh_token: token.into(),
                },
                None,
                PEER,
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn create_key(
        &self,
        caller: &Principal,
        message: pb::CreateApiKeyRequest,
    ) -> Result<pb::CreateApiKeyResponse, Status> {
        self.api
            .create_api_key(req(message, Some(caller), PEER))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn authenticate_key(
        &self,
        key: &str,
    ) -> Result<pb::AuthenticateApiKeyResponse, Status> {
        let workload = Principal::workload(
            &kiln_rpc::identity::WorkloadId::parse("spiffe://kiln.local/service/build")
                .expect("id"),
        );
        self.api
            .authenticate_api_key(req(
                pb::AuthenticateApiKeyRequest { key: key.into() },
                Some(&workload),
                PEER,
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// The principal the layer would make of an API key.
    pub async fn key_principal(&self, key: &str) -> Principal {
        let p = self
            .authenticate_key(key)
            .await
            .expect("key authenticates")
            .principal
            .expect("principal");
        let role = match p.role() {
            pb::Role::Viewer => Some(Role::Viewer),
            pb::Role::User => Some(Role::User),
            pb::Role::Admin => Some(Role::Admin),
            pb::Role::Unspecified => None,
        };
        Principal {
            subject: p.user_id,
            username: p.username,
            role,
            auth_method: AuthMethod::ApiKey,
            expires_at: p.expires_at.as_ref().map(unix),
            session_id: None,
            api_key_id: Some(p.api_key_id),
            actor: None,
            scope: None,
        }
    }

    pub async fn audit(&self, filter: pb::ListAuditEventsRequest) -> Vec<pb::AuditEvent> {
        let admin_principal = self.admin_without_audit().await;
        self.api
            .list_audit_events(req(filter, Some(&admin_principal), PEER))
            .await
            .expect("audit events")
            .into_inner()
            .events
    }

    /// An admin principal made without a login (so that it adds no audit event).
    pub async fn admin_without_audit(&self) -> Principal {
        Principal {
            subject: "not-a-user".into(),
            username: "admin".into(),
            role: Some(Role::Admin),
            auth_method: AuthMethod::Token,
            expires_at: None,
            session_id: Some("none".into()),
            api_key_id: None,
            actor: None,
            scope: None,
        }
    }
}
