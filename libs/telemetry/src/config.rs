//! What [`crate::init`] sets up, and how the OTLP endpoint is chosen.

/// The environment variables of the OpenTelemetry specification that kiln honours
/// (the exporter itself also reads `OTEL_EXPORTER_OTLP_{,TRACES_}{TIMEOUT,HEADERS,…}`).
pub mod env {
    pub const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
    pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    pub const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
    pub const RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
    /// kiln's own: which spans are exported (an `EnvFilter` directive); default
    /// [`super::DEFAULT_TRACE_FILTER`].
    pub const TRACE_FILTER: &str = "KILN_TRACE_FILTER";
}

/// Spans exported unless `KILN_TRACE_FILTER` says otherwise: kiln's own at INFO and
/// above, none of the transport's (h2, hyper, tonic, tower) or the exporter's own, which
/// would otherwise trace their own exports.
pub const DEFAULT_TRACE_FILTER: &str = "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// Log format: `auto` is readable text on a terminal and JSON lines otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Auto,
    Text,
    Json,
}

/// Settings of [`crate::init`]. Every default is stated on its field.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` unless `OTEL_SERVICE_NAME` (or `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) says otherwise. E.g. `kiln` for `kiln up`, `kiln-cli`.
    pub service_name: String,
    /// `service.version`: the binary's version.
    pub service_version: String,
    /// Log format. Default: auto.
    pub log_format: LogFormat,
    /// Log levels unless `KILN_LOG` (or `RUST_LOG`) is set, e.g. `info`.
    pub default_log_level: String,
    /// The OTLP gRPC endpoint from kiln's own configuration (a flag or the config file),
    /// e.g. `http://127.0.0.1:4317`. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` are used when this is `None`. Default: none (no export).
    pub otlp_endpoint: Option<String>,
    /// Keep W3C trace ids on spans (and propagate them) even without export, so that a
    /// caller can print its trace id (`kiln --trace`) for the services' traces. Default: false.
    pub trace_without_export: bool,
}

// The exporter's timeout (`OTEL_EXPORTER_OTLP_{TRACES_,}TIMEOUT`, 10 s), and the batch
// settings (`OTEL_BSP_MAX_QUEUE_SIZE` 2048 spans held at most — more are dropped and
// counted —, `OTEL_BSP_SCHEDULE_DELAY` 5 s between sends, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`
// 512) are the spec's variables, read by the SDK; kiln adds no second way to set them.

impl TelemetryConfig {
    pub fn new(service_name: impl Into<String>, service_version: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            service_version: service_version.into(),
            log_format: LogFormat::Auto,
            default_log_level: "info".into(),
            otlp_endpoint: None,
            trace_without_export: false,
        }
    }

    /// Whether and where spans are exported, as the OpenTelemetry specification reads
    /// the environment: `OTEL_SDK_DISABLED=true` turns the SDK off whatever else is set;
    /// otherwise kiln's own setting, then the traces endpoint, then the general one.
    pub fn trace_export(&self) -> TraceExport {
        self.trace_export_with(|name| std::env::var(name).ok())
    }

    pub(crate) fn trace_export_with(&self, var: impl Fn(&str) -> Option<String>) -> TraceExport {
        let set = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if set(env::SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return TraceExport::Disabled;
        }
        let endpoint = self
            .otlp_endpoint
            .clone()
            .filter(|e| !e.trim().is_empty())
            .or_else(|| set(env::TRACES_ENDPOINT))
            .or_else(|| set(env::ENDPOINT));
        match endpoint {
            Some(endpoint) => TraceExport::Otlp { endpoint },
            None => TraceExport::Off,
        }
    }
}

/// The outcome of [`TelemetryConfig::trace_export`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceExport {
    /// No endpoint configured.
    Off,
    /// `OTEL_SDK_DISABLED=true`.
    Disabled,
    /// OTLP over gRPC to this endpoint.
    Otlp { endpoint: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(own: Option<&str>, vars: &[(&str, &str)]) -> TraceExport {
        let mut config = TelemetryConfig::new("t", "0");
        config.otlp_endpoint = own.map(str::to_owned);
        config.trace_export_with(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn nothing_configured_means_no_export() {
        assert_eq!(export(None, &[]), TraceExport::Off);
        assert_eq!(export(Some(" "), &[(env::ENDPOINT, "")]), TraceExport::Off);
    }

    #[test]
    fn the_traces_endpoint_wins_over_the_general_one_and_kilns_own_over_both() {
        let general = (env::ENDPOINT, "http://general:4317");
        let traces = (env::TRACES_ENDPOINT, "http://traces:4317");
        let otlp = |e: &str| TraceExport::Otlp {
            endpoint: e.to_owned(),
        };
        assert_eq!(export(None, &[general]), otlp("http://general:4317"));
        assert_eq!(export(None, &[general, traces]), otlp("http://traces:4317"));
        assert_eq!(
            export(Some("http://own:4317"), &[general, traces]),
            otlp("http://own:4317")
        );
    }

    #[test]
    fn sdk_disabled_turns_export_off_whatever_else_is_set() {
        let vars = [
            (env::SDK_DISABLED, "TRUE"),
            (env::ENDPOINT, "http://x:4317"),
        ];
        assert_eq!(
            export(Some("http://own:4317"), &vars),
            TraceExport::Disabled
        );
        // Only "true" disables (the spec: any other value is false).
        let vars = [(env::SDK_DISABLED, "1"), (env::ENDPOINT, "http://x:4317")];
        assert!(matches!(export(None, &vars), TraceExport::Otlp { .. }));
    }
}
