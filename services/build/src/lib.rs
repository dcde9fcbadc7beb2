//! kiln-build: workspaces, the build queue, sandboxed builds and their live event logs.
//!
//! [`BuildApi::open`] opens the store, probes the sandbox, recovers what a previous run
//! left behind and starts the scheduler and the cleanup task; [`service`] wraps it for
//! `KilnServer::add_service`. See README.md for the design and its decisions.

mod archive;
mod beneath;
mod config;
mod error;
mod files;
mod log;
mod maintenance;
mod metrics;
mod outputs;
mod paths;
mod queue;
mod runner;
mod service;
mod store;
mod tar_guard;
mod validate;
mod workspace;
mod wrappers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use kiln_proto::build::build_service_server::BuildServiceServer;
use kiln_rpc::limit::MAX_MESSAGE_BYTES_CEILING;
use kiln_sandbox::Sandbox;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{
    BuildConfig, BuildFile, BuildLimits, Policy, QueueConfig, Retention, WorkspaceLimits,
};
pub use error::{BuildError, reason};

use crate::log::Logs;
use crate::queue::Queue;
use crate::runner::Stop;
use crate::store::Store;
use crate::workspace::Disk;

/// State shared by the handlers, the scheduler, the runners and the cleanup task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: BuildConfig,
    pub store: Store,
    pub sandbox: Sandbox,
    pub disk: Disk,
    pub queue: Queue,
    pub logs: Arc<Logs>,
    /// Stop switches of the builds handed to runners, by build id.
    runs: Mutex<HashMap<String, watch::Sender<Stop>>>,
    runs_changed: tokio::sync::Notify,
    /// One lock per workspace: API changes and builds never overlap.
    ws_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held from `open` until `shutdown`: one service per data directory.
    dir_lock: Mutex<Option<kiln_store::DirLock>>,
}

impl Shared {
    pub fn workspace_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ws_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// Takes the workspace's lock for an API change. Letting it go wakes the scheduler,
    /// which skips builds whose workspace is held (see [`scheduler`]).
    pub async fn lock_workspace(self: &Arc<Self>, id: &str) -> WorkspaceGuard {
        WorkspaceGuard {
            guard: Some(self.workspace_lock(id).lock_owned().await),
            shared: self.clone(),
        }
    }

    pub fn forget_workspace_lock(&self, id: &str) {
        self.ws_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub fn stop_build(&self, id: &str, stop: Stop) -> bool {
        match self.runs.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            Some(tx) => {
                tx.send_replace(stop);
                true
            }
            None => false,
        }
    }

    /// Cancels a build wherever it is: takes it out of the queue (the caller ends it), or
    /// tells its runner. Under the `runs` lock, which the scheduler also holds from
    /// taking a build off the queue to registering its runner, so a build is never seen
    /// in neither place and a cancel is never lost.
    pub fn cancel_build(&self, owner: &str, id: &str, grace: Duration) -> Cancelled {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if self.queue.remove(owner, id) {
            return Cancelled::Dequeued;
        }
        match runs.get(id) {
            Some(tx) => {
                tx.send_replace(Stop::Cancel(grace));
                Cancelled::Signalled
            }
            None => Cancelled::NotRunning,
        }
    }

    pub fn runs_remove(&self, id: &str) {
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.runs_changed.notify_waiters();
    }

    fn runs_len(&self) -> usize {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A workspace held for an API change; dropping it wakes the scheduler.
pub(crate) struct WorkspaceGuard {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WorkspaceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkspaceGuard")
    }
}

impl Drop for WorkspaceGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.shared.queue.wake.notify_one();
    }
}

/// The build service: implements `kiln.build.v1.BuildService`. Cheap to clone (keep a
/// clone to call [`BuildApi::shutdown`] after handing one to [`service`]).
#[derive(Debug, Clone)]
pub struct BuildApi {
    shared: Arc<Shared>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl BuildApi {
    /// Opens the store (`database_url`, by default `<data_dir>/build.db`, SQLite in WAL
    /// mode; or schema `build` on Postgres; migrations embedded),
    /// probes the sandbox (refusing to start below tier B unless
    /// `config.sandbox.allow_unsandboxed`), recovers (builds that were RUNNING end
    /// INTERRUPTED with their logs kept; QUEUED ones are queued again), and starts the
    /// scheduler and the cleanup task.
    pub async fn open(mut config: BuildConfig) -> Result<BuildApi, BuildError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| BuildError::io("creating the data directory", e))?;
        // Before anything reads or changes the directory: recovery and the staging sweep
        // below would destroy the work of another live process using it.
        let dir_lock = kiln_store::DirLock::acquire(&config.data_dir)?;
        config.data_dir = config
            .data_dir
            .canonicalize()
            .map_err(|e| BuildError::io("resolving the data directory", e))?;
        let sandbox_config = config.sandbox.clone();
        let sandbox = tokio::task::spawn_blocking(move || Sandbox::new(sandbox_config))
            .await
            .map_err(|e| BuildError::Config(format!("sandbox probe: {e}")))??;
        if sandbox.tier() == kiln_sandbox::Tier::None && !config.sandbox.allow_unsandboxed {
            return Err(BuildError::Config("the sandbox offers no isolation".into()));
        }
        let disk = Disk {
            root: config.workspaces_dir(),
            staging: config.staging_dir(),
            limits: config.workspace,
        };
        disk.init()?;
        sandbox.check_reachable(&disk.root)?;
        let store = Store::open(&config.database(), &config.data_dir.join("outputs")).await?;
        let shared = Arc::new(Shared {
            queue: Queue::new(config.queue),
            config,
            store,
            sandbox,
            disk,
            logs: Arc::new(Logs::default()),
            runs: Mutex::new(HashMap::new()),
            runs_changed: tokio::sync::Notify::new(),
            ws_locks: Mutex::new(HashMap::new()),
            dir_lock: Mutex::new(Some(dir_lock)),
        });
        maintenance::recover(&shared).await?;
        let tasks = vec![
            tokio::spawn(scheduler(shared.clone())),
            tokio::spawn(maintenance::cleanup_loop(shared.clone())),
        ];
        tracing::info!(tier = %shared.sandbox.tier(), "kiln-build ready");
        Ok(BuildApi {
            shared,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }

    /// Adds this service's metrics (`kiln_build_…`) to `registry`.
    pub fn register_metrics(&self, registry: &mut kiln_metrics::Registry) {
        self.shared.queue.metrics.register(registry);
    }

    /// What this service needs in order to serve, for health: its database, and a
    /// writable workspaces directory (a full or read-only disk fails every build).
    pub fn readiness(&self) -> Vec<Arc<dyn kiln_rpc::readiness::Readiness>> {
        use kiln_rpc::readiness::check_fn;
        let shared = self.shared.clone();
        let store = check_fn("build store", move || {
            let shared = shared.clone();
            Box::pin(async move { shared.store.ping().await.map_err(|e| e.to_string()) })
        });
        let dir = self.shared.config.workspaces_dir();
        let disk = check_fn("workspaces directory", move || {
            let probe = dir.join(".kiln-ready");
            Box::pin(async move {
                tokio::fs::write(&probe, b"ok")
                    .await
                    .map_err(|e| format!("{}: {e}", probe.display()))?;
                tokio::fs::remove_file(&probe)
                    .await
                    .map_err(|e| format!("{}: {e}", probe.display()))
            })
        });
        vec![store, disk]
    }

    /// The sandbox tier builds run in.
    pub fn sandbox_tier(&self) -> kiln_sandbox::Tier {
        self.shared.sandbox.tier()
    }

    /// Stops starting builds; running builds are stopped (their step's tree killed) and
    /// end INTERRUPTED with their logs; queued builds stay QUEUED and run after a
    /// restart. Waits for the runners up to the sandbox's kill grace plus 10 s, then
    /// releases the data directory for the next service to open.
    pub async fn shutdown(&self) {
        self.shared.queue.close();
        let ids: Vec<String> = self
            .shared
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in &ids {
            self.shared.stop_build(id, Stop::Interrupt);
        }
        let deadline = tokio::time::Instant::now()
            + self.shared.config.sandbox.kill_grace
            + Duration::from_secs(10);
        while self.shared.runs_len() > 0 {
            let changed = self.shared.runs_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.shared.runs_len() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!("shutdown: builds still running; a restart marks them INTERRUPTED");
                break;
            }
        }
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
        // Its state is now what a restart understands: the next service may take over.
        self.shared
            .dir_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// Starts queued builds whenever a slot frees up.
///
/// A build is handed out only together with its workspace's lock, taken without
/// waiting: one whose workspace an API change holds (an upload that streams slowly, say)
/// stays queued and is skipped, so it never occupies a running slot while it waits and
/// other builds go first. Releasing the lock wakes this loop.
async fn scheduler(shared: Arc<Shared>) {
    loop {
        let woken = shared.queue.wake.notified();
        loop {
            // Dequeue and register under one lock: see `Shared::cancel_build`.
            let mut runs = shared.runs.lock().unwrap_or_else(|p| p.into_inner());
            let Some((mut entry, workspace)) = shared.queue.next(|entry| {
                shared
                    .workspace_lock(&entry.workspace_id)
                    .try_lock_owned()
                    .ok()
            }) else {
                break;
            };
            let (tx, rx) = watch::channel(Stop::No);
            runs.insert(entry.build_id.clone(), tx);
            drop(runs);
            entry.end_queue_wait();
            // A span of the StartBuild call's trace, though that call returned long ago.
            let span = tracing::info_span!("build.run", build_id = %entry.build_id);
            entry.trace.adopt(&span);
            tokio::spawn(runner::run(shared.clone(), entry, workspace, rx).instrument(span));
        }
        if shared.queue.is_closed() {
            return;
        }
        woken.await;
    }
}

/// The tonic service, ready for `KilnServer::add_service`. Its decode limit is the
/// ceiling because the kiln layer enforces the configured limit first.
pub fn service(api: BuildApi) -> BuildServiceServer<BuildApi> {
    BuildServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES_CEILING)
}

/// What [`Shared::cancel_build`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cancelled {
    /// The build was still queued and was taken out: the caller ends it.
    Dequeued,
    /// Its runner was told to stop the step (SIGTERM, SIGKILL after the grace).
    Signalled,
    /// Neither queued nor running here (it is ending, or ended).
    NotRunning,
}
