//! DATA and BDAT (RFC 3030 CHUNKING): receiving the content, and handing the finished
//! message to the session's [`cleanup::Cleanup`], which stores it durably before the
//! session says `250`.

use super::{Flow, Input, Reply, Session};
use crate::cleanup;
use mta_telemetry::spans::field;
use smtp_proto::request::receiver::{BdatReceiver, DataReceiver, DummyDataReceiver};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) fn data(&mut self) -> Flow {
        let Some(tx) = self.tx.as_ref() else {
            return self.error(Reply::NEED_MAIL);
        };
        if tx.bdat {
            return self.error(Reply::BDAT_THEN_DATA);
        }
        if tx.envelope.recipients.is_empty() {
            return self.error(Reply::NO_VALID_RECIPIENTS);
        }
        self.input = Input::Data(DataReceiver::new());
        self.reply(Reply::START_DATA)
    }

    pub(super) fn bdat(&mut self, chunk_size: usize, is_last: bool) -> Flow {
        let max = self.config.smtpd.max_message_size;
        if chunk_size as u64 > max {
            // Reading and dropping the chunk would take unbounded time (up to 2^64 bytes):
            // refuse it and close, so none of its bytes is ever read as a command.
            self.send(Reply::MESSAGE_TOO_BIG);
            return self.error(Reply::CHUNK_NOT_READ);
        }
        // The chunk's bytes follow the command whatever we answer: read them either way
        // (at most `max_message_size` bytes).
        let refusal = match self.tx.as_mut() {
            None => Some(Reply::NEED_MAIL),
            Some(tx) if tx.envelope.recipients.is_empty() => Some(Reply::NO_VALID_RECIPIENTS),
            Some(tx) => {
                tx.bdat = true;
                if let Some(failed) = tx.failed.clone() {
                    Some(failed)
                } else if (tx.content.len() as u64).saturating_add(chunk_size as u64) > max {
                    Some(Reply::MESSAGE_TOO_BIG)
                } else {
                    None
                }
            }
        };
        match refusal {
            Some(reply) => {
                if is_last && let Some(tx) = self.tx.as_mut() {
                    // The last chunk ends the failed transaction.
                    tx.bdat = false;
                }
                self.input = Input::Discard {
                    receiver: DummyDataReceiver::new_bdat(chunk_size),
                    reply,
                };
            }
            None => self.input = Input::Bdat(BdatReceiver::new(chunk_size, is_last)),
        }
        // The main loop feeds the chunk's bytes (possibly none: `BDAT 0 LAST`) next.
        Flow::Continue
    }

    /// One BDAT chunk has arrived in full.
    pub(super) async fn end_of_chunk(&mut self, last: bool) -> Flow {
        if last {
            self.end_of_data().await
        } else {
            let size = self.tx.as_ref().map(|tx| tx.content.len()).unwrap_or(0);
            self.reply(Reply::OK.with_text(format!("{size} octets received")))
        }
    }

    /// The message content is complete: store it, then answer.
    pub(super) async fn end_of_data(&mut self) -> Flow {
        let Some(mut tx) = self.tx.take() else {
            return self.error(Reply::NEED_MAIL);
        };
        let protocol = cleanup::protocol_name(
            self.extended,
            self.stream.is_tls(),
            self.user.is_some(),
            tx.envelope.smtputf8,
        );
        let arrival = cleanup::Arrival {
            protocol,
            exempt: self.exempt_from_checks(),
            extra_headers: self.dnsbl_tag.as_deref().unwrap_or(""),
        };
        let span = mta_telemetry::spans::transaction();
        span.record(field::SIZE, tx.content.len() as i64);
        span.record(field::RECIPIENTS, tx.envelope.recipients.len() as i64);
        let outcome = self
            .cleanup
            .accept(
                &self.ctx,
                &self.config,
                &arrival,
                &mut tx.envelope,
                &tx.content,
            )
            .instrument(span.clone())
            .await;
        match &outcome {
            Ok(id) => {
                span.record(field::QUEUE_ID, id.to_string());
                span.record(field::REPLY_CODE, 250_i64);
            }
            Err(reply) => {
                span.record(field::REPLY_CODE, i64::from(reply.code));
                span.record(field::STATUS, "error");
            }
        }
        match outcome {
            Ok(id) => self.reply(Reply::queued(id)),
            Err(reply) => self.error(reply),
        }
    }
}
