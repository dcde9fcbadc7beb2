//! A real kiln server on 127.0.0.1 with the build service, a development PKI, and a test
//! authenticator mapping bearer tokens `<name>-<role>` (e.g. `alice-user`) to principals.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_build::{BuildApi, BuildConfig};
use kiln_proto::build as pb;
use kiln_proto::build::build_service_client::BuildServiceClient;
use kiln_rpc::client::{ClientConfig, KilnChannel};
use kiln_rpc::identity::{AuthMethod, Authenticator, BearerToken, PeerInfo};
use kiln_rpc::pki::ensure_dev_pki;
use kiln_rpc::{ApiError, KilnServer, Principal, Role, ServerSettings};
use pb::build_event::Event;
use tonic::{Code, Status};
use tonic_types::StatusExt;

pub type Client = BuildServiceClient<KilnChannel>;

/// `alice-user` → subject `alice`, role user; `vera-viewer`, `adam-admin` likewise.
#[derive(Debug)]
pub struct TestAuth;

impl Authenticator for TestAuth {
    fn authenticate<'a>(
        &'a self,
        token: &'a BearerToken,
        _peer: &'a PeerInfo,
    ) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async move {
            let (name, role) = token
                .as_str()
                .rsplit_once('-')
                .and_then(|(n, r)| Some((n, Role::parse(r)?)))
                .ok_or_else(|| ApiError::unauthenticated("INVALID_TOKEN", "unknown test token"))?;
            Ok(Principal {
                subject: name.to_owned(),
                username: name.to_owned(),
                role: Some(role),
                auth_method: AuthMethod::Token,
                expires_at: None,
                session_id: None,
                api_key_id: None,
                actor: None,
                scope: None,
            })
        })
    }
}

/// Test defaults: short kill grace, small heartbeat, everything else as shipped.
pub fn config(data_dir: &Path) -> BuildConfig {
    let mut c = BuildConfig::new(data_dir.to_path_buf());
    c.sandbox.kill_grace = Duration::from_millis(300);
    c
}

pub struct Rig {
    pub endpoint: String,
    pub ca: String,
    pub api: BuildApi,
    pub data_dir: PathBuf,
    pub dir: Option<tempfile::TempDir>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn rig() -> Rig {
    rig_with(|_| {}).await
}

pub async fn rig_with(f: impl FnOnce(&mut BuildConfig)) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rig = rig_at(dir.path(), f).await;
    rig.dir = Some(dir);
    rig
}

/// A server over the data directory `data_dir` (which may hold a previous run's state).
pub async fn rig_at(data_dir: &Path, f: impl FnOnce(&mut BuildConfig)) -> Rig {
    let (endpoint, ca, api, stop) = serve(data_dir, f).await;
    Rig {
        endpoint,
        ca,
        api,
        data_dir: data_dir.to_path_buf(),
        dir: None,
        _stop: stop,
    }
}

pub async fn serve(
    data_dir: &Path,
    f: impl FnOnce(&mut BuildConfig),
) -> (String, String, BuildApi, tokio::sync::oneshot::Sender<()>) {
    let pki = ensure_dev_pki(&data_dir.join("pki"), "kiln.local", &["build"]).expect("pki");
    let mut cfg = config(&data_dir.join("build"));
    cfg.database_url = kiln_testkit::database_url_in(data_dir).await;
    f(&mut cfg);
    let api = BuildApi::open(cfg).await.expect("build api opens");
    let mut settings = ServerSettings::new("127.0.0.1:0".parse().expect("addr"), pki.server_tls());
    settings.rate_limit = None;
    settings.shutdown_grace = Duration::from_millis(100);
    let server = KilnServer::new(settings)
        .with_authenticator(Arc::new(TestAuth))
        .add_service(kiln_build::service(api.clone()))
        .bind()
        .await
        .expect("binds");
    let endpoint = format!("https://{}", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve_until(async {
        let _ = stopped.await;
    }));
    let ca = std::fs::read_to_string(pki.ca_cert()).expect("ca");
    (endpoint, ca, api, stop)
}

impl Rig {
    pub async fn client(&self, token: &str) -> Client {
        client(&self.endpoint, &self.ca, token).await
    }

    pub fn workspace_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("build").join("workspaces").join(id)
    }
}

pub async fn client(endpoint: &str, ca: &str, token: &str) -> Client {
    let channel = ClientConfig::new(endpoint)
        .ca_pem(ca)
        .token(token)
        .connect()
        .await
        .expect("connects");
    BuildServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub fn file(path: &str, content: impl Into<Vec<u8>>) -> pb::File {
    pb::File {
        path: path.into(),
        content: content.into().into(),
        executable: false,
    }
}

pub async fn workspace(c: &mut Client, files: Vec<pb::File>) -> pb::Workspace {
    c.create_workspace(pb::CreateWorkspaceRequest {
        files,
        ..Default::default()
    })
    .await
    .expect("workspace created")
    .into_inner()
}

/// The paths ListFiles gives under `directory` ("" for the whole workspace), in its order.
pub async fn names_in(c: &mut Client, ws: &str, directory: &str) -> Vec<String> {
    c.list_files(pb::ListFilesRequest {
        workspace_id: ws.into(),
        directory: directory.into(),
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner()
    .files
    .into_iter()
    .map(|f| f.path)
    .collect()
}

/// A whole file through ReadFile, or the status that ended the call or its stream.
pub async fn read_whole(c: &mut Client, ws: &str, path: &str) -> Result<Vec<u8>, Status> {
    let mut stream = c
        .read_file(pb::ReadFileRequest {
            workspace_id: ws.into(),
            path: path.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut content = Vec::new();
    while let Some(part) = stream.message().await? {
        content.extend_from_slice(&part.data);
    }
    Ok(content)
}

pub fn step(argv: &[&str]) -> pb::Step {
    pb::Step {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

pub fn build_req(ws: &str, steps: Vec<pb::Step>) -> pb::StartBuildRequest {
    pb::StartBuildRequest {
        workspace_id: ws.into(),
        steps,
        ..Default::default()
    }
}

/// Everything a watch stream delivered.
#[derive(Debug, Default)]
pub struct Log {
    pub events: Vec<pb::BuildEvent>,
}

impl Log {
    pub fn stdout(&self, step: u32) -> Vec<u8> {
        self.stream(step, pb::OutputStream::Stdout)
    }

    pub fn stderr(&self, step: u32) -> Vec<u8> {
        self.stream(step, pb::OutputStream::Stderr)
    }

    fn stream(&self, step: u32, stream: pb::OutputStream) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.events {
            if let Some(Event::Output(o)) = &e.event
                && o.step_index == step
                && o.stream == stream as i32
            {
                assert_eq!(o.offset, out.len() as u64, "offsets are contiguous");
                out.extend_from_slice(&o.data);
            }
        }
        out
    }

    pub fn finished(&self) -> pb::Finished {
        match self.events.last().and_then(|e| e.event.clone()) {
            Some(Event::Finished(f)) => f,
            other => panic!("the log does not end with Finished: {other:?}"),
        }
    }

    pub fn state(&self) -> pb::BuildState {
        pb::BuildState::try_from(self.finished().state).expect("state")
    }

    pub fn step_results(&self) -> Vec<pb::StepFinished> {
        self.events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::StepFinished(s)) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Sequences are dense from `first` (heartbeats excluded).
    pub fn assert_dense_from(&self, first: u64) {
        let seqs: Vec<u64> = self
            .events
            .iter()
            .filter(|e| !matches!(e.event, Some(Event::Heartbeat(_))))
            .map(|e| e.sequence)
            .collect();
        let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "dense sequences");
    }
}

pub async fn collect(mut stream: tonic::Streaming<pb::BuildEvent>) -> Log {
    let mut log = Log::default();
    while let Some(e) = stream.message().await.expect("stream ok") {
        if !matches!(e.event, Some(Event::Heartbeat(_))) {
            log.events.push(e);
        }
    }
    log
}

pub async fn run(c: &mut Client, req: pb::StartBuildRequest) -> Log {
    let stream = c.run_build(req).await.expect("run build").into_inner();
    tokio::time::timeout(Duration::from_secs(120), collect(stream))
        .await
        .expect("build finished in time")
}

pub async fn watch(c: &mut Client, id: &str, after: u64) -> Log {
    let stream = c
        .watch_build(pb::WatchBuildRequest {
            build_id: id.into(),
            after_sequence: after,
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(120), collect(stream))
        .await
        .expect("build finished in time")
}

pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

pub fn fields(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// Asserts code, reason and that `field` is among the violations.
pub fn assert_invalid(status: &Status, code: Code, reason_: &str, field: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(status), reason_, "{status:?}");
    assert!(
        fields(status).iter().any(|f| f == field),
        "want field {field}: {status:?}"
    );
}

/// Waits until `cond` holds, polling (for state observed from outside, e.g. files
/// written by a build).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
