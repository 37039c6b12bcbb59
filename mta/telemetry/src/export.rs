//! Getting spans and metrics out of the process without ever slowing mail down.
//!
//! [`DroppingBatchProcessor`] replaces the SDK's batch span processor for one reason:
//! the SDK counts the spans it drops but does not tell anyone. Ours puts each finished
//! span into a bounded queue with `try_send` (never waits); a full queue drops the span
//! and counts it (`reason="queue_full"`). One exporter thread drains the queue in
//! batches; a batch the collector did not take (down, refusing, timing out) is dropped
//! and counted too (`reason="export_failed"`). The counters are process-wide, so every
//! [`crate::MtaMetrics`] registry shows them as `petrel_mta_otel_spans_*`.
//!
//! The OTLP/HTTP exporter uses hyper, which needs a tokio runtime. The exporter thread
//! owns a small current-thread runtime of its own, so exporting never takes time from the
//! runtime that serves mail and works whether or not the caller has a runtime.
//! [`OnOwnRuntime`] does the same for the metrics exporter, which the SDK's periodic
//! reader drives from its own thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Spans dropped instead of exported, by reason. Process-wide: there is one tracer
/// provider per process.
static SPANS_DROPPED: LazyLock<Family<ReasonLabels, Counter>> = LazyLock::new(|| {
    let family = Family::default();
    for reason in [QUEUE_FULL, EXPORT_FAILED] {
        let _ = family.get_or_create(&ReasonLabels { reason });
    }
    family
});

/// Spans the collector accepted.
static SPANS_EXPORTED: LazyLock<Counter> = LazyLock::new(Counter::default);

const QUEUE_FULL: &str = "queue_full";
const EXPORT_FAILED: &str = "export_failed";

/// Registers the process-wide span export counters in `registry` (prefix included by
/// the caller).
pub(crate) fn register(registry: &mut Registry) {
    registry.register(
        "otel_spans_dropped",
        "Finished spans not exported: queue full, or the collector did not take the batch",
        SPANS_DROPPED.clone(),
    );
    registry.register(
        "otel_spans_exported",
        "Finished spans the OTLP collector accepted",
        SPANS_EXPORTED.clone(),
    );
}

/// How many spans have been dropped so far, all reasons together.
pub fn spans_dropped() -> u64 {
    [QUEUE_FULL, EXPORT_FAILED]
        .iter()
        .map(|&reason| SPANS_DROPPED.get_or_create(&ReasonLabels { reason }).get())
        .sum()
}

/// Queue and batch sizes, from the standard `OTEL_BSP_*` variables.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchConfig {
    /// `OTEL_BSP_MAX_QUEUE_SIZE`, default 2048.
    pub max_queue_size: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, default 512.
    pub max_export_batch_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY` (ms), default 5000.
    pub scheduled_delay: Duration,
}

impl BatchConfig {
    pub(crate) fn from_env() -> Self {
        let num = |name: &str, default: u64| -> u64 {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or(default)
        };
        let max_queue_size = num("OTEL_BSP_MAX_QUEUE_SIZE", 2048) as usize;
        BatchConfig {
            max_queue_size,
            max_export_batch_size: (num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512) as usize)
                .min(max_queue_size),
            scheduled_delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY", 5000)),
        }
    }
}

enum Message {
    Span(Box<SpanData>),
    /// Export everything queued before this message, then answer.
    Flush(mpsc::Sender<OTelSdkResult>),
    /// Flush, shut the exporter down, answer and stop.
    Shutdown(mpsc::Sender<OTelSdkResult>),
}

/// A batch span processor that never blocks and counts what it drops.
#[derive(Debug)]
pub(crate) struct DroppingBatchProcessor {
    tx: SyncSender<Message>,
    worker: Mutex<Option<JoinHandle<()>>>,
    is_shutdown: AtomicBool,
}

impl DroppingBatchProcessor {
    /// Starts the exporter thread. `resource` is handed to the exporter here because
    /// the exporter lives on that thread from now on.
    pub(crate) fn new<E: SpanExporter + 'static>(
        mut exporter: E,
        resource: &Resource,
        config: BatchConfig,
    ) -> std::io::Result<Self> {
        exporter.set_resource(resource);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Control messages go through the same queue as spans, so a flush sees every span
        // queued before it.
        let (tx, rx) = mpsc::sync_channel(config.max_queue_size);
        let worker = std::thread::Builder::new()
            .name("petrel-otlp-spans".into())
            .spawn(move || export_loop(exporter, runtime, rx, config))?;
        Ok(Self {
            tx,
            worker: Mutex::new(Some(worker)),
            is_shutdown: AtomicBool::new(false),
        })
    }

    /// Sends a control message, waiting at most until `deadline` for room in the queue
    /// and for the answer.
    fn control(
        &self,
        make: fn(mpsc::Sender<OTelSdkResult>) -> Message,
        timeout: Duration,
    ) -> OTelSdkResult {
        let deadline = Instant::now() + timeout;
        let (answer_tx, answer_rx) = mpsc::channel();
        let mut message = make(answer_tx);
        loop {
            match self.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= deadline {
                        return Err(OTelSdkError::Timeout(timeout));
                    }
                    message = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Disconnected(_)) => return Err(OTelSdkError::AlreadyShutdown),
            }
        }
        match answer_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(OTelSdkError::AlreadyShutdown),
        }
    }
}

impl SpanProcessor for DroppingBatchProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(Message::Span(Box::new(span))).is_err() {
            SPANS_DROPPED
                .get_or_create(&ReasonLabels { reason: QUEUE_FULL })
                .inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        if self.is_shutdown.load(Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        self.control(Message::Flush, Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.is_shutdown.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let result = self.control(Message::Shutdown, timeout);
        if result.is_ok()
            && let Some(worker) = self.worker.lock().ok().and_then(|mut w| w.take())
        {
            let _ = worker.join();
        }
        result
    }

    fn set_resource(&mut self, _resource: &Resource) {
        // Given to the exporter in `new`: init builds the provider with the same resource.
    }
}

/// The exporter thread: batch by size or by `scheduled_delay`, whichever comes first.
fn export_loop<E: SpanExporter>(
    exporter: E,
    runtime: tokio::runtime::Runtime,
    rx: Receiver<Message>,
    config: BatchConfig,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(config.max_export_batch_size);
    let export = |batch: &mut Vec<SpanData>| -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        let result = runtime.block_on(exporter.export(std::mem::take(batch)));
        match &result {
            Ok(()) => SPANS_EXPORTED.inc_by(n),
            Err(_) => SPANS_DROPPED
                .get_or_create(&ReasonLabels {
                    reason: EXPORT_FAILED,
                })
                .inc_by(n),
        };
        result
    };
    let mut next_export = Instant::now() + config.scheduled_delay;
    loop {
        let wait = next_export.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Message::Span(span)) => {
                batch.push(*span);
                if batch.len() >= config.max_export_batch_size {
                    let _ = export(&mut batch);
                    next_export = Instant::now() + config.scheduled_delay;
                }
            }
            Ok(Message::Flush(answer)) => {
                let result = export_all(&mut batch, config.max_export_batch_size, &export);
                let _ = answer.send(result);
                next_export = Instant::now() + config.scheduled_delay;
            }
            Ok(Message::Shutdown(answer)) => {
                let mut result = export_all(&mut batch, config.max_export_batch_size, &export);
                if let Err(e) = exporter.shutdown() {
                    result = result.and(Err(e));
                }
                let _ = answer.send(result);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = export(&mut batch);
                next_export = Instant::now() + config.scheduled_delay;
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = export_all(&mut batch, config.max_export_batch_size, &export);
                return;
            }
        }
    }
}

/// Exports `batch` in chunks of at most `max` spans; the first error wins.
fn export_all(
    batch: &mut Vec<SpanData>,
    max: usize,
    export: &impl Fn(&mut Vec<SpanData>) -> OTelSdkResult,
) -> OTelSdkResult {
    let mut result = Ok(());
    while !batch.is_empty() {
        let rest = batch.split_off(batch.len().min(max));
        let r = export(batch);
        *batch = rest;
        result = result.and(r);
    }
    result
}

/// A metrics exporter that runs `E` on a runtime of its own (see the module docs).
pub(crate) struct OnOwnRuntime<E> {
    inner: E,
    runtime: Option<tokio::runtime::Runtime>,
}

impl<E> OnOwnRuntime<E> {
    pub(crate) fn new(inner: E) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            inner,
            runtime: Some(runtime),
        })
    }
}

impl<E> std::fmt::Debug for OnOwnRuntime<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnOwnRuntime").finish_non_exhaustive()
    }
}

impl<E> Drop for OnOwnRuntime<E> {
    fn drop(&mut self) {
        // May be dropped inside the caller's runtime, where a blocking drop panics.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for OnOwnRuntime<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        match &self.runtime {
            // The SDK's periodic reader calls this from its own thread, outside any runtime.
            Some(runtime) if tokio::runtime::Handle::try_current().is_err() => {
                runtime.block_on(self.inner.export(metrics))
            }
            _ => self.inner.export(metrics).await,
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, Tracer, TracerProvider};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// An exporter that is down (fails every batch) or up, and can be slow.
    #[derive(Debug, Clone)]
    struct FakeCollector {
        up: bool,
        delay: Duration,
        received: Arc<AtomicUsize>,
    }

    impl SpanExporter for FakeCollector {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            std::thread::sleep(self.delay);
            if self.up {
                self.received.fetch_add(batch.len(), Ordering::SeqCst);
                Ok(())
            } else {
                Err(OTelSdkError::InternalFailure("connection refused".into()))
            }
        }
    }

    fn provider(collector: FakeCollector, queue: usize) -> SdkTracerProvider {
        let config = BatchConfig {
            max_queue_size: queue,
            max_export_batch_size: 4,
            scheduled_delay: Duration::from_millis(50),
        };
        let processor =
            DroppingBatchProcessor::new(collector, &Resource::builder_empty().build(), config)
                .expect("processor");
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build()
    }

    // The counters are process-wide, so the tests look at differences, and one test
    // covers both drop reasons to keep them from racing each other.
    #[test]
    fn a_down_or_slow_collector_costs_spans_not_time() {
        let received = Arc::new(AtomicUsize::new(0));

        // Up: everything arrives after a flush.
        let up = provider(
            FakeCollector {
                up: true,
                delay: Duration::ZERO,
                received: received.clone(),
            },
            64,
        );
        let exported_before = SPANS_EXPORTED.get();
        let tracer = up.tracer("test");
        for _ in 0..10 {
            tracer.start("ok").end();
        }
        up.force_flush().expect("flush");
        assert_eq!(received.load(Ordering::SeqCst), 10);
        assert_eq!(SPANS_EXPORTED.get() - exported_before, 10);
        up.shutdown().expect("shutdown");

        // Down: every span is dropped and counted, and ending spans stays fast.
        let failed = || {
            SPANS_DROPPED
                .get_or_create(&ReasonLabels {
                    reason: EXPORT_FAILED,
                })
                .get()
        };
        let full = || {
            SPANS_DROPPED
                .get_or_create(&ReasonLabels { reason: QUEUE_FULL })
                .get()
        };
        let (failed_before, full_before) = (failed(), full());
        let down = provider(
            FakeCollector {
                up: false,
                delay: Duration::ZERO,
                received: received.clone(),
            },
            64,
        );
        let tracer = down.tracer("test");
        for _ in 0..10 {
            tracer.start("lost").end();
        }
        let _ = down.force_flush();
        assert_eq!(failed() - failed_before + full() - full_before, 10);
        let _ = down.shutdown();

        // Hung: the queue fills up, the rest is dropped at once.
        let full_before = full();
        let hung = provider(
            FakeCollector {
                up: true,
                delay: Duration::from_millis(300),
                received,
            },
            8,
        );
        let tracer = hung.tracer("test");
        let started = Instant::now();
        for _ in 0..100 {
            tracer.start("spam").end();
        }
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "ending spans waited: {:?}",
            started.elapsed()
        );
        assert!(
            full() - full_before >= 100 - 8 - 4,
            "dropped only {}",
            full() - full_before
        );
        drop(hung);
    }
}
