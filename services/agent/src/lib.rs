//! kiln-agent: LLM tasks: prompt, plan, generate, validate, build and fix until green.
//!
//! [`AgentApi`] serves `kiln.agent.v1.AgentService`. A task is a persisted state machine
//! ([`workflow`]) that calls an LLM provider (`kiln-llm`), checks the model's files
//! ([`guard`]), writes and builds them in kiln-build ([`clients`]) with a token kiln-auth
//! delegated to the task, and feeds the located errors ([`diagnose`]) back to the model.
//! Its events go to a `kiln-eventlog` log, so WatchTask has WatchBuild's guarantees.
//!
//! The pure parts: [`diagnose`] turns a failed build's output into a located diagnosis,
//! [`reply`] defines and parses the format in which the model returns files, and
//! [`guard`] checks such a reply (VALIDATE) before anything is written.

pub mod clients;
pub mod config;
pub mod diagnose;
pub mod error;
pub mod guard;
mod metrics;
pub mod prompt;
pub mod reply;
mod service;
pub mod store;
pub mod task;
pub mod toolchain;
pub mod workflow;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::agent::agent_service_server::AgentServiceServer;
use kiln_rpc::limit::MAX_MESSAGE_BYTES_CEILING;
use tokio::sync::{Semaphore, watch};

pub use clients::{
    BuildClient, ChannelSlot, Credential, Delegation, Delegator, GrpcBuildClient, GrpcDelegator,
};
pub use config::{AgentConfig, AgentFile};
pub use error::AgentError;
use store::Store;
use workflow::{Logs, Shared};

/// The agent service's handlers and its runners.
#[derive(Debug, Clone)]
pub struct AgentApi {
    shared: Arc<Shared>,
    /// Held while the service runs (released by [`shutdown`](Self::shutdown)): another
    /// process on the same data directory would run the same tasks twice.
    dir_lock: Arc<Mutex<Option<kiln_store::DirLock>>>,
}

impl AgentApi {
    /// Opens the store, and continues every task a previous run left unfinished.
    pub async fn open(
        config: AgentConfig,
        build: Arc<dyn BuildClient>,
        delegator: Arc<dyn Delegator>,
    ) -> Result<Self, AgentError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            AgentError::Open(format!("creating {}: {e}", config.data_dir.display()))
        })?;
        let dir_lock = kiln_store::DirLock::acquire(&config.data_dir)?;
        let store = Store::open(&config.database()).await?;
        let provider =
            kiln_llm::from_config(&config.provider).map_err(|e| AgentError::Open(e.to_string()))?;
        let reply_form = config
            .reply_form
            .unwrap_or_else(|| prompt::ReplyForm::choose(provider.as_ref()));
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(config.max_running_tasks.max(1))),
            config,
            store,
            logs: Arc::new(Logs::default()),
            provider,
            reply_form,
            build,
            delegator,
            cancels: Mutex::new(Default::default()),
            stopping: watch::channel(false).0,
            runners: Mutex::new(Vec::new()),
            metrics: metrics::AgentMetrics::default(),
        });
        let unfinished = shared.store.unfinished().await?;
        if !unfinished.is_empty() {
            tracing::info!(tasks = unfinished.len(), "continuing unfinished tasks");
        }
        for task in unfinished {
            workflow::spawn(&shared, task);
        }
        Ok(Self {
            shared,
            dir_lock: Arc::new(Mutex::new(Some(dir_lock))),
        })
    }

    /// Adds this service's metrics (`kiln_agent_…`: tasks by phase, finished tasks, model
    /// calls and their latency, tokens, fix iterations) to `registry`.
    pub fn register_metrics(&self, registry: &mut kiln_metrics::Registry) {
        self.shared.metrics.register(registry);
    }

    /// Health checks for the server's readiness: the store answers.
    pub fn readiness(&self) -> Vec<Arc<dyn kiln_rpc::readiness::Readiness>> {
        let shared = self.shared.clone();
        vec![kiln_rpc::readiness::check_fn("agent store", move || {
            let shared = shared.clone();
            Box::pin(async move { shared.store.ping().await.map_err(|e| e.to_string()) })
        })]
    }

    /// Stops the runners, leaving every unfinished task as last persisted: the next
    /// start continues it. Waits up to `grace` for them to let go.
    pub async fn shutdown(&self, grace: Duration) {
        self.shared.stopping.send_replace(true);
        let handles: Vec<_> = std::mem::take(
            &mut *self
                .shared
                .runners
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let all = futures::future::join_all(handles);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("agent runners did not stop within {grace:?}");
        }
        self.shared.store.close().await;
        self.dir_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// The tonic service, ready for `KilnServer::add_service`. Its own decode limit is set to
/// the ceiling because the kiln layer enforces the configured limit (answering
/// RESOURCE_EXHAUSTED, as gRPC clients expect) before a message reaches tonic.
pub fn service(api: AgentApi) -> AgentServiceServer<AgentApi> {
    AgentServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES_CEILING)
}
