//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong before a sandboxed process runs.
///
/// Failures *inside* the sandbox after the spawn (program not found, a mount the host
/// refused) are not errors of `spawn`: they end the step with
/// [`Reason::SpawnFailed`](crate::Reason::SpawnFailed) and a message, so the caller can
/// report them like any other step outcome.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host allows neither tier A nor tier B and the configuration does not allow
    /// running without isolation.
    #[error(
        "this host offers no usable sandbox ({why}); refusing to run untrusted commands \
         without isolation (set `allow_unsandboxed` to run them anyway)"
    )]
    NoIsolation {
        /// What the probe found missing.
        why: String,
    },
    /// The configuration asked for a tier the host cannot provide.
    #[error("sandbox tier {wanted} was requested but this host cannot provide it: {why}")]
    TierUnavailable {
        /// The tier that was asked for.
        wanted: crate::Tier,
        /// What the probe found missing.
        why: String,
    },
    /// The command description is invalid (empty argv, NUL bytes, bad limits…).
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// The working directory is absolute, contains `..`, or leaves the workspace.
    #[error("invalid working directory {path:?}: {why}")]
    InvalidWorkingDir {
        /// The working directory as given.
        path: PathBuf,
        /// Why it was refused.
        why: &'static str,
    },
    /// The workspace directory is unusable.
    #[error("invalid workspace {path:?}: {why}")]
    InvalidWorkspace {
        /// The workspace path as given.
        path: PathBuf,
        /// Why it was refused.
        why: String,
    },
    /// The seccomp filter could not be compiled.
    #[error("cannot build the seccomp filter: {0}")]
    Seccomp(String),
    /// A host operation failed while preparing or starting the sandbox.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
