//! A real kiln listener over TLS whose authenticator talks to a fake kiln-auth on the
//! same listener; the test holds the signing key.

use std::sync::Arc;

use kiln_proto::auth as pb;
use kiln_proto::auth::auth_service_client::AuthServiceClient;
use kiln_proto::auth::auth_service_server::AuthServiceServer;
use kiln_rpc::authn::{AuthnConfig, SuiteAuthenticator};
use kiln_rpc::client::ClientConfig;
use kiln_rpc::pki::{DevPki, ensure_dev_pki};
use kiln_rpc::token::{AccessClaims, Jwks, SigningKey, unix_now};
use kiln_rpc::{KilnServer, ServerSettings};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::fake_auth::{FakeAuth, FakeAuthState};

pub struct Rig {
    pub endpoint: String,
    pub pki: DevPki,
    pub state: Arc<FakeAuthState>,
    pub key: SigningKey,
    /// The authenticator's metrics.
    pub metrics: kiln_metrics::Registry,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn rig() -> Rig {
    rig_with(|_| {}, |_| {}).await
}

pub async fn rig_with(
    settings_fn: impl FnOnce(&mut ServerSettings),
    authn_fn: impl FnOnce(&mut AuthnConfig),
) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = ensure_dev_pki(&dir.path().join("pki"), "kiln.local", &["auth"]).expect("pki");
    let (key, _) = SigningKey::generate("k1").expect("key");
    let state = Arc::new(FakeAuthState::default());
    *state.jwks.lock().expect("lock") = Jwks {
        keys: vec![key.public_jwk()],
    };
    state
        .valid_keys
        .lock()
        .expect("lock")
        .insert("kiln_k1_goodsecret".into(), pb::Role::User);

    let mut settings = ServerSettings::new("127.0.0.1:0".parse().expect("addr"), pki.server_tls());
    settings_fn(&mut settings);
    let mut server = KilnServer::new(settings)
        .add_service(AuthServiceServer::new(FakeAuth {
            state: state.clone(),
        }))
        .bind()
        .await
        .expect("binds");
    let endpoint = format!("https://{}", server.local_addr());
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("pki file");
    let mut authn = AuthnConfig::new(
        ClientConfig::new(&endpoint)
            .ca_pem(read(pki.ca_cert()))
            .identity(
                read(pki.workload_cert("auth")),
                read(pki.workload_key("auth")),
            ),
    );
    authn_fn(&mut authn);
    let authenticator = Arc::new(SuiteAuthenticator::new(authn));
    let mut metrics = kiln_metrics::registry();
    authenticator.register_metrics(&mut metrics);
    server.set_authenticator(authenticator);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_until(async {
        let _ = stopped.await;
    }));
    Rig {
        endpoint,
        pki,
        state,
        key,
        metrics,
        _dir: dir,
        _stop: stop,
    }
}

impl Rig {
    pub fn claims(&self, role: &str) -> AccessClaims {
        let now = unix_now();
        AccessClaims {
            iss: "kiln".into(),
            aud: "kiln".into(),
            sub: "u-1".into(),
            name: "alice".into(),
            role: role.into(),
            sid: "s-1".into(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            iat_ms: now * 1000,
            nbf: now,
            exp: now + 900,
            ..AccessClaims::default()
        }
    }

    pub async fn client(&self, token: &str) -> AuthServiceClient<kiln_rpc::client::KilnChannel> {
        let ca = std::fs::read_to_string(self.pki.ca_cert()).expect("ca");
        let channel = ClientConfig::new(&self.endpoint)
            .ca_pem(ca)
            .token(token)
            .connect()
            .await
            .expect("connects");
        AuthServiceClient::new(channel)
    }

    pub async fn who_am_i(&self, token: &str) -> Result<pb::Principal, Status> {
        let response = self
            .client(token)
            .await
            .who_am_i(pb::WhoAmIRequest::default())
            .await?;
        Ok(response.into_inner().principal.expect("principal"))
    }
}

pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

pub fn assert_refused(result: Result<pb::Principal, Status>, what: &str) -> Status {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    assert_eq!(reason(&status), "INVALID_TOKEN", "{what}: {status:?}");
    status
}
