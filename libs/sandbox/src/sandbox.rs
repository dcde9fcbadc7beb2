//! The public entry points: [`Sandbox`], [`Child`], [`ChildControl`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::cgroup::StepCgroup;
use crate::config::{SandboxConfig, Tier};
use crate::error::{Error, Result};
use crate::monitor::{Monitor, Request};
use crate::outcome::{Control, Enforcement, ExitStatus, Mechanism, Outcome, Reason};
use crate::output::{self, Budget, OutputReceiver, Stream};
use crate::plan::{self, HostFacts};
use crate::probe::{self, Probe};
use crate::seccomp::{InetSockets, SeccompFilters, UnixSockets};
use crate::spawn::{self, IdMap};
use crate::spec::CommandSpec;
use crate::status::Labels;

/// A configured sandbox. Cheap to clone; spawn as many steps as you like concurrently.
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SandboxConfig,
    probe: Probe,
    tier: Tier,
    seccomp: Option<SeccompFilters>,
    next_id: AtomicU64,
    /// This process's command line and environment strings, which every supervisor
    /// overwrites in its copy of our memory.
    arg_area: Option<plan::ArgArea>,
    /// When this sandbox was made (ns since the epoch): part of its cgroup names.
    started_nanos: u128,
}

impl Sandbox {
    /// Probes the host and picks the tier: the best available, or
    /// [`SandboxConfig::force_tier`]. Fails when the host offers neither tier A nor B
    /// and `allow_unsandboxed` is off.
    pub fn new(config: SandboxConfig) -> Result<Self> {
        let probe = probe::probe_with(&config);
        Self::with_probe(config, probe)
    }

    /// Like [`Sandbox::new`] with a probe done before (probing takes a few ms).
    pub fn with_probe(config: SandboxConfig, probe: Probe) -> Result<Self> {
        let tier = match config.force_tier {
            Some(Tier::A) => match probe.tier_a_missing() {
                None => Tier::A,
                Some(why) => {
                    return Err(Error::TierUnavailable {
                        wanted: Tier::A,
                        why,
                    });
                }
            },
            Some(Tier::B) => match probe.tier_b_missing() {
                None => Tier::B,
                Some(why) => {
                    return Err(Error::TierUnavailable {
                        wanted: Tier::B,
                        why,
                    });
                }
            },
            Some(Tier::None) | None => probe.tier,
        };
        let tier = match (tier, config.force_tier) {
            (_, Some(Tier::None)) if config.allow_unsandboxed => Tier::None,
            (Tier::None, _) if !config.allow_unsandboxed => {
                return Err(Error::NoIsolation {
                    why: probe.tier_b_missing().unwrap_or_default(),
                });
            }
            (t, _) => t,
        };
        let seccomp = match tier {
            Tier::None => None,
            Tier::A => Some(SeccompFilters::build(InetSockets::Any, UnixSockets::Any)?),
            // Landlock ABI 4 brought TCP rules; below it only seccomp can keep tier B off
            // the host's network. Tier B shares the host's socket files too: only
            // socketpair(AF_UNIX) is allowed.
            Tier::B if probe.landlock_abi >= 4 => Some(SeccompFilters::build(
                InetSockets::StreamOnly,
                UnixSockets::PairOnly,
            )?),
            Tier::B => Some(SeccompFilters::build(
                InetSockets::None,
                UnixSockets::PairOnly,
            )?),
        };
        let arg_area = plan::ArgArea::of_self();
        if arg_area.is_none() && tier != Tier::None {
            tracing::warn!(
                "cannot locate this process's command line in /proc/self/stat: steps may \
                 read it from their supervisor"
            );
        }
        if tier == Tier::None {
            tracing::warn!("running build steps WITHOUT isolation (allow_unsandboxed)");
        } else {
            tracing::info!(%probe, tier = %tier, "sandbox ready");
        }
        Ok(Sandbox {
            inner: Arc::new(Inner {
                config,
                probe,
                tier,
                seccomp,
                next_id: AtomicU64::new(0),
                arg_area,
                started_nanos: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            }),
        })
    }

    /// The tier steps run in.
    pub fn tier(&self) -> Tier {
        self.inner.tier
    }

    /// What the host allows.
    pub fn probe(&self) -> &Probe {
        &self.inner.probe
    }

    /// The configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// Where `workspace` appears to the step: [`WORKSPACE_MOUNT`](crate::WORKSPACE_MOUNT)
    /// in tier A, the host path otherwise. Use it for `HOME`, `TMPDIR` and friends.
    pub fn workspace_in_sandbox(&self, workspace: &Path) -> PathBuf {
        match self.inner.tier {
            Tier::A => PathBuf::from(plan::WORKSPACE_MOUNT),
            _ => workspace
                .canonicalize()
                .unwrap_or_else(|_| workspace.to_path_buf()),
        }
    }

    /// Checks that steps can reach workspaces under `dir`. Tier A bind-mounts the
    /// workspace, so any path works; in tier B (and without isolation) a step opens the
    /// host path itself, as [`SandboxConfig::run_as`] when the service is root, and that
    /// uid needs search permission on every parent. A data directory under a 0700 home
    /// fails here, once and clearly, instead of in every build.
    pub fn check_reachable(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let (uid, gid) = self.inner.config.effective_run_as();
        if self.inner.tier == Tier::A || uid == nix::unistd::geteuid().as_raw() {
            return Ok(());
        }
        let mut blocked = None;
        for ancestor in dir.ancestors() {
            let meta = std::fs::metadata(ancestor)
                .map_err(|e| Error::io(format!("stat {}", ancestor.display()), e))?;
            let mode = meta.permissions().mode();
            let search = if meta.uid() == uid {
                mode & 0o100
            } else if meta.gid() == gid {
                mode & 0o010
            } else {
                mode & 0o001
            };
            if search == 0 {
                blocked = Some((ancestor.to_path_buf(), mode & 0o7777));
            }
        }
        match blocked {
            None => Ok(()),
            Some((parent, mode)) => Err(Error::InvalidWorkspace {
                path: dir.to_path_buf(),
                why: format!(
                    "tier {} steps run as uid {uid}, which cannot enter {} (mode {mode:04o}); \
                     put the data directory where that uid can traverse every parent \
                     (e.g. /var/lib/kiln), or set run_as",
                    self.inner.tier,
                    parent.display()
                ),
            }),
        }
    }

    /// Gives the workspace tree to the sandbox user (`lchown -R`), so steps can write it.
    /// Needed once per workspace when the service runs as root (steps then run as
    /// [`SandboxConfig::run_as`]); a no-op otherwise. Symlinks are never followed, not
    /// even one a still-running process swaps in mid-walk: the walk is fd-relative
    /// (`fchownat(AT_SYMLINK_NOFOLLOW)` on entries of directories opened `O_NOFOLLOW`).
    pub fn prepare_workspace(&self, workspace: &Path) -> Result<()> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let (uid, gid) = self.inner.config.effective_run_as();
        crate::disk::chown_tree(workspace, uid, gid)
            .map_err(|e| Error::io(format!("chown {}", workspace.display()), e))
    }

    /// Starts `spec`. Errors are about the request (bad argv, working directory outside
    /// the workspace) or the host (no pipes, clone refused); a program that cannot be
    /// executed inside the sandbox is reported by the [`Outcome`] as SPAWN_FAILED.
    pub async fn spawn(&self, spec: CommandSpec) -> Result<Child> {
        let started = Instant::now();
        spec.validate()?;
        let inner = &self.inner;
        let workspace = canonical_workspace(&spec)?;

        let mut enforced = vec![
            Enforcement {
                control: Control::WallTime,
                mechanism: Mechanism::Monitor,
            },
            Enforcement {
                control: Control::Output,
                mechanism: Mechanism::Monitor,
            },
        ];
        if spec.limits.disk_bytes.is_some() || spec.limits.disk_entries.is_some() {
            enforced.push(Enforcement {
                control: Control::Disk,
                mechanism: Mechanism::Monitor,
            });
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Process ids are reused: a group left behind by an earlier process (one that
        // died before removing it) must not collide with ours, hence the start time.
        let name = format!(
            "kiln-step-{}-{}-{id}",
            std::process::id(),
            inner.started_nanos
        );
        let cgroup = match &inner.probe.cgroup {
            Ok(info) => {
                let (cg, applied) = StepCgroup::create(&info.base, &name, &spec.limits)
                    .map_err(|e| Error::io("creating the step's cgroup", e))?;
                enforced.extend(applied);
                Some(cg)
            }
            Err(_) => None,
        };
        let has = |c| {
            cgroup.is_some()
                && inner
                    .probe
                    .cgroup
                    .as_ref()
                    .is_ok_and(|i| i.controllers.contains(&c))
        };
        let facts = HostFacts {
            landlock_abi: inner.probe.landlock_abi,
            root: inner.probe.root,
            cgroup_memory: has("memory") && spec.limits.memory_bytes.is_some(),
            cgroup_pids: has("pids") && spec.limits.processes.is_some(),
            arg_area: inner.arg_area,
        };
        let result = (|| {
            let plan = plan::build(
                &inner.config,
                inner.tier,
                &spec,
                &workspace,
                facts,
                inner.seccomp.as_ref(),
                &mut enforced,
            )?;
            let ids = (inner.tier == Tier::A).then(|| IdMap {
                inner: inner.config.inner_ids,
                host: inner.config.effective_run_as(),
                privileged: inner.probe.root,
            });
            let launched = spawn::launch(&plan, ids, cgroup.as_ref())?;
            Ok((launched, Labels::of(&plan)))
        })();
        let (launched, labels) = match result {
            Ok(ok) => ok,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                return Err(e);
            }
        };

        let (tx, rx) = mpsc::channel(64);
        let budget = Budget::new(spec.limits.output_bytes);
        let readers = vec![
            tokio::spawn(output::read_stream(
                launched.stdout,
                Stream::Stdout,
                tx.clone(),
                budget.clone(),
            )),
            tokio::spawn(output::read_stream(
                launched.stderr,
                Stream::Stderr,
                tx,
                budget.clone(),
            )),
        ];
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let monitor = Monitor {
            tier: inner.tier,
            pid: launched.pid,
            pidfd: launched.pidfd,
            lifeline: launched.lifeline,
            status: launched.status,
            readers,
            budget,
            requests: req_rx,
            cgroup,
            limits: spec.limits.clone(),
            grace: inner.config.kill_grace,
            check_interval: inner.config.check_interval,
            workspace,
            started,
            labels,
            enforced,
        };
        let (done_tx, done_rx) = oneshot::channel();
        tokio::spawn(async move {
            let _ = done_tx.send(monitor.run().await);
        });
        Ok(Child {
            pid: launched.pid as u32,
            output: Some(rx),
            control: ChildControl { tx: req_tx },
            outcome: done_rx,
        })
    }
}

fn canonical_workspace(spec: &CommandSpec) -> Result<PathBuf> {
    let bad = |why: String| Error::InvalidWorkspace {
        path: spec.workspace.clone(),
        why,
    };
    let ws = spec
        .workspace
        .canonicalize()
        .map_err(|e| bad(e.to_string()))?;
    if !ws.is_dir() {
        return Err(bad("not a directory".into()));
    }
    // `..` was refused already; this catches a symlink on the way out of the workspace.
    let cwd = ws.join(&spec.working_dir);
    let refuse = |why| Error::InvalidWorkingDir {
        path: spec.working_dir.clone(),
        why,
    };
    let real = cwd.canonicalize().map_err(|_| refuse("does not exist"))?;
    if !real.starts_with(&ws) {
        return Err(refuse("leaves the workspace"));
    }
    if !real.is_dir() {
        return Err(refuse("is not a directory"));
    }
    Ok(ws)
}

/// A running step.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    output: Option<OutputReceiver>,
    control: ChildControl,
    outcome: oneshot::Receiver<Outcome>,
}

impl Child {
    /// Host pid of the step's supervisor (tier A: the sandbox's pid 1).
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The output, once. Read it concurrently with [`wait`](Self::wait): a step whose
    /// output nobody reads blocks when the buffer is full, as with any pipe. Not taking
    /// it is fine: `wait` then discards the output.
    pub fn take_output(&mut self) -> Option<OutputReceiver> {
        self.output.take()
    }

    /// A handle to cancel or signal the step from elsewhere.
    pub fn control(&self) -> ChildControl {
        self.control.clone()
    }

    /// Waits until the whole tree is gone and the output is read, and says how it went.
    pub async fn wait(mut self) -> Outcome {
        drop(self.output.take());
        match self.outcome.await {
            Ok(outcome) => outcome,
            // Only when the runtime shuts down under us; the supervisor then sees its
            // lifeline close and kills the tree.
            Err(_) => Outcome {
                status: ExitStatus::NotStarted,
                reason: Reason::Cancelled,
                message: Some("the sandbox monitor was shut down".into()),
                wall_time: Default::default(),
                cpu_time: Default::default(),
                peak_memory_bytes: 0,
                stdout_bytes: 0,
                stderr_bytes: 0,
                tier: Tier::None,
                enforced: Vec::new(),
            },
        }
    }

    /// Waits, collecting stdout and stderr (for tests and small steps).
    pub async fn wait_with_output(mut self) -> (Outcome, Vec<u8>, Vec<u8>) {
        let mut rx = self.output.take();
        let collect = async {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            if let Some(rx) = rx.as_mut() {
                while let Some(chunk) = rx.recv().await {
                    match chunk.stream {
                        Stream::Stdout => out.extend_from_slice(&chunk.data),
                        Stream::Stderr => err.extend_from_slice(&chunk.data),
                    }
                }
            }
            (out, err)
        };
        let ((out, err), outcome) = tokio::join!(collect, self.wait());
        (outcome, out, err)
    }
}

/// Cancels or signals a running step. Cloneable; outliving the step is harmless.
#[derive(Debug, Clone)]
pub struct ChildControl {
    tx: mpsc::UnboundedSender<Request>,
}

impl ChildControl {
    /// SIGTERM to the whole tree, SIGKILL after the grace period; the outcome says
    /// CANCELLED.
    pub fn cancel(&self) {
        let _ = self.tx.send(Request::Cancel(None));
    }

    /// Like [`cancel`](Self::cancel), with SIGKILL after `grace` instead of the
    /// configured `kill_grace` (CancelBuild lets the caller choose).
    pub fn cancel_with_grace(&self, grace: std::time::Duration) {
        let _ = self.tx.send(Request::Cancel(Some(grace)));
    }

    /// Sends `signal` to the step (its process group in tier B, every process of the
    /// sandbox in tier A). Only TERM, INT, HUP, QUIT and USR2 are forwarded.
    pub fn signal(&self, signal: i32) {
        if [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR2,
        ]
        .contains(&signal)
        {
            let _ = self.tx.send(Request::Signal(signal));
        }
    }
}
