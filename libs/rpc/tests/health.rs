//! Health follows readiness: a service whose store or disk breaks says NOT_SERVING (and
//! so does the server as a whole) until it recovers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::fake_auth::{FakeAuth, FakeAuthState};
use kiln_proto::auth::auth_service_server::AuthServiceServer;
use kiln_rpc::client::ClientConfig;
use kiln_rpc::pki::ensure_dev_pki;
use kiln_rpc::readiness::check_fn;
use kiln_rpc::{KilnServer, ServerSettings};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const AUTH: &str = "kiln.auth.v1.AuthService";

#[tokio::test]
async fn a_failing_dependency_turns_its_service_and_the_server_not_serving_until_it_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = ensure_dev_pki(&dir.path().join("pki"), "kiln.local", &["auth"]).expect("pki");
    let mut settings = ServerSettings::new("127.0.0.1:0".parse().expect("addr"), pki.server_tls());
    settings.health_check_interval = Duration::from_millis(50);
    let broken = Arc::new(AtomicBool::new(false));
    let flag = broken.clone();
    let server = KilnServer::new(settings)
        .with_readiness(
            AUTH,
            check_fn("fake store", move || {
                let broken = flag.load(Ordering::SeqCst);
                Box::pin(async move {
                    if broken {
                        Err("disk full".to_owned())
                    } else {
                        Ok(())
                    }
                })
            }),
        )
        .add_service(AuthServiceServer::new(FakeAuth {
            state: Arc::new(FakeAuthState::default()),
        }))
        .bind()
        .await
        .expect("binds");
    let endpoint = format!("https://{}", server.local_addr());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_until(async {
        let _ = stopped.await;
    }));

    let ca = std::fs::read_to_string(pki.ca_cert()).expect("ca");
    let mut health = HealthClient::new(
        ClientConfig::new(&endpoint)
            .ca_pem(ca)
            .connect()
            .await
            .expect("connects"),
    );
    let mut watch_service = health
        .watch(HealthCheckRequest {
            service: AUTH.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut watch_all = health
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    async fn next(stream: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a status within 10 s")
            .expect("stream open")
            .expect("a status")
            .status()
    }
    assert_eq!(next(&mut watch_service).await, ServingStatus::Serving);
    assert_eq!(next(&mut watch_all).await, ServingStatus::Serving);

    broken.store(true, Ordering::SeqCst);
    assert_eq!(next(&mut watch_service).await, ServingStatus::NotServing);
    assert_eq!(next(&mut watch_all).await, ServingStatus::NotServing);

    broken.store(false, Ordering::SeqCst);
    assert_eq!(next(&mut watch_service).await, ServingStatus::Serving);
    assert_eq!(next(&mut watch_all).await, ServingStatus::Serving);
}
