//! MAIL FROM: starts a transaction and records the sender's ESMTP parameters
//! (SIZE, BODY, SMTPUTF8, DSN's RET and ENVID) in the envelope.

use super::{Flow, MAX_PREALLOCATION, Reply, Session, Transaction};
use crate::queue::{BodyType, DsnReturn, Envelope};
use mta_config::ListenerKind;
use smtp_proto::{
    MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME, MAIL_REQUIRETLS, MAIL_RET_FULL, MAIL_RET_HDRS,
    MAIL_SMTPUTF8, MailFrom,
};
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Counts one event against a configured rate; `false` when over it. The check may
    /// ask the fleet's Redis (bounded by its timeout): the future borrows nothing of the
    /// session.
    pub(super) fn within_rate(
        &self,
        key: &str,
        rate: &str,
        limit: &'static str,
    ) -> impl Future<Output = bool> + Send + 'static {
        let (ctx, peer, key) = (self.ctx.clone(), self.peer, key.to_owned());
        let rate = crate::limits::parse(rate);
        async move {
            match rate {
                Some(rate) => {
                    let ok = ctx.limiter.allow(&key, rate).await;
                    if !ok {
                        tracing::warn!(peer = %peer, key, "rate limit hit");
                        ctx.metrics.rate_limited(limit);
                    }
                    ok
                }
                None => true,
            }
        }
    }

    /// Counts one event against a per-client-IP rate; clients in
    /// `smtpd.limit_exempt_networks` are not limited (issue 13, item 11). Each limit has
    /// its own key: with one `ip:` key for both, a MAIL under `messages_per_ip` pushed the
    /// shared schedule past `recipients_per_ip`'s window and the next RCPT was refused.
    pub(super) async fn within_client_rate(&self, rate: &str, limit: &'static str) -> bool {
        let ip = self.peer.ip();
        if self.config.limits_exempt(ip) {
            return true;
        }
        self.within_rate(&format!("{limit}:{ip}"), rate, limit)
            .await
    }

    pub(super) async fn mail(&mut self, from: MailFrom<String>) -> Flow {
        let Some(helo) = self.helo.clone() else {
            return self.error(Reply::NEED_HELO);
        };
        if self.tx.is_some() {
            return self.error(Reply::NESTED_MAIL);
        }
        // RFC 6409 §4.3: submission requires authentication.
        if self.kind != ListenerKind::Smtp && self.user.is_none() {
            return self.error(Reply::AUTH_REQUIRED);
        }
        if let Some(user) = &self.user
            && !user.may_send_as(&from.address)
        {
            // The null sender owns no address: a restricted user may not hide behind it
            // (issue 13, item 9).
            return self.error(if from.address.is_empty() {
                Reply::NULL_SENDER_NOT_ALLOWED
            } else {
                Reply::SENDER_NOT_OWNED
            });
        }
        let require_tls = from.flags & MAIL_REQUIRETLS != 0;
        if require_tls && !self.stream.is_tls() {
            // Only offered under TLS (RFC 8689 §4.1).
            return self.error(Reply::UNSUPPORTED_PARAMETER);
        }
        let limits = self.config.smtpd.rate_limits.clone();
        if !self
            .within_client_rate(&limits.messages_per_ip, "messages_per_ip")
            .await
        {
            return self.error(Reply::RATE_LIMITED);
        }
        if let Some(user) = &self.user
            && !self
                .within_rate(
                    &format!("user:{}", user.name),
                    &limits.messages_per_user,
                    "messages_per_user",
                )
                .await
        {
            return self.error(Reply::RATE_LIMITED);
        }
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            // Not advertised: BINARYMIME needs BDAT-only transfer we do not offer.
            return self.error(Reply::UNSUPPORTED_PARAMETER);
        }
        let max = self.config.smtpd.max_message_size;
        if from.size as u64 > max {
            return self.error(Reply::MESSAGE_TOO_BIG);
        }
        if !from.address.is_empty() && !from.address.contains('@') {
            return self.error(Reply::BAD_SENDER_SYNTAX);
        }
        let dsn_ret = if from.flags & MAIL_RET_FULL != 0 {
            Some(DsnReturn::Full)
        } else if from.flags & MAIL_RET_HDRS != 0 {
            Some(DsnReturn::Headers)
        } else {
            None
        };
        let envelope = Envelope {
            declared_size: from.size as u64,
            body: if from.flags & MAIL_BODY_8BITMIME != 0 {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
            dsn_ret,
            dsn_envid: from.env_id,
            require_tls,
            ..Envelope::new(from.address, self.peer.ip(), helo)
        };
        self.tx = Some(Transaction {
            envelope,
            content: Vec::with_capacity((from.size).clamp(4096, MAX_PREALLOCATION)),
            bdat: false,
            failed: None,
            started: tokio::time::Instant::now(),
            received: 0,
        });
        self.reply(Reply::SENDER_OK)
    }
}
