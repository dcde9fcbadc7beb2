//! Logs of a service process, to stderr: JSON lines when stderr is not a terminal (a
//! pod's log collector), readable text on one. `KILN_LOG` (or `RUST_LOG`) picks the
//! levels, default `info`; `KILN_LOG_FORMAT=text|json` forces a format.
//!
//! A minimal stand-in: the telemetry library (traces, metrics) replaces it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init_logging() {
    let filter = std::env::var("KILN_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let json = match std::env::var("KILN_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !terminal,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}
