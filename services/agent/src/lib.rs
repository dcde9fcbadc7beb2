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
pub mod control;
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
use control::TaskControl;
pub use error::AgentError;
use store::Store;
use workflow::{Logs, Shared};

/// The agent service's handlers and its runners.
#[derive(Debug, Clone)]
pub struct AgentApi {
    shared: Arc<Shared>,
    /// Held while the service runs (released by [`shutdown`](Self::shutdown)) when it
    /// runs its tasks alone (SQLite): another process on the same data directory would
    /// run the same tasks twice. Replicas on Postgres share the tasks through
    /// [`control::PgControl`] instead, and take no lock.
    dir_lock: Arc<Mutex<Option<kiln_store::DirLock>>>,
    /// The loop that claims tasks nobody runs (replicas on Postgres only).
    claimer: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// The task control for `url`: shared by every replica on Postgres, in memory on SQLite.
async fn open_control(
    config: &AgentConfig,
    url: &kiln_store::DatabaseUrl,
) -> Result<Arc<dyn TaskControl>, AgentError> {
    Ok(match url {
        kiln_store::DatabaseUrl::Postgres(_) => Arc::new(
            control::PgControl::open(
                &url.expose(),
                config.tasks.lease,
                config.max_running_tasks.max(1),
            )
            .await?,
        ),
        kiln_store::DatabaseUrl::Sqlite(_) => Arc::new(control::LocalControl::new()),
    })
}

impl AgentApi {
    /// Opens the store and continues the unfinished tasks that no other process runs:
    /// on SQLite every one a previous run left; on Postgres those whose replica is gone
    /// or stopped, as many as this replica runs at once (and from then on, whatever
    /// other replicas leave behind).
    pub async fn open(
        config: AgentConfig,
        build: Arc<dyn BuildClient>,
        delegator: Arc<dyn Delegator>,
    ) -> Result<Self, AgentError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            AgentError::Open(format!("creating {}: {e}", config.data_dir.display()))
        })?;
        let url = config.database();
        let dir_lock = match url {
            kiln_store::DatabaseUrl::Sqlite(_) => {
                Some(kiln_store::DirLock::acquire(&config.data_dir)?)
            }
            kiln_store::DatabaseUrl::Postgres(_) => None,
        };
        let store = Store::open(&url).await?;
        let control = open_control(&config, &url).await?;
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
            control,
            stopping: watch::channel(false).0,
            runners: Mutex::new(Vec::new()),
            metrics: metrics::AgentMetrics::default(),
        });
        let continued = claim_unowned(&shared).await?;
        if continued > 0 {
            tracing::info!(tasks = continued, "continuing unfinished tasks");
        }
        let claimer = shared
            .control
            .reclaim_interval()
            .map(|every| tokio::spawn(claim_loop(Arc::downgrade(&shared), every)));
        Ok(Self {
            shared,
            dir_lock: Arc::new(Mutex::new(dir_lock)),
            claimer: Arc::new(Mutex::new(claimer)),
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
        if let Some(claimer) = self
            .claimer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            claimer.abort();
        }
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

/// Claims the unfinished tasks nobody runs and starts their runners, each from its state
/// as stored once claimed (the previous holder may have written until it let go).
/// Returns how many it started.
async fn claim_unowned(shared: &Arc<Shared>) -> Result<usize, AgentError> {
    let unfinished = shared.store.unfinished().await?;
    let ids: Vec<String> = unfinished.into_iter().map(|t| t.record.id).collect();
    let claims = shared.control.claim_unowned(&ids).await?;
    let mut started = 0;
    for claim in claims {
        match shared.store.get(&claim.task_id).await? {
            Some(task) if !task.record.is_final() => {
                workflow::spawn(shared, task, claim);
                started += 1;
            }
            // It ended meanwhile.
            _ => shared.control.release(&claim.task_id, true).await?,
        }
    }
    Ok(started)
}

/// Looks for tasks nobody runs (a replica died, stopped, or was too busy to take a new
/// one) every `every` and whenever the control says some may have appeared, until the
/// service stops.
async fn claim_loop(shared: std::sync::Weak<Shared>, every: Duration) {
    loop {
        // Only the control is held while waiting: an AgentApi dropped without a
        // shutdown ends this loop at its next look.
        let (control, mut stopping) = match shared.upgrade() {
            Some(this) => (this.control.clone(), this.stopping.subscribe()),
            None => return,
        };
        if *stopping.borrow() {
            return;
        }
        tokio::select! {
            () = control.wake().notified() => {}
            () = tokio::time::sleep(every) => {}
            _ = stopping.changed() => return,
        }
        drop(control);
        let Some(this) = shared.upgrade() else {
            return;
        };
        match claim_unowned(&this).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tasks = n, "continuing tasks no other replica runs"),
            Err(e) => tracing::warn!(error = %e, "looking for tasks no replica runs failed"),
        }
    }
}

/// The tonic service, ready for `KilnServer::add_service`. Its own decode limit is set to
/// the ceiling because the kiln layer enforces the configured limit (answering
/// RESOURCE_EXHAUSTED, as gRPC clients expect) before a message reaches tonic.
pub fn service(api: AgentApi) -> AgentServiceServer<AgentApi> {
    AgentServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES_CEILING)
}
