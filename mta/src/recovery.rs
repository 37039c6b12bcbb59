//! Start-up recovery of the queue, in the background: the MTA listens as soon as the spool
//! is open (its index rebuilt, which reads no envelope), and this task then reads the
//! queued envelopes a batch at a time and schedules them, while mail is accepted and
//! delivered (issue 17: a restart with a million queued messages takes seconds, not
//! minutes, and never holds every envelope in memory).
//!
//! Order per batch: the hand-over origins the envelopes carry go on record first, then
//! the messages are scheduled (so a message is never delivered and gone before its origin
//! is known), and the next batch is read only once the scheduler has taken this one.
//! Hand-overs from peers wait until the last batch ([`Drain::recovery_complete`]).
//!
//! It owns no state of its own and never writes the spool; an envelope it cannot read is
//! logged and left in the spool untouched.

use crate::context::Context;
use crate::drain::Drain;
use crate::queue::{Envelope, QueueId};
use std::sync::Arc;

/// Envelopes read and scheduled at a time.
const BATCH: usize = 1000;

/// Schedules every message the spool held when it was opened: `backlog` is the last id
/// then, and how many messages there were. Until the last batch, the queue-depth gauge's
/// `recovering` state counts those not scheduled yet.
pub async fn run(ctx: Arc<Context>, drain: Arc<Drain>, backlog: (Option<QueueId>, usize)) {
    use mta_telemetry::QueueState::Recovering;
    let (through, queued) = backlog;
    let began = std::time::Instant::now();
    let (mut scheduled, mut unreadable) = (0usize, 0usize);
    let remaining = |done: usize| queued.saturating_sub(done) as u64;
    ctx.metrics.set_queue_depth(Recovering, remaining(0));
    let mut after = None;
    while let Some(last) = through {
        let spool = ctx.spool.clone();
        let read = tokio::task::spawn_blocking(move || {
            let ids = spool.ids_after(after, BATCH);
            let mut batch = Vec::with_capacity(ids.len());
            let mut unreadable = 0;
            for id in ids.iter().copied().filter(|id| *id <= last) {
                match spool.envelope(id) {
                    Ok(envelope) => batch.push((id, envelope)),
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "recovery: envelope unreadable; the message stays in the spool, unscheduled");
                        unreadable += 1;
                    }
                }
            }
            (ids.last().copied(), batch, unreadable)
        })
        .await;
        let Ok((Some(next), batch, skipped)) = read else {
            break;
        };
        unreadable += skipped;
        let origins: Vec<_> = batch.iter().filter_map(origin).collect();
        if let Err(e) = drain.recovered_origins(&origins).await {
            tracing::error!(error = %e, "recovery: hand-over origins not recorded (their envelopes still carry them)");
        }
        scheduled += batch.len();
        if !ctx.scheduler.enqueue_recovered(batch).await {
            return; // shutdown: the rest stays in the spool for the next start
        }
        ctx.metrics
            .set_queue_depth(Recovering, remaining(scheduled + unreadable));
        if next >= last {
            break;
        }
        after = Some(next);
    }
    ctx.metrics.set_queue_depth(Recovering, 0);
    drain.recovery_complete();
    if through.is_some() {
        tracing::info!(
            messages = scheduled,
            unreadable,
            seconds = began.elapsed().as_secs_f64(),
            "recovered: every queued message is scheduled"
        );
    }
}

fn origin((_, envelope): &(QueueId, Envelope)) -> Option<(crate::queue::HandoffOrigin, u64)> {
    envelope
        .handoff_origin
        .clone()
        .map(|o| (o, envelope.received_at))
}
