//! How far this terminal got in an event stream (a build's, a task's): the last sequence
//! printed, kept under the CLI's state directory so that `watch` resumes without printing
//! anything twice.

use std::path::PathBuf;

use crate::context::Context;

/// One kind of stream's saved positions: a file per id in a directory of the state dir.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    dir: &'static str,
}

impl Progress {
    pub const BUILDS: Self = Self { dir: "watch" };
    pub const TASKS: Self = Self { dir: "watch-tasks" };

    fn path(self, ctx: &Context, id: &str) -> Option<PathBuf> {
        // Ids are server-made; refuse anything that could escape the directory.
        let safe = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        safe.then(|| ctx.state_dir().join(self.dir).join(id))
    }

    /// The last sequence printed for `id`; 0 (from the start) when none was saved.
    pub fn load(self, ctx: &Context, id: &str) -> u64 {
        self.path(ctx, id)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Best effort: a position that cannot be saved only means a later `watch` repeats.
    pub fn save(self, ctx: &Context, id: &str, sequence: u64) {
        if let Some(path) = self.path(ctx, id) {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = std::fs::write(path, sequence.to_string());
        }
    }

    pub fn clear(self, ctx: &Context, id: &str) {
        if let Some(path) = self.path(ctx, id) {
            let _ = std::fs::remove_file(path);
        }
    }
}
