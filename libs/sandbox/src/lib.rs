//! kiln-sandbox: run untrusted build commands in real isolation on Linux.
//!
//! ```no_run
//! # async fn demo() -> kiln_sandbox::Result<()> {
//! use kiln_sandbox::{CommandSpec, Sandbox, SandboxConfig};
//!
//! let sandbox = Sandbox::new(SandboxConfig::default())?; // probes; refuses < tier B
//! sandbox.prepare_workspace("/srv/ws/1".as_ref())?;
//! let spec = CommandSpec::new(["cargo", "build"], "/srv/ws/1")
//!     .env("PATH", "/usr/local/bin:/usr/bin:/bin")
//!     .env("HOME", "/workspace");
//! let mut child = sandbox.spawn(spec).await?;
//! let mut output = child.take_output().unwrap();
//! tokio::spawn(async move {
//!     while let Some(chunk) = output.recv().await {
//!         println!("{:?} @{}: {} bytes", chunk.stream, chunk.offset, chunk.data.len());
//!     }
//! });
//! let outcome = child.wait().await;
//! println!("{:?} {:?}", outcome.reason, outcome.status);
//! # Ok(()) }
//! ```
//!
//! See README.md for the tier matrix and the design.

// The sandbox is built with system calls that have no safe wrapper usable after `clone`
// in a multi-threaded process (clone3, mount, pivot_root, landlock, seccomp, capset,
// signalfd...). Every unsafe block is small and says why it is sound.
#![allow(unsafe_code)]

mod cgroup;
mod child;
mod config;
mod disk;
mod error;
mod landlock;
mod monitor;
mod outcome;
mod output;
mod plan;
mod probe;
mod rootfs;
mod sandbox;
mod seccomp;
mod spawn;
mod spec;
mod status;
mod sys;

pub use cgroup::CgroupVersion;
pub use config::{Bind, SandboxConfig, Tier, default_read_only_binds};
pub use error::{Error, Result};
pub use outcome::{Control, Enforcement, ExitStatus, Mechanism, Outcome, Reason};
pub use output::{MAX_CHUNK, OutputChunk, OutputReceiver, Stream};
pub use plan::WORKSPACE_MOUNT;
pub use probe::{CgroupInfo, Probe, probe};
pub use sandbox::{Child, ChildControl, Sandbox};
pub use seccomp::denied_syscalls;
pub use spec::{CommandSpec, Limits};
pub use sys::keep_spawns_cheap;
