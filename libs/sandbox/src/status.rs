//! Decoding the child's status pipe: setup failures and the program's wait status.

use crate::child::{RECORD_EXIT, RECORD_SETUP_ERROR, Stage};
use crate::plan::Plan;

/// What the supervisor reported.
#[derive(Debug, Default, Clone)]
pub(crate) struct Report {
    /// A setup failure, described for people.
    pub setup_error: Option<String>,
    /// The program's raw wait status.
    pub exit_status: Option<i32>,
}

/// Descriptions of the plan's list items, kept after the plan itself is gone.
#[derive(Debug, Default, Clone)]
pub(crate) struct Labels {
    fs: Vec<String>,
    rlimits: Vec<String>,
    landlock: Vec<String>,
    program: String,
    cwd: String,
}

impl Labels {
    pub fn of(plan: &Plan<'_>) -> Self {
        Labels {
            fs: plan
                .fs
                .iter()
                .chain(&plan.fs_open)
                .map(|s| s.what.clone())
                .collect(),
            rlimits: plan
                .rlimits
                .iter()
                .map(|r| format!("resource {} = {}", r.resource, r.soft))
                .collect(),
            landlock: plan
                .landlock
                .iter()
                .flat_map(|l| l.rules.iter())
                .map(|r| r.path.to_string_lossy().into_owned())
                .collect(),
            program: plan
                .argv
                .first()
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_default(),
            cwd: plan.cwd.to_string_lossy().into_owned(),
        }
    }
}

pub(crate) fn parse(bytes: &[u8], labels: &Labels) -> Report {
    let mut report = Report::default();
    for rec in bytes.chunks_exact(16) {
        let w = |i: usize| u32::from_ne_bytes(rec[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]));
        match w(0) {
            RECORD_SETUP_ERROR if report.setup_error.is_none() => {
                report.setup_error = Some(describe(w(1), w(2) as usize, w(3) as i32, labels));
            }
            RECORD_EXIT => report.exit_status = Some(w(1) as i32),
            _ => {}
        }
    }
    report
}

fn describe(stage: u32, index: usize, errno: i32, labels: &Labels) -> String {
    let err = std::io::Error::from_raw_os_error(errno);
    let item = |list: &[String]| list.get(index).cloned().unwrap_or_default();
    let what = match Stage::from_u32(stage) {
        Some(Stage::Exec) if errno == libc::ENOENT => {
            return format!("program not found: {}", labels.program);
        }
        Some(Stage::Exec) => format!("cannot execute {}", labels.program),
        Some(Stage::WorkingDir) => format!("cannot enter the working directory {}", labels.cwd),
        Some(Stage::Filesystem) => format!("sandbox setup failed {}", item(&labels.fs)),
        Some(Stage::Rlimit) => format!("cannot set limit {}", item(&labels.rlimits)),
        Some(Stage::LandlockRule) => format!("landlock rule for {}", item(&labels.landlock)),
        Some(other) => format!("sandbox setup failed at {other:?}"),
        None => format!("sandbox setup failed at stage {stage}"),
    };
    format!("{what}: {err}")
}
