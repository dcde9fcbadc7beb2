//! The OTLP exporter, wrapped to count what it could not deliver.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

/// Spans exported and spans dropped, shared with [`crate::TelemetryGuard`]; and how
/// many finished spans wait for the collector now.
#[derive(Debug, Default)]
pub(crate) struct ExportCounts {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub pending: AtomicU64,
}

/// In front of the SDK's batch processor: a finished span is dropped (and counted) when
/// `max_pending` spans already wait for the collector — queued or in the batch being
/// sent. The SDK drops on a full queue too, but neither counts it where anyone can
/// read it nor bounds the batch in flight; with this gate in front it never has to.
#[derive(Debug)]
pub(crate) struct BoundedProcessor<P> {
    pub inner: P,
    pub counts: Arc<ExportCounts>,
    pub max_pending: u64,
}

impl<P: SpanProcessor> SpanProcessor for BoundedProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .counts
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_pending).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Delegates to the OTLP exporter. A batch the collector did not take (down, refusing,
/// too slow) is gone — the SDK does not retry it — so its spans count as dropped, and
/// the first failure after a success is logged once rather than on every batch.
#[derive(Debug)]
pub(crate) struct CountingExporter<E> {
    pub inner: E,
    pub counts: Arc<ExportCounts>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        // Sent or lost, these no longer wait (see `BoundedProcessor`).
        self.counts.pending.fetch_sub(spans, Ordering::AcqRel);
        match &result {
            Ok(()) => {
                self.counts.exported.fetch_add(spans, Ordering::Relaxed);
            }
            Err(err) => {
                let before = self.counts.dropped.fetch_add(spans, Ordering::Relaxed);
                if before == 0 {
                    // Logged from the exporter's thread; the trace filter keeps this
                    // crate's events out of the export itself.
                    tracing::warn!(error = %err, spans, "trace export failed; spans are dropped until the collector is back");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
