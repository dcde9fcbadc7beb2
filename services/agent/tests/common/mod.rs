//! Test rig of kiln-agent: the real [`AgentApi`] with its real store and the real
//! provider client, talking to the scripted fake LLM server over HTTP, and a fake
//! kiln-build that keeps workspaces in temporary directories and runs a build's steps
//! there for real (python3, cc, …, without a sandbox: the sandbox is kiln-build's and is
//! tested there), so the diagnosis reads real tool output.
#![allow(dead_code)]

#[path = "../../../../libs/llm/tests/common/mod.rs"]
pub mod fake_llm;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use kiln_agent::clients::BuildEvents;
use kiln_agent::{AgentApi, AgentConfig, BuildClient, Credential, Delegation, Delegator};
use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_server::AgentService;
use kiln_proto::build as build_pb;
use kiln_rpc::identity::{AuthMethod, Principal, Role};
use serde_json::json;
use tokio::sync::watch;
use tonic::Status;

pub use fake_llm::{FakeProvider, Reply};

pub const MODEL: &str = "qwen-test";

/// What the fake kiln-build saw.
#[derive(Debug, Clone)]
pub struct Call {
    pub rpc: &'static str,
    pub token: String,
}

#[derive(Default)]
struct BuildState {
    workspaces: HashMap<String, (String, PathBuf)>,
    /// Build id → its events (complete once the build ran).
    builds: HashMap<String, Vec<build_pb::BuildEvent>>,
    by_request: HashMap<String, String>,
    calls: Vec<Call>,
    cancelled: Vec<String>,
}

/// The fake kiln-build.
#[derive(Clone)]
pub struct FakeBuild {
    state: Arc<Mutex<BuildState>>,
    root: Arc<tempfile::TempDir>,
    /// While true, builds stay RUNNING after their Started event.
    hold: watch::Sender<bool>,
    pub allowed_programs: Vec<String>,
    /// Where builds run: the runtime that made the fake, as kiln-build is a process of
    /// its own that outlives an agent replica killed mid-build (tests/replicas.rs).
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for FakeBuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeBuild")
    }
}

impl FakeBuild {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            root: Arc::new(tempfile::tempdir().unwrap()),
            hold: watch::channel(false).0,
            allowed_programs: ["python3", "cc", "make", "node", "cargo"]
                .map(String::from)
                .to_vec(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    pub fn hold_builds(&self, hold: bool) {
        self.hold.send_replace(hold);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn builds_started(&self) -> usize {
        self.state.lock().unwrap().builds.len()
    }

    pub fn cancelled(&self) -> Vec<String> {
        self.state.lock().unwrap().cancelled.clone()
    }

    /// A workspace's files, as the fake holds them.
    pub fn files(&self, workspace_id: &str) -> BTreeMap<String, String> {
        let dir = self.state.lock().unwrap().workspaces[workspace_id]
            .1
            .clone();
        let mut out = BTreeMap::new();
        for entry in walk(&dir) {
            let rel = entry
                .strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel.contains("__pycache__") {
                continue;
            }
            out.insert(rel, std::fs::read_to_string(&entry).unwrap_or_default());
        }
        out
    }

    /// Creates a workspace holding `files`, owned by `owner`.
    pub fn add_workspace(&self, owner: &str, files: &[(&str, &str)]) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.root.path().join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        for (path, content) in files {
            std::fs::write(dir.join(path), content).unwrap();
        }
        self.state
            .lock()
            .unwrap()
            .workspaces
            .insert(id.clone(), (owner.to_owned(), dir));
        id
    }

    fn record(&self, rpc: &'static str, cred: &Credential) {
        self.state.lock().unwrap().calls.push(Call {
            rpc,
            token: cred.token().to_owned(),
        });
    }

    fn dir(&self, id: &str) -> Result<PathBuf, Status> {
        self.state
            .lock()
            .unwrap()
            .workspaces
            .get(id)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| Status::not_found(format!("workspace {id:?} not found")))
    }

    fn run_build(&self, id: String, dir: PathBuf, steps: Vec<build_pb::Step>) {
        use build_pb::build_event::Event as B;
        let state = self.state.clone();
        let mut hold = self.hold.subscribe();
        self.runtime.spawn(async move {
            let push = |e: B| {
                let mut s = state.lock().unwrap();
                let events = s.builds.get_mut(&id).unwrap();
                let sequence = events.len() as u64 + 1;
                events.push(build_pb::BuildEvent {
                    sequence,
                    time: None,
                    event: Some(e),
                });
            };
            push(B::Started(build_pb::Started {
                sandbox_tier: build_pb::SandboxTier::None as i32,
                workspace_path: dir.to_string_lossy().into_owned(),
            }));
            let _ = hold.wait_for(|h| !*h).await;
            if state.lock().unwrap().cancelled.contains(&id) {
                push(finished(build_pb::BuildState::Cancelled));
                return;
            }
            let mut ok = true;
            for (i, step) in steps.iter().enumerate() {
                let i = i as u32;
                push(B::StepStarted(build_pb::StepStarted {
                    step_index: i,
                    argv: step.argv.clone(),
                }));
                let out = tokio::process::Command::new(&step.argv[0])
                    .args(&step.argv[1..])
                    .current_dir(dir.join(&step.working_dir))
                    .output()
                    .await;
                let (code, stdout, stderr) = match out {
                    Ok(o) => (o.status.code().unwrap_or(-1), o.stdout, o.stderr),
                    Err(e) => (127, Vec::new(), e.to_string().into_bytes()),
                };
                for (stream, data) in [
                    (build_pb::OutputStream::Stdout, stdout),
                    (build_pb::OutputStream::Stderr, stderr),
                ] {
                    if !data.is_empty() {
                        push(B::Output(build_pb::Output {
                            step_index: i,
                            stream: stream as i32,
                            offset: 0,
                            data: data.into(),
                        }));
                    }
                }
                push(B::StepFinished(build_pb::StepFinished {
                    step_index: i,
                    exit_code: Some(code),
                    succeeded: code == 0,
                    ..Default::default()
                }));
                if code != 0 {
                    ok = false;
                    break;
                }
            }
            push(finished(if ok {
                build_pb::BuildState::Succeeded
            } else {
                build_pb::BuildState::Failed
            }));
        });
    }
}

fn finished(state: build_pb::BuildState) -> build_pb::build_event::Event {
    build_pb::build_event::Event::Finished(build_pb::Finished {
        state: state as i32,
        ..Default::default()
    })
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

impl BuildClient for FakeBuild {
    fn get_policy(
        &self,
        cred: &Credential,
    ) -> BoxFuture<'_, Result<build_pb::GetPolicyResponse, Status>> {
        self.record("GetPolicy", cred);
        let allowed = self.allowed_programs.clone();
        Box::pin(async move {
            Ok(build_pb::GetPolicyResponse {
                allowed_programs: allowed,
                ..Default::default()
            })
        })
    }

    fn create_workspace(
        &self,
        cred: &Credential,
        _request: build_pb::CreateWorkspaceRequest,
    ) -> BoxFuture<'_, Result<build_pb::Workspace, Status>> {
        self.record("CreateWorkspace", cred);
        let id = self.add_workspace(&owner_of(cred), &[]);
        Box::pin(async move {
            Ok(build_pb::Workspace {
                id,
                ..Default::default()
            })
        })
    }

    fn get_workspace(
        &self,
        cred: &Credential,
        id: &str,
    ) -> BoxFuture<'_, Result<build_pb::Workspace, Status>> {
        self.record("GetWorkspace", cred);
        let owner = self
            .state
            .lock()
            .unwrap()
            .workspaces
            .get(id)
            .map(|(o, _)| o.clone());
        let id = id.to_owned();
        let caller = owner_of(cred);
        Box::pin(async move {
            match owner {
                Some(o) if o == caller => Ok(build_pb::Workspace {
                    id,
                    owner: o,
                    ..Default::default()
                }),
                _ => Err(Status::not_found(format!("workspace {id:?} not found"))),
            }
        })
    }

    fn delete_workspace(&self, cred: &Credential, id: &str) -> BoxFuture<'_, Result<(), Status>> {
        self.record("DeleteWorkspace", cred);
        self.state.lock().unwrap().workspaces.remove(id);
        Box::pin(async { Ok(()) })
    }

    fn list_files(
        &self,
        cred: &Credential,
        id: &str,
    ) -> BoxFuture<'_, Result<Vec<build_pb::FileInfo>, Status>> {
        self.record("ListFiles", cred);
        let dir = self.dir(id);
        Box::pin(async move {
            let dir = dir?;
            Ok(walk(&dir)
                .into_iter()
                .map(|p| build_pb::FileInfo {
                    path: p.strip_prefix(&dir).unwrap().to_string_lossy().into_owned(),
                    file_type: build_pb::FileType::Regular as i32,
                    size_bytes: std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
                    ..Default::default()
                })
                .collect())
        })
    }

    fn read_file(
        &self,
        cred: &Credential,
        id: &str,
        path: &str,
        _max: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, Status>> {
        self.record("ReadFile", cred);
        let file = self.dir(id).map(|d| d.join(path));
        Box::pin(async move { std::fs::read(file?).map_err(|e| Status::not_found(e.to_string())) })
    }

    fn write_files(
        &self,
        cred: &Credential,
        request: build_pb::WriteFilesRequest,
    ) -> BoxFuture<'_, Result<build_pb::Workspace, Status>> {
        self.record("WriteFiles", cred);
        let dir = self.dir(&request.workspace_id);
        Box::pin(async move {
            let dir = dir?;
            // As kiln-build: deletes first, and a path that is not there is NOT_FOUND.
            for path in &request.delete_paths {
                let target = dir.join(path);
                if !target.exists() {
                    return Err(Status::not_found(format!("path {path:?} not found")));
                }
                if target.is_dir() {
                    std::fs::remove_dir_all(target).unwrap();
                } else {
                    std::fs::remove_file(target).unwrap();
                }
            }
            for f in request.files {
                let path = dir.join(&f.path);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, &f.content).unwrap();
            }
            Ok(build_pb::Workspace {
                id: request.workspace_id,
                ..Default::default()
            })
        })
    }

    fn start_build(
        &self,
        cred: &Credential,
        request: build_pb::StartBuildRequest,
    ) -> BoxFuture<'_, Result<build_pb::Build, Status>> {
        self.record("StartBuild", cred);
        let dir = self.dir(&request.workspace_id);
        Box::pin(async move {
            let dir = dir?;
            let mut s = self.state.lock().unwrap();
            if let Some(id) = s.by_request.get(&request.request_id) {
                return Ok(build_pb::Build {
                    id: id.clone(),
                    ..Default::default()
                });
            }
            let id = uuid::Uuid::new_v4().to_string();
            s.by_request.insert(request.request_id.clone(), id.clone());
            s.builds.insert(
                id.clone(),
                vec![build_pb::BuildEvent {
                    sequence: 1,
                    time: None,
                    event: Some(build_pb::build_event::Event::Queued(
                        build_pb::Queued::default(),
                    )),
                }],
            );
            drop(s);
            self.run_build(id.clone(), dir, request.steps);
            Ok(build_pb::Build {
                id,
                ..Default::default()
            })
        })
    }

    fn watch_build(
        &self,
        cred: &Credential,
        build_id: &str,
        after: u64,
    ) -> BoxFuture<'_, Result<BuildEvents, Status>> {
        self.record("WatchBuild", cred);
        let state = self.state.clone();
        let id = build_id.to_owned();
        Box::pin(async move {
            if !state.lock().unwrap().builds.contains_key(&id) {
                return Err(Status::not_found("no such build"));
            }
            // Polls the fake's log: every event after `after`, until Finished.
            let stream = futures::stream::unfold(
                (state, id, after, false),
                |(state, id, next, done)| async move {
                    if done {
                        return None;
                    }
                    loop {
                        let event = state.lock().unwrap().builds[&id]
                            .get(next as usize)
                            .cloned();
                        if let Some(event) = event {
                            let end = matches!(
                                event.event,
                                Some(build_pb::build_event::Event::Finished(_))
                            );
                            return Some((Ok(event), (state, id, next + 1, end)));
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            );
            Ok(stream.boxed())
        })
    }

    fn cancel_build(&self, cred: &Credential, build_id: &str) -> BoxFuture<'_, Result<(), Status>> {
        self.record("CancelBuild", cred);
        self.state
            .lock()
            .unwrap()
            .cancelled
            .push(build_id.to_owned());
        self.hold.send_replace(false);
        Box::pin(async { Ok(()) })
    }
}

/// Delegated tokens are `delegated:<owner>:<task>`; user tokens are `user:<owner>`.
fn owner_of(cred: &Credential) -> String {
    let t = cred.token();
    t.split(':').nth(1).unwrap_or("").to_owned()
}

#[derive(Debug, Default)]
pub struct FakeDelegator {
    pub refuse: Mutex<Option<Status>>,
}

impl Delegator for FakeDelegator {
    fn exchange(
        &self,
        subject: &str,
        task_id: &str,
        _ws: &str,
        lifetime: Duration,
    ) -> BoxFuture<'_, Result<Delegation, Status>> {
        let refused = self.refuse.lock().unwrap().clone();
        let owner = subject.strip_prefix("user:").unwrap_or("?").to_owned();
        let task_id = task_id.to_owned();
        Box::pin(async move {
            if let Some(status) = refused {
                return Err(status);
            }
            Ok(Delegation {
                token: Credential::new(format!("delegated:{owner}:{task_id}")),
                expires_at: SystemTime::now() + lifetime,
                actor: "spiffe://kiln.local/service/agent".to_owned(),
            })
        })
    }
}

/// The agent under test with its fakes.
pub struct Rig {
    pub llm: FakeProvider,
    pub build: FakeBuild,
    pub delegator: Arc<FakeDelegator>,
    pub dir: tempfile::TempDir,
    pub api: AgentApi,
}

/// The store on the current test's backend (the same one again for the same `dir`).
pub async fn config(dir: &std::path::Path, llm_url: &str) -> AgentConfig {
    let mut config = AgentConfig::new(dir.join("agent"));
    config.database_url = kiln_testkit::database_url_in(dir).await;
    config.provider = fake_llm::fast_config(kiln_llm::ProviderKind::Openai, llm_url);
    config.heartbeat = Duration::from_millis(500);
    config
}

impl Rig {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut AgentConfig)) -> Self {
        let llm = FakeProvider::start().await;
        llm.always(
            "/v1/models",
            Reply::json(200, &json!({"data": [{"id": MODEL}]})),
        );
        let dir = tempfile::tempdir().unwrap();
        let build = FakeBuild::new();
        let delegator = Arc::new(FakeDelegator::default());
        let mut config = config(dir.path(), &llm.url()).await;
        tune(&mut config);
        let api = AgentApi::open(config, Arc::new(build.clone()), delegator.clone())
            .await
            .unwrap();
        Self {
            llm,
            build,
            delegator,
            dir,
            api,
        }
    }

    /// Stops the agent (tasks stay as persisted) and opens it again on the same store.
    pub async fn restart(&mut self) {
        self.api.shutdown(Duration::from_secs(5)).await;
        let config = config(self.dir.path(), &self.llm.url()).await;
        self.api = AgentApi::open(config, Arc::new(self.build.clone()), self.delegator.clone())
            .await
            .unwrap();
    }

    /// Queues a streamed answer of the model.
    pub fn answer(&self, text: &str) {
        self.answer_with_usage(text, (100, 50));
    }

    pub fn answer_with_usage(&self, text: &str, usage: (u64, u64)) {
        // Split in a few deltas, as a real server streams.
        let chunks: Vec<String> = text
            .as_bytes()
            .chunks(40)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        self.llm.push(
            "/v1/chat/completions",
            Reply::openai_stream(&refs, "stop", Some(usage)),
        );
    }

    pub fn plan(&self) {
        self.answer(
            r#"{"summary": "a calc module with tests", "files": ["calc.py", "test_calc.py"]}"#,
        );
    }
}

/// A request as the kiln layer would hand it over: the principal in the extensions,
/// the bearer token in the metadata.
pub fn request<T>(user: &str, role: Role, body: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.extensions_mut().insert(Principal {
        subject: user.to_owned(),
        username: user.to_owned(),
        role: Some(role),
        auth_method: AuthMethod::Token,
        expires_at: None,
        session_id: Some("s".into()),
        api_key_id: None,
        actor: None,
        scope: None,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer user:{user}").parse().unwrap(),
    );
    request
}

pub fn python_task(prompt: &str) -> pb::StartTaskRequest {
    pb::StartTaskRequest {
        prompt: prompt.to_owned(),
        toolchain: "python".to_owned(),
        ..Default::default()
    }
}

/// Starts a task as `alice` and follows it to the end; returns all events.
pub async fn run(api: &AgentApi, req: pb::StartTaskRequest) -> Vec<pb::TaskEvent> {
    let stream = api
        .run_task(request("alice", Role::User, req))
        .await
        .expect("RunTask")
        .into_inner();
    collect(stream).await
}

pub async fn collect(
    mut stream: futures::stream::BoxStream<'static, Result<pb::TaskEvent, Status>>,
) -> Vec<pb::TaskEvent> {
    let mut events = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let next = tokio::time::timeout_at(until, stream.next())
            .await
            .expect("the task ended in time");
        match next {
            None => return events,
            Some(Ok(e)) => events.push(e),
            Some(Err(s)) => panic!("stream error: {s:?}"),
        }
    }
}

pub fn result(events: &[pb::TaskEvent]) -> pb::TaskResult {
    match events.last().and_then(|e| e.event.clone()) {
        Some(pb::task_event::Event::Result(r)) => r,
        other => panic!("the last event is not a result: {other:?}"),
    }
}

pub fn phases(events: &[pb::TaskEvent]) -> Vec<pb::Phase> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::task_event::Event::PhaseChanged(p)) => pb::Phase::try_from(p.phase).ok(),
            _ => None,
        })
        .collect()
}

/// Stored events are dense from 1 (heartbeats repeat the last sequence).
pub fn assert_dense(events: &[pb::TaskEvent]) {
    let stored: Vec<u64> = events
        .iter()
        .filter(|e| !matches!(e.event, Some(pb::task_event::Event::Heartbeat(_))))
        .map(|e| e.sequence)
        .collect();
    let expected: Vec<u64> = (1..=stored.len() as u64).collect();
    assert_eq!(stored, expected, "sequences must be dense from 1");
}

pub fn text_files(files: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (path, content) in files {
        out.push_str(&format!(
            "=== FILE: {path} ===\n{content}=== END FILE ===\n"
        ));
    }
    out
}

pub const GOOD_CALC: &str = "def add(a, b):\n    return a + b\n";
pub const BAD_CALC: &str = "def add(a, b):\n    return a - b\n";
pub const TEST_CALC: &str = "import unittest\nfrom calc import add\n\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n\nif __name__ == '__main__':\n    unittest.main()\n";

impl Rig {
    /// Starts a task as alice.
    pub async fn start_task(&self, req: pb::StartTaskRequest) -> pb::Task {
        self.api
            .start_task(request("alice", Role::User, req))
            .await
            .expect("StartTask")
            .into_inner()
    }

    /// Cancels alice's task and returns it as CancelTask answered.
    pub async fn cancel(&self, id: &str) -> pb::Task {
        self.api
            .cancel_task(request(
                "alice",
                Role::User,
                pb::CancelTaskRequest {
                    task_id: id.to_owned(),
                },
            ))
            .await
            .expect("CancelTask")
            .into_inner()
            .task
            .expect("a task")
    }

    /// Every event of alice's task, from the first, to its end.
    pub async fn watch_all(&self, id: &str) -> Vec<pb::TaskEvent> {
        let stream = self
            .api
            .watch_task(request(
                "alice",
                Role::User,
                pb::WatchTaskRequest {
                    task_id: id.to_owned(),
                    after_sequence: 0,
                },
            ))
            .await
            .expect("WatchTask")
            .into_inner();
        collect(stream).await
    }
}

/// Polls `done` every 20 ms for up to 10 s; fails with `what` otherwise.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < until, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
