//! Logs and traces of the `kiln` binary, through kiln-telemetry.
//!
//! Logs go to stderr: readable on a terminal, JSON lines for machines (production).
//! `KILN_LOG` (or `RUST_LOG`) picks the levels; the default is `info` for `kiln up` and
//! `warn` for client commands. Traces are exported over OTLP when an endpoint is set
//! (`kiln up --otlp-endpoint`, `[telemetry] otlp_endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_*` variables); each client command is one trace, whose id
//! `--trace` prints.

use kiln_telemetry::{TelemetryConfig, TelemetryGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

impl From<LogFormat> for kiln_telemetry::LogFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Auto => Self::Auto,
            LogFormat::Text => Self::Text,
            LogFormat::Json => Self::Json,
        }
    }
}

/// `service.name` of `kiln up` (all three services in one process) and of the CLI.
pub const SUITE_SERVICE_NAME: &str = "kiln";
pub const CLI_SERVICE_NAME: &str = "kiln-cli";

/// What `main` knows before the runtime starts.
#[derive(Debug)]
pub struct Setup {
    pub service_name: &'static str,
    pub log_format: LogFormat,
    pub default_level: &'static str,
    pub otlp_endpoint: Option<String>,
    /// `--trace`: the command's trace id is wanted even if nothing is exported.
    pub trace: bool,
}

/// Installs logging and tracing; call inside the runtime (the exporter lives on it).
pub fn init(setup: Setup) -> Result<TelemetryGuard, kiln_telemetry::TelemetryError> {
    let mut config = TelemetryConfig::new(setup.service_name, env!("CARGO_PKG_VERSION"));
    config.log_format = setup.log_format.into();
    config.default_log_level = setup.default_level.into();
    config.otlp_endpoint = setup.otlp_endpoint;
    config.trace_without_export = setup.trace;
    kiln_telemetry::init(&config)
}
