//! `promtool check metrics` on an exposition.

use std::io::Write;
use std::process::{Command, Stdio};

/// Lints `exposition` with `promtool check metrics`; `Err` lists every finding but the
/// one accepted below. `None` when promtool is missing (the skip line is printed).
///
/// promtool lints the classic text format, where a counter's HELP and TYPE carry the
/// `_total` of its samples; OpenMetrics (what prometheus-client writes, and what the
/// Prometheus server negotiates) names the family without it (client_rust#194). That
/// one report is accepted when the family does have its HELP and TYPE.
pub fn check_metrics(exposition: &str) -> Option<Result<(), String>> {
    let promtool = crate::tools::find("promtool", "make prometheus installs it from apt as root")?;
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write the exposition to promtool");
    let out = check.wait_with_output().expect("promtool ends");
    let reports =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = reports
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|problem| {
            let family = problem
                .strip_suffix(" no help text")
                .and_then(|name| name.strip_suffix("_total"));
            !family.is_some_and(|f| {
                exposition.contains(&format!("# HELP {f} "))
                    && exposition.contains(&format!("# TYPE {f} counter"))
            })
        })
        .collect();
    Some(if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    })
}
