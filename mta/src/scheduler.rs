//! Picks queued messages and delivers them, recording each recipient's outcome in the spool.
//!
//! This is the foundation's scheduler: local (Maildir) delivery only, a bounded number of
//! deliveries at once, and a fixed retry delay for deferred recipients. Per-destination
//! queues, backoff, expiry and bounces belong to the outbound work and replace the retry
//! timer here. What it already guarantees: a message leaves the spool only once every
//! recipient is final, and every recovered message is delivered after a restart.

use crate::context::Context;
use crate::local::{self, Delivered};
use crate::queue::{Envelope, QueueId, Status, split_address};
use crate::shutdown::Shutdown;
use mta_config::{LocalDelivery, MtaConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// Deliveries running at once.
const CONCURRENCY: u32 = 16;
/// Wait before retrying a deferred recipient.
const RETRY_DELAY: Duration = Duration::from_secs(60);

/// A message ready for a delivery attempt.
#[derive(Debug)]
pub struct Job {
    pub id: QueueId,
    pub envelope: Envelope,
}

/// Hands messages to the scheduler. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    jobs: mpsc::UnboundedSender<Job>,
}

impl SchedulerHandle {
    /// A handle and the receiving end the scheduler runs on.
    pub fn channel() -> (SchedulerHandle, mpsc::UnboundedReceiver<Job>) {
        let (jobs, rx) = mpsc::unbounded_channel();
        (SchedulerHandle { jobs }, rx)
    }

    /// Queues a message for delivery now. Never blocks; after shutdown the message simply
    /// stays in the spool for the next start.
    pub fn enqueue(&self, id: QueueId, envelope: Envelope) {
        let _ = self.jobs.send(Job { id, envelope });
    }
}

/// Runs until shutdown, then waits for deliveries in progress to finish.
pub async fn run(
    ctx: Arc<Context>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut shutdown: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY as usize));
    loop {
        let job = tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => job,
                None => break,
            },
            () = shutdown.recv() => break,
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            attempt(&ctx, job, shutdown).await;
            drop(slot);
        });
    }
    let _ = slots.acquire_many(CONCURRENCY).await;
}

/// One delivery attempt of every recipient not yet final.
async fn attempt(ctx: &Arc<Context>, job: Job, shutdown: Shutdown) {
    let Job { id, mut envelope } = job;
    let message = match ctx.spool.read_message(id).await {
        Ok(message) => Arc::new(message),
        Err(e) => {
            tracing::error!(queue_id = %id, error = %e, "cannot read queued message");
            return;
        }
    };
    let config = ctx.config();
    for index in 0..envelope.recipients.len() {
        if envelope.recipients[index].status.is_final() {
            continue;
        }
        let address = envelope.recipients[index].address.clone();
        let status = deliver_one(&config, id, index, &address, message.clone()).await;
        match &status {
            Status::Delivered { detail } => {
                tracing::info!(queue_id = %id, to = %address, detail, "delivered")
            }
            Status::Deferred { detail } => {
                tracing::warn!(queue_id = %id, to = %address, detail, "deferred")
            }
            Status::Failed { detail } => {
                tracing::warn!(queue_id = %id, to = %address, detail, "failed")
            }
            Status::Scheduled => {}
        }
        envelope.recipients[index].status = status;
    }

    if envelope.recipients.iter().all(|r| r.status.is_final()) {
        if let Err(e) = ctx.spool.remove(id).await {
            tracing::error!(queue_id = %id, error = %e, "cannot mark message done");
        }
        return;
    }
    if let Err(e) = ctx.spool.update(id, &envelope).await {
        tracing::error!(queue_id = %id, error = %e, "cannot record delivery status");
    }
    retry_later(ctx.clone(), Job { id, envelope }, shutdown);
}

fn retry_later(ctx: Arc<Context>, job: Job, mut shutdown: Shutdown) {
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(RETRY_DELAY) => ctx.scheduler.enqueue(job.id, job.envelope),
            // The message stays in the spool; the next start picks it up.
            () = shutdown.recv() => {}
        }
    });
}

async fn deliver_one(
    config: &MtaConfig,
    id: QueueId,
    index: usize,
    address: &str,
    message: Arc<Vec<u8>>,
) -> Status {
    let Some((local_part, domain)) = split_address(address) else {
        return Status::Failed {
            detail: "550 5.1.3 recipient address has no domain".into(),
        };
    };
    let Some(domain) = config.local_domain(domain) else {
        return Status::Deferred {
            detail: format!("451 4.4.0 no route to {domain}: not a local domain any more"),
        };
    };
    let Some(mailbox) = local::mailbox_name(local_part) else {
        return Status::Failed {
            detail: "553 5.1.3 local part not acceptable for local delivery".into(),
        };
    };
    let LocalDelivery::Maildir { root } = &domain.delivery;
    let root = root.clone();
    let hostname = config.hostname.clone();
    let result = tokio::task::spawn_blocking(move || {
        local::deliver(&root, &mailbox, id, index, &hostname, &message)
    })
    .await;
    match result {
        Ok(Ok(Delivered::New(path))) => Status::Delivered {
            detail: format!("250 2.0.0 delivered to {}", path.display()),
        },
        Ok(Ok(Delivered::AlreadyThere(path))) => Status::Delivered {
            detail: format!("250 2.0.0 already delivered to {}", path.display()),
        },
        Ok(Err(e)) => Status::Deferred {
            detail: format!("451 4.3.0 maildir write failed: {e}"),
        },
        Err(e) => Status::Deferred {
            detail: format!("451 4.3.0 delivery task failed: {e}"),
        },
    }
}
