//! A scripted AgentService over real gRPC (plain HTTP/2 on 127.0.0.1), for testing what
//! the CLI does with a task's stream — cuts, resumes, Ctrl-C, errors — without a model.
//! It serves one task whose log is given up front; it records what the CLI asked.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use kiln_proto::agent as pb;
use kiln_proto::agent::agent_service_server::{AgentService, AgentServiceServer};
use kiln_proto::agent::task_event::Event;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub const TASK_ID: &str = "7d1c4c1e-0000-4000-8000-000000000001";

/// What the fake answers.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// The task's whole log, sequences 1, 2, …; the last is usually the result.
    pub events: Vec<pb::TaskEvent>,
    /// RunTask's stream breaks (UNAVAILABLE, no details, as a transport cut looks)
    /// after the event with this sequence.
    pub run_cut_after: Option<u64>,
    /// Streams stop after this sequence until CancelTask; then the task ends CANCELLED
    /// with two more events (the phase change and the result).
    pub hold_after: Option<u64>,
    /// CancelTask is recorded but the task does not end (a server slow to stop it).
    pub cancel_ignored: bool,
    /// StartTask and RunTask answer this instead.
    pub start_error: Option<Status>,
    /// ListModels answers this instead.
    pub models_error: Option<Status>,
}

/// What the CLI sent.
#[derive(Debug, Default)]
pub struct Calls {
    pub run: Vec<pb::StartTaskRequest>,
    pub start: Vec<pb::StartTaskRequest>,
    pub watch_after: Vec<u64>,
    pub cancels: usize,
    pub list: Vec<pb::ListTasksRequest>,
}

pub struct FakeAgent {
    pub addr: SocketAddr,
    pub calls: Arc<Mutex<Calls>>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeAgent {
    /// Serves `script` on a free port of 127.0.0.1 until dropped.
    pub fn start(script: Script) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let calls = Arc::new(Mutex::new(Calls::default()));
        let (cancelled, _) = watch::channel(false);
        let service = Service {
            script: Arc::new(script),
            calls: calls.clone(),
            cancelled: Arc::new(cancelled),
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binds");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Self {
            addr,
            calls,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The task as GetTask, ListTasks and StartTask return it.
pub fn task(phase: pb::Phase) -> pb::Task {
    pb::Task {
        id: TASK_ID.into(),
        owner: "u-1".into(),
        prompt: "a command-line tool that adds two numbers and prints the sum, with tests".into(),
        toolchain: "python".into(),
        model: "fake-coder:1b".into(),
        max_iterations: 3,
        workspace_id: "w-1".into(),
        phase: phase as i32,
        iteration: 1,
        created_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        usage: Some(pb::Usage {
            prompt_tokens: 100,
            completion_tokens: 40,
            model_calls: 2,
        }),
        build_ids: vec!["b-1".into()],
        ..Default::default()
    }
}

/// Event `sequence`, stamped one second after the one before, from 2023-11-14T22:13:20Z.
pub fn event(sequence: u64, event: Event) -> pb::TaskEvent {
    pb::TaskEvent {
        sequence,
        time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000 + i64::try_from(sequence).unwrap_or(0),
            nanos: 0,
        }),
        event: Some(event),
    }
}

pub fn phase(previous: pb::Phase, phase: pb::Phase, message: &str) -> Event {
    Event::PhaseChanged(pb::PhaseChanged {
        previous_phase: previous as i32,
        phase: phase as i32,
        iteration: 0,
        message: message.into(),
    })
}

pub fn result(phase: pb::Phase, reason: &str) -> Event {
    Event::Result(pb::TaskResult {
        phase: phase as i32,
        message: format!("ended {}", phase.as_str_name()),
        reason: reason.into(),
        workspace_id: "w-1".into(),
        build_id: "b-1".into(),
        iterations: 1,
        usage: Some(pb::Usage {
            prompt_tokens: 100,
            completion_tokens: 40,
            model_calls: 2,
        }),
    })
}

#[derive(Clone)]
struct Service {
    script: Arc<Script>,
    calls: Arc<Mutex<Calls>>,
    cancelled: Arc<watch::Sender<bool>>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TaskEvent, Status>> + Send>>;

impl Service {
    fn stream(&self, after: u64, cut_after: Option<u64>) -> EventStream {
        let (tx, rx) = mpsc::channel(16);
        let script = self.script.clone();
        let mut cancelled = self.cancelled.subscribe();
        tokio::spawn(async move {
            let held = script.hold_after;
            for e in script.events.iter().filter(|e| e.sequence > after) {
                if held.is_some_and(|h| e.sequence > h) {
                    break;
                }
                if tx.send(Ok(e.clone())).await.is_err() {
                    return;
                }
                if cut_after == Some(e.sequence) {
                    let _ = tx.send(Err(Status::unavailable("connection reset"))).await;
                    return;
                }
            }
            let Some(h) = held else { return };
            tokio::select! {
                _ = cancelled.wait_for(|c| *c) => {}
                () = tx.closed() => return,
            }
            let ending = [
                event(
                    h + 1,
                    phase(pb::Phase::Generate, pb::Phase::Cancelled, "cancelled"),
                ),
                event(h + 2, result(pb::Phase::Cancelled, "CANCELLED")),
            ];
            for e in ending.into_iter().filter(|e| e.sequence > after) {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.calls.lock().unwrap().start.push(request.into_inner());
        if let Some(err) = &self.script.start_error {
            return Err(err.clone());
        }
        Ok(Response::new(task(pb::Phase::Queued)))
    }

    type RunTaskStream = EventStream;

    async fn run_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.calls.lock().unwrap().run.push(request.into_inner());
        if let Some(err) = &self.script.start_error {
            return Err(err.clone());
        }
        Ok(Response::new(self.stream(0, self.script.run_cut_after)))
    }

    type WatchTaskStream = EventStream;

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        if request.task_id != TASK_ID {
            return Err(kiln_rpc::ApiError::not_found("task", &request.task_id).into());
        }
        self.calls
            .lock()
            .unwrap()
            .watch_after
            .push(request.after_sequence);
        Ok(Response::new(self.stream(request.after_sequence, None)))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        if request.get_ref().task_id != TASK_ID {
            return Err(kiln_rpc::ApiError::not_found("task", &request.get_ref().task_id).into());
        }
        Ok(Response::new(task(pb::Phase::Build)))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.calls.lock().unwrap().list.push(request.into_inner());
        Ok(Response::new(pb::ListTasksResponse {
            tasks: vec![task(pb::Phase::Fix), task(pb::Phase::Done)],
            next_page_token: String::new(),
        }))
    }

    async fn cancel_task(
        &self,
        _request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        self.calls.lock().unwrap().cancels += 1;
        if !self.script.cancel_ignored {
            self.cancelled.send_replace(true);
        }
        Ok(Response::new(pb::CancelTaskResponse {
            task: Some(task(pb::Phase::Cancelled)),
        }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        if let Some(err) = &self.script.models_error {
            return Err(err.clone());
        }
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![
                pb::Model {
                    name: "fake-coder:1b".into(),
                    size_bytes: Some(1_300_000_000),
                    context_tokens: Some(8192),
                    modified_at: None,
                },
                pb::Model {
                    name: "fake-coder:7b".into(),
                    size_bytes: None,
                    context_tokens: None,
                    modified_at: None,
                },
            ],
            provider: pb::ProviderKind::OpenaiCompatible as i32,
            provider_url: "http://127.0.0.1:9/v1".into(),
            default_model: "fake-coder:1b".into(),
        }))
    }
}
