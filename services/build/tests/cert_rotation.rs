//! Certificates that rotate under a live server: a build streams its output while the
//! server certificate, the client's workload certificate and the CA behind both are
//! replaced (a CA rollover through a bundle with the old and the new CA), over real mTLS.
//!
//! What a user of short-lived (SPIFFE-style) certificates checks: the stream in flight
//! completes, new calls present the new certificate (the server sees its serial), and a
//! certificate that expired or whose CA was retired is refused.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::future::BoxFuture;
use kiln_proto::build as pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::ClientConfig;
use kiln_rpc::identity::{Authenticator, BearerToken, PeerInfo, WorkloadId};
use kiln_rpc::pki::{CertificateAuthority, Issued};
use kiln_rpc::reloading_client::ClientTlsFiles;
use kiln_rpc::tls::TlsFiles;
use kiln_rpc::{ApiError, KilnServer, Principal, ServerSettings};
use pb::build_event::Event;

/// How often both sides look at their files here (10 s in production).
const RELOAD: Duration = Duration::from_millis(100);

/// How long anything observed from outside may take to happen.
const PATIENCE: Duration = Duration::from_secs(20);

/// The test authenticator, noting the client certificate serial of every call.
#[derive(Default)]
struct Recording {
    serials: Mutex<Vec<Option<String>>>,
}

impl Recording {
    fn last(&self) -> Option<String> {
        self.serials.lock().expect("lock").last().cloned().flatten()
    }
}

impl Authenticator for Recording {
    fn authenticate<'a>(
        &'a self,
        token: &'a BearerToken,
        peer: &'a PeerInfo,
    ) -> BoxFuture<'a, Result<Principal, ApiError>> {
        self.serials
            .lock()
            .expect("lock")
            .push(peer.certificate_serial.clone());
        TestAuth.authenticate(token, peer)
    }
}

/// Writes `contents` the way issuers do: to a temporary name, then renamed into place.
fn put(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn serial(dir: &Path, issued: &Issued) -> String {
    let path = dir.join("serial-probe.pem");
    put(&path, &issued.cert_pem);
    let certs = kiln_rpc::tls::read_certs(&path).expect("cert");
    kiln_rpc::tls::certificate_serial(&certs[0]).expect("serial")
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }
    fn server_tls(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join("server.pem"),
            key: self.dir.join("server-key.pem"),
            client_ca: self.bundle(),
        }
    }
    fn client_tls(&self) -> ClientTlsFiles {
        ClientTlsFiles::new(self.bundle())
            .identity(self.dir.join("agent.pem"), self.dir.join("agent-key.pem"))
            .reload_interval(RELOAD)
    }
    fn set_bundle(&self, cas: &[&CertificateAuthority]) {
        let pem: String = cas.iter().map(|ca| ca.cert_pem()).collect();
        put(&self.bundle(), &pem);
    }
    fn set_server(&self, ca: &CertificateAuthority) {
        let issued = ca.issue_server(&["localhost", "127.0.0.1"]).expect("cert");
        put(&self.dir.join("server.pem"), &issued.cert_pem);
        put(&self.dir.join("server-key.pem"), &issued.key_pem);
    }
    /// A new agent workload certificate from `ca`, valid for `lifetime`; returns it.
    fn set_agent(&self, ca: &CertificateAuthority, lifetime: Duration) -> Issued {
        let id = WorkloadId {
            trust_domain: "kiln.local".into(),
            service: "agent".into(),
        };
        let issued = ca.issue_workload_for(&id, lifetime).expect("cert");
        put(&self.dir.join("agent.pem"), &issued.cert_pem);
        put(&self.dir.join("agent-key.pem"), &issued.key_pem);
        issued
    }
}

/// One call over a fresh connection with fixed certificates.
async fn fixed_call(
    endpoint: &str,
    ca: &CertificateAuthority,
    cert: Option<&Issued>,
) -> Result<(), String> {
    let mut config = ClientConfig::new(endpoint)
        .ca_pem(ca.cert_pem())
        .token("alice-user");
    if let Some(cert) = cert {
        config = config.identity(cert.cert_pem.clone(), cert.key_pem.clone());
    }
    let channel = config.connect().await.map_err(|e| e.to_string())?;
    BuildServiceClient::new(channel)
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .map(drop)
        .map_err(|s| format!("{s:?}"))
}

async fn until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A step that prints a numbered line every 50 ms until the file `release` appears in
/// the workspace, then `released` (and gives up after 90 s).
fn until_released() -> pb::Step {
    step(&[
        "python3",
        "-c",
        "import os, sys, time\n\
         deadline = time.time() + 90\n\
         i = 0\n\
         while not os.path.exists('release'):\n\
         \x20   print('line %d' % i, flush=True); i += 1\n\
         \x20   if time.time() > deadline: sys.exit(3)\n\
         \x20   time.sleep(0.05)\n\
         print('released', flush=True)\n",
    ])
}

async fn next_output(stream: &mut tonic::Streaming<pb::BuildEvent>, log: &mut Log) {
    loop {
        let event = stream.message().await.expect("stream ok").expect("more");
        let output = matches!(event.event, Some(Event::Output(_)));
        if !matches!(event.event, Some(Event::Heartbeat(_))) {
            log.events.push(event);
        }
        if output {
            return;
        }
    }
}

#[tokio::test]
async fn certificates_rotate_under_a_streaming_build_through_a_ca_rollover() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki {
        dir: tmp.path().join("pki"),
    };
    std::fs::create_dir(&pki.dir).expect("mkdir");
    let old_ca = CertificateAuthority::new("old CA").expect("ca");
    pki.set_bundle(&[&old_ca]);
    pki.set_server(&old_ca);
    let first = pki.set_agent(&old_ca, Duration::from_secs(3600));

    let data_dir = tmp.path().join("data");
    let api = kiln_build::BuildApi::open(config(&data_dir.join("build")))
        .await
        .expect("build api opens");
    let mut settings = ServerSettings::new("127.0.0.1:0".parse().expect("addr"), pki.server_tls());
    settings.rate_limit = None;
    settings.shutdown_grace = Duration::from_millis(100);
    settings.tls_reload_interval = RELOAD;
    let recording = Arc::new(Recording::default());
    let server = KilnServer::new(settings)
        .with_authenticator(recording.clone())
        .add_service(kiln_build::service(api))
        .bind()
        .await
        .expect("binds");
    let endpoint = format!("https://{}", server.local_addr());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_until(async {
        let _ = stopped.await;
    }));

    // The client follows its files, as a service's calls to another do.
    let channel = ClientConfig::new(&endpoint)
        .tls_files(pki.client_tls())
        .token("alice-user")
        .connect()
        .await
        .expect("connects");
    let mut c = BuildServiceClient::new(channel);
    let ws = workspace(&mut c, vec![]).await;
    assert_eq!(
        recording.last(),
        Some(serial(tmp.path(), &first)),
        "the server sees the first certificate"
    );
    let build = c
        .start_build(build_req(&ws.id, vec![until_released()]))
        .await
        .expect("start")
        .into_inner();
    let mut stream = c
        .watch_build(pb::WatchBuildRequest {
            build_id: build.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut log = Log::default();
    next_output(&mut stream, &mut log).await;
    let before_rotation = log.events.len();

    // 1. CA rollover, first half: both sides trust the old and the new CA, then the
    //    leaves are reissued by the new CA. The client's new one is short-lived.
    let new_ca = CertificateAuthority::new("new CA").expect("ca");
    pki.set_bundle(&[&old_ca, &new_ca]);
    tokio::time::sleep(RELOAD * 5).await;
    pki.set_server(&new_ca);
    let short_lived = pki.set_agent(&new_ca, Duration::from_secs(10));
    let second = serial(tmp.path(), &short_lived);
    until("new calls present the reissued certificate", || {
        let mut c = c.clone();
        let recording = recording.clone();
        let second = second.clone();
        async move {
            c.list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .is_ok()
                && recording.last().as_deref() == Some(second.as_str())
        }
    })
    .await;
    // New connections get the server's new certificate: a client trusting only the new
    // CA gets through.
    until("the server presents its reissued certificate", || async {
        fixed_call(&endpoint, &new_ca, None).await.is_ok()
    })
    .await;

    // 2. Second half: the old CA is retired from the bundle. A certificate it issued is
    //    refused on new connections; the rotated client carries on.
    pki.set_bundle(&[&new_ca]);
    until("a certificate of the retired CA is refused", || async {
        fixed_call(&endpoint, &new_ca, Some(&first)).await.is_err()
    })
    .await;
    fixed_call(&endpoint, &new_ca, Some(&short_lived))
        .await
        .expect("the new CA's certificate is accepted");
    c.list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .expect("the rotated client carries on");

    // 3. The short-lived certificate is renewed before it expires; once expired, it is
    //    refused while the renewed one works.
    let renewed = pki.set_agent(&new_ca, Duration::from_secs(3600));
    let third = serial(tmp.path(), &renewed);
    until("new calls present the renewed certificate", || {
        let mut c = c.clone();
        let recording = recording.clone();
        let third = third.clone();
        async move {
            c.list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .is_ok()
                && recording.last().as_deref() == Some(third.as_str())
        }
    })
    .await;
    until("the expired certificate is refused", || async {
        fixed_call(&endpoint, &new_ca, Some(&short_lived))
            .await
            .is_err()
    })
    .await;
    c.list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .expect("the renewed certificate works");

    // The stream opened before all this is still live and ends as the build does.
    let during = log.events.len();
    next_output(&mut stream, &mut log).await;
    assert!(
        log.events.len() > during,
        "the stream in flight still delivers"
    );
    std::fs::write(
        data_dir
            .join("build")
            .join("workspaces")
            .join(&ws.id)
            .join("release"),
        "",
    )
    .expect("release the build");
    let rest = tokio::time::timeout(PATIENCE, collect(stream))
        .await
        .expect("the build finished in time");
    log.events.extend(rest.events);
    assert!(log.events.len() > before_rotation + 2);
    log.assert_dense_from(1);
    assert_eq!(log.state(), pb::BuildState::Succeeded);
    let stdout = String::from_utf8(log.stdout(0)).expect("utf-8");
    assert!(stdout.starts_with("line 0\n"), "{stdout}");
    assert!(stdout.ends_with("released\n"), "{stdout}");
}
