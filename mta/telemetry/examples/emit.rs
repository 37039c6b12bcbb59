//! Drives mta-telemetry the way petrel-mta does, for e2e/test_telemetry.py and by hand.
//!
//! * `emit trace`: `init()` from the `OTEL_*` environment, one session span with a
//!   transaction span inside it, and a delivery attempt that continues the trace through
//!   the saved `traceparent`; then the guard flushes and the process exits. The session
//!   authenticates with a password and carries a body, neither of which may reach the
//!   collector.
//! * `emit serve`: records a known workload into `MtaMetrics`, serves `/metrics`,
//!   `/healthz`, `/readyz` on 127.0.0.1:0, prints `http on ADDR`, and exits when stdin
//!   closes. Writing `drain` on stdin makes `/readyz` answer 503.
//! * `emit bench N`: N messages' worth of spans (session, transaction, delivery attempt,
//!   fields recorded), printing the cost per message. Run it with and without
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` to compare.

use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mta_telemetry::spans::{self, field};
use mta_telemetry::{MtaMetrics, Outcome, QueueState};

/// Must never appear in telemetry.
const PASSWORD: &str = "hunter2-correct-horse";
/// Must never appear in telemetry.
const BODY: &str = "Subject: secret plans\r\n\r\nThe eagle lands at midnight.\r\n";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("trace");
    let guard = mta_telemetry::init("petrel-mta", std::env::var_os("EMIT_JSON").is_some())?;
    match mode {
        "trace" => trace(),
        "serve" => serve()?,
        "bench" => bench(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(100_000)),
        other => return Err(format!("unknown mode {other:?} (trace, serve, bench N)").into()),
    }
    // After the guard's final flush, so spans lost at exit are counted too.
    drop(guard);
    println!("spans dropped: {}", mta_telemetry::spans_dropped());
    Ok(())
}

/// One message: received over a TLS session with AUTH, then delivered.
fn one_message(queue_id: &str) {
    let session = spans::session("192.0.2.7:40001".parse().expect("literal address"));
    let reception = {
        let _s = session.enter();
        session.record(field::HELO, "client.example");
        session.record(field::TLS_VERSION, "1.3");
        // What the MTA checks and forgets: the password is compared, never recorded.
        let _credentials_checked = PASSWORD.len();
        session.record(field::USER_ID, "alice");
        let transaction = spans::transaction();
        let _t = transaction.enter();
        let size = BODY.len() as i64;
        transaction.record(field::QUEUE_ID, queue_id);
        transaction.record(field::SIZE, size);
        transaction.record(field::RECIPIENTS, 2_i64);
        transaction.record(field::REPLY_CODE, 250_i64);
        tracing::info!(queue_id, size, "received");
        spans::traceparent(&transaction)
    };
    drop(session);

    let attempt = spans::delivery_attempt(queue_id, "example.net", reception.as_deref());
    attempt.record(field::ATTEMPT, 1_i64);
    attempt.record(field::MX_HOST, "mx1.example.net");
    attempt.record(field::SERVER_PORT, 25_i64);
    attempt.record(field::TLS_VERSION, "1.2");
    attempt.record(field::RECIPIENTS, 2_i64);
    attempt.record(field::REPLY_CODE, 250_i64);
    attempt.record(field::OUTCOME, Outcome::Delivered.as_str());
    attempt.in_scope(|| tracing::info!(queue_id, "delivered"));
}

fn trace() {
    one_message("0001TEST0001");
}

fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let metrics = MtaMetrics::new();
    // The workload e2e/test_telemetry.py expects.
    for _ in 0..3 {
        metrics.session_started();
    }
    metrics.session_ended();
    metrics.reply("EHLO", 250);
    metrics.reply("RCPT", 250);
    metrics.reply("RCPT", 250);
    metrics.reply("RCPT", 550);
    metrics.reply("DATA", 354);
    metrics.message_accepted(3000, Duration::from_millis(4));
    metrics.message_accepted(70_000, Duration::from_millis(6));
    metrics.delivery_attempt(Outcome::Delivered, Duration::from_millis(120));
    metrics.delivery_attempt(Outcome::Deferred, Duration::from_secs(2));
    metrics.message_bounced();
    metrics.set_queue_depth(QueueState::Waiting, 4);
    metrics.spool_sync(Duration::from_micros(700), 2);
    metrics.tls_handshake(true);
    metrics.auth_failure();
    metrics.auth_failure();
    metrics.rate_limited("client_ip");

    let draining = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Runtime::new()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let draining = draining.clone();
        let readiness = move || {
            if draining.load(Ordering::SeqCst) {
                Err("draining".to_string())
            } else {
                Ok(())
            }
        };
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            println!("http on {}", listener.local_addr()?);
            Ok::<_, std::io::Error>(tokio::spawn(mta_telemetry::serve_http(
                listener,
                metrics,
                Arc::new(readiness),
                async {
                    let _ = stop_rx.await;
                },
            )))
        })?
    };
    for line in std::io::stdin().lock().lines() {
        if line?.trim() == "drain" {
            draining.store(true, Ordering::SeqCst);
            println!("draining");
        }
    }
    let _ = stop_tx.send(());
    runtime.block_on(server)??;
    Ok(())
}

fn bench(n: u32) {
    let started = Instant::now();
    for i in 0..n {
        one_message(if i % 2 == 0 {
            "0001BENCH000"
        } else {
            "0001BENCH001"
        });
    }
    let elapsed = started.elapsed();
    println!(
        "bench: {n} messages in {:.3} s, {:.2} µs per message (session + transaction + delivery spans, 2 log events)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / f64::from(n)
    );
}
