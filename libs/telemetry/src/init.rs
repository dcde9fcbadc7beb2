//! [`init`]: the process's `tracing` subscriber, and OTLP export when configured.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::resource::EnvResourceDetector;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{DEFAULT_TRACE_FILTER, LogFormat, TelemetryConfig, TraceExport, env};
use crate::export::{BoundedProcessor, CountingExporter, ExportCounts};

/// What can go wrong in [`init`].
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP endpoint {endpoint:?}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("{}: {message}", env::TRACE_FILTER)]
    Filter { message: String },
    #[error("a tracing subscriber is already installed in this process")]
    AlreadyInitialised,
}

/// Keeps trace export running; dropping it (or [`TelemetryGuard::shutdown`]) sends the
/// spans still queued and stops the exporter. Hold it in `main` until the end.
#[must_use = "dropping the guard stops trace export"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    counts: Arc<ExportCounts>,
    export: TraceExport,
}

impl TelemetryGuard {
    /// Whether and where spans are exported.
    pub fn export(&self) -> &TraceExport {
        &self.export
    }

    /// Spans the collector did not take (down, refusing or too slow); they are lost.
    pub fn dropped_spans(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Spans the collector acknowledged.
    pub fn exported_spans(&self) -> u64 {
        self.counts.exported.load(Ordering::Relaxed)
    }

    /// Sends the queued spans and stops the exporter. Blocks (up to the export timeout
    /// when the collector is down): call it outside the async runtime's worker threads,
    /// while the runtime is still alive (the exporter's connection runs on it).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "flushing traces at exit failed");
            }
            let dropped = self.dropped_spans();
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    exported = self.exported_spans(),
                    "trace spans were dropped"
                );
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the process's `tracing` subscriber: logs to stderr (text on a terminal,
/// JSON otherwise, levels from `KILN_LOG`/`RUST_LOG`), W3C trace-context and baggage
/// propagation, and OTLP gRPC export when [`TelemetryConfig::trace_export`] finds an
/// endpoint. With export on it must run inside a tokio runtime (the exporter's
/// connection lives on it).
///
/// Logs and traces are filtered separately: a CLI that logs only warnings still
/// exports its INFO spans.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    install_propagator();
    let export = config.trace_export();
    let counts = Arc::new(ExportCounts::default());
    let provider = match &export {
        TraceExport::Otlp { endpoint } => Some(otlp_provider(config, endpoint, &counts)?),
        // Spans still get W3C ids (and propagate them), but nothing leaves the process.
        TraceExport::Off if config.trace_without_export => Some(
            SdkTracerProvider::builder()
                .with_resource(resource(config))
                .with_sampler(up_front_sampler())
                .build(),
        ),
        TraceExport::Off | TraceExport::Disabled => None,
    };
    let otel_layer = match &provider {
        Some(provider) => {
            let filter = match std::env::var(env::TRACE_FILTER) {
                Ok(directives) => {
                    EnvFilter::try_new(directives).map_err(|e| TelemetryError::Filter {
                        message: e.to_string(),
                    })?
                }
                Err(_) => EnvFilter::new(DEFAULT_TRACE_FILTER),
            };
            // A dropped call's server span (crate::layer), whatever the directives say.
            let filter = filter.add_directive(
                format!("{}=off", crate::layer::UNRECORDED_TARGET)
                    .parse()
                    .expect("a valid directive"),
            );
            // Nothing of a call the sampler dropped up front reaches the layer
            // (crate::sampling). A dynamic filter, asked for every span and event: a
            // plain FilterFn's answer is cached per callsite, so the first call through
            // a callsite would decide for all that follow. Callsites the EnvFilter never
            // wants stay "never" (`and`), and the hint keeps its level: without one every
            // callsite of every level would be worth asking about.
            let hint = <EnvFilter as tracing_subscriber::layer::Filter<
                tracing_subscriber::Registry,
            >>::max_level_hint(&filter);
            let mut recording_here = tracing_subscriber::filter::DynFilterFn::new(|_, _| {
                crate::sampling::recording_here()
            });
            if let Some(hint) = hint {
                recording_here = recording_here.with_max_level_hint(hint);
            }
            let filter = filter.and(recording_here);
            let tracer = provider.tracer("kiln");
            // What the layer does on every enter and exit of a span was a large part of
            // telemetry's cost per call (bench/README.md, layer_chain case 4), and kiln
            // needs none of it: propagation reads the span's own context
            // (`OpenTelemetrySpanExt`), not the thread's active OpenTelemetry context;
            // busy/idle time of async spans entered at each poll says little; and the
            // thread a span started on is a tokio worker's. Nor does a span need the
            // source file, module, line and target of its callsite: kiln's span names
            // say what ran (`kiln.auth.v1.AuthService/WhoAmI`, `build.queue`), and those
            // four attributes were each copied, encoded and sent with every span.
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_context_activation(false)
                    .with_tracked_inactivity(false)
                    .with_threads(false)
                    .with_location(false)
                    .with_target(false)
                    .with_filter(filter),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(log_layer(config))
        .with(otel_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialised)?;
    if let TraceExport::Otlp { endpoint } = &export {
        tracing::debug!(%endpoint, "exporting traces over OTLP");
    }
    Ok(TelemetryGuard {
        provider,
        counts,
        export,
    })
}

/// Makes W3C trace context and baggage the process's propagation format (what
/// [`crate::inject_current`] writes and [`crate::extract`] reads). [`init`] does this;
/// tests with a subscriber of their own call it directly.
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn log_layer(config: &TelemetryConfig) -> BoxedLayer {
    let filter = std::env::var("KILN_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(&config.default_log_level));
    let terminal = std::io::stderr().is_terminal();
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    if json {
        fmt.json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.with_filter(filter).boxed()
    }
}

/// service.name, service.version and a fresh service.instance.id, each overridden by
/// `OTEL_RESOURCE_ATTRIBUTES`, and the name by `OTEL_SERVICE_NAME` above all.
fn resource(config: &TelemetryConfig) -> Resource {
    let mut builder = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", config.service_name.clone()),
            KeyValue::new("service.version", config.service_version.clone()),
            KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
        ])
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Some(name) = std::env::var(env::SERVICE_NAME)
        .ok()
        .filter(|n| !n.trim().is_empty())
    {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

fn otlp_provider(
    config: &TelemetryConfig,
    endpoint: &str,
    counts: &Arc<ExportCounts>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })?;
    let exporter = CountingExporter {
        inner: exporter,
        counts: counts.clone(),
    };
    // The SDK's batch processor: `on_end` only try-sends into a bounded queue (full:
    // the span is dropped), and a thread of its own does the exporting.
    // The batch settings come from the spec's OTEL_BSP_* variables (the SDK reads them),
    // with the spec's defaults: 2048 spans held, sent every 5 s in batches of 512.
    // The queue bound is read here too, for the gate in front of the processor.
    let max_queue = std::env::var(opentelemetry_sdk::trace::OTEL_BSP_MAX_QUEUE_SIZE)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(opentelemetry_sdk::trace::OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT);
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(max_queue)
        .build();
    let max_pending = max_queue as u64;
    let processor = BoundedProcessor {
        inner: BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build(),
        counts: counts.clone(),
        max_pending,
    };
    Ok(SdkTracerProvider::builder()
        .with_resource(resource(config))
        .with_sampler(up_front_sampler())
        .with_span_processor(processor)
        .build())
}

/// The sampler `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` configure (read by the
/// SDK, as the spec defines them; `parentbased_always_on` without them), made the one
/// `TraceContextLayer` decides calls by before their spans open, and, for the
/// provider, wrapped so the SDK does not decide those calls a second time.
fn up_front_sampler() -> crate::sampling::UpFront {
    let sampler = opentelemetry_sdk::trace::Config::default().sampler;
    crate::sampling::install(sampler.clone());
    crate::sampling::UpFront { inner: sampler }
}
