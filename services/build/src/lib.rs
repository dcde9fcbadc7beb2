//! kiln-build: workspaces, the build queue, sandboxed builds and their live event logs.
//!
//! [`BuildApi::open`] opens the store, probes the sandbox, recovers what a previous run
//! left behind and starts the scheduler and the cleanup task; [`service`] wraps it for
//! `KilnServer::add_service`. See README.md for the design and its decisions.

mod archive;
mod beneath;
mod config;
mod control;
mod error;
mod files;
mod log;
mod maintenance;
mod metrics;
mod model;
mod outputs;
mod paths;
mod queue;
mod runner;
mod service;
mod store;
mod tar_guard;
mod validate;
mod wire;
mod workspace;
mod wrappers;

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use kiln_proto::build::build_service_server::BuildServiceServer;
use kiln_rpc::limit::MAX_MESSAGE_BYTES_CEILING;
use kiln_sandbox::Sandbox;
use tokio::task::JoinHandle;

pub use config::{
    BuildConfig, BuildFile, BuildLimits, Policy, QueueConfig, Retention, WorkspaceLimits,
};
pub use error::{BuildError, reason};

use crate::control::{BuildControl, LocalControl, PgControl};
use crate::log::Logs;
use crate::metrics::BuildMetrics;
use crate::store::Store;
use crate::workspace::Disk;

/// State shared by the handlers, the scheduler, the runners and the cleanup task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: BuildConfig,
    pub store: Store,
    pub sandbox: Sandbox,
    pub disk: Disk,
    /// Which builds are queued and running, claims, cancels, workspaces held.
    pub control: Arc<dyn BuildControl>,
    pub metrics: BuildMetrics,
    pub logs: Arc<Logs>,
    /// Held from `open` until `shutdown`: one service per data directory.
    dir_lock: Mutex<Option<kiln_store::DirLock>>,
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
        let metrics = BuildMetrics::default();
        let control = open_control(&config, metrics.clone()).await?;
        // Alone, one process per data directory, locked before anything reads or changes
        // it: recovery and the staging sweep below would destroy the work of another live
        // process using it. Replicas sharing the queue share the directory (a volume they
        // all mount) and coordinate through the database instead.
        let dir_lock = match control.replica_id() {
            None => Some(kiln_store::DirLock::acquire(&config.data_dir)?),
            Some(_) => None,
        };
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
        // A staging area per replica: each wipes its own at start, never another's
        // upload in flight; those of replicas gone for an hour are swept.
        let staging = match control.replica_id() {
            None => config.staging_dir(),
            Some(replica) => config.staging_dir().join(format!("replica-{replica}")),
        };
        let disk = Disk {
            root: config.workspaces_dir(),
            staging,
            limits: config.workspace,
        };
        disk.init()?;
        if control.replica_id().is_some() {
            disk.sweep_stale_staging(&config.staging_dir(), maintenance::STALE_AFTER)?;
        }
        sandbox.check_reachable(&disk.root)?;
        let store = Store::open(&config.database(), &config.data_dir.join("outputs")).await?;
        let shared = Arc::new(Shared {
            control,
            metrics,
            config,
            store,
            sandbox,
            disk,
            logs: Arc::new(Logs::default()),
            dir_lock: Mutex::new(dir_lock),
        });
        maintenance::recover(&shared).await?;
        let mut tasks = vec![
            tokio::spawn(scheduler(shared.clone())),
            tokio::spawn(maintenance::cleanup_loop(shared.clone())),
        ];
        if let Some(every) = shared.control.reclaim_interval() {
            tasks.push(tokio::spawn(maintenance::reclaim_loop(
                shared.clone(),
                every,
            )));
        }
        tracing::info!(tier = %shared.sandbox.tier(), "kiln-build ready");
        Ok(BuildApi {
            shared,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }

    /// Adds this service's metrics (`kiln_build_…`) to `registry`.
    pub fn register_metrics(&self, registry: &mut kiln_metrics::Registry) {
        self.shared.metrics.register(registry);
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
        let control = &self.shared.control;
        control.close();
        control.interrupt_all();
        let deadline = tokio::time::Instant::now()
            + self.shared.config.sandbox.kill_grace
            + Duration::from_secs(10);
        if !control.wait_idle(deadline).await {
            tracing::warn!("shutdown: builds still running; a restart marks them INTERRUPTED");
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

/// The build control for this configuration: in memory for a process that owns its
/// SQLite database alone; shared through the database with every other replica when the
/// store is on Postgres.
async fn open_control(
    config: &BuildConfig,
    metrics: BuildMetrics,
) -> Result<Arc<dyn BuildControl>, BuildError> {
    Ok(match config.database() {
        url @ kiln_store::DatabaseUrl::Postgres(_) => {
            Arc::new(PgControl::open(&url.expose(), config.queue, metrics).await?)
        }
        kiln_store::DatabaseUrl::Sqlite(_) => Arc::new(LocalControl::new(config.queue, metrics)),
    })
}

/// Starts queued builds whenever a slot frees up: each claim comes with its workspace
/// held, so a build whose workspace an API change holds (an upload that streams slowly,
/// say) stays queued and is skipped, never occupying a running slot while it waits.
async fn scheduler(shared: Arc<Shared>) {
    let control = shared.control.clone();
    loop {
        let woken = control.wake().notified();
        loop {
            let mut claim = match control.claim().await {
                Ok(Some(claim)) => claim,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "claiming the next build failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            claim.entry.end_queue_wait();
            // A span of the StartBuild call's trace, though that call returned long ago.
            // When that trace is not recorded, `carry` keeps the run out of it too.
            let span = tracing::info_span!("build.run", build_id = %claim.entry.build_id);
            let trace = claim.entry.trace.clone();
            trace.adopt(&span);
            tokio::spawn(
                trace
                    .carry(runner::run(shared.clone(), claim))
                    .instrument(span),
            );
        }
        if control.is_closed() {
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
