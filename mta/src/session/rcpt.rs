//! RCPT TO: asks the policy stage about each recipient and records the accepted ones with
//! their DSN parameters (NOTIFY, ORCPT). `<postmaster>` without a domain is this server's
//! postmaster (RFC 5321 §4.5.1).

use super::{Flow, Reply, Session};
use crate::policy;
use crate::queue::{DsnNotify, Recipient, Status};
use mta_config::MtaConfig;
use smtp_proto::{
    RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS, RcptTo,
};
use std::net::IpAddr;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where `RCPT TO:<postmaster>` (no domain) goes. RFC 5321 §4.5.1: a server MUST accept
/// it. It is `queue.postmaster` when set (the address the administrator chose for the
/// postmaster, which may be elsewhere: it is accepted as the administrator's own alias
/// would be), else `postmaster@` the host name when that is a local domain, else the
/// first local domain's postmaster. With neither, there is nowhere to deliver it:
/// `550 5.1.1`.
fn postmaster(config: &MtaConfig, client: IpAddr) -> Result<Vec<String>, Reply> {
    if let Some(address) = &config.queue.postmaster {
        // Chosen by the administrator, so relayed for anyone, like an alias target.
        let may_relay = true;
        return policy::resolve_recipient(config, client, may_relay, address);
    }
    let domain = config
        .local_domain(&config.hostname)
        .or_else(|| config.local_domains.first())
        .ok_or(Reply::NO_SUCH_USER)?;
    policy::resolve_recipient(
        config,
        client,
        false,
        &format!("postmaster@{}", domain.name),
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn rcpt(&mut self, to: RcptTo<String>) -> Flow {
        if self.tx.is_none() {
            return self.error(Reply::NEED_MAIL);
        }
        // Spam policy, reported at RCPT (Postfix's delayed evaluation): the client is
        // looked up once per session.
        if self.dnsbl_tag.is_none() && !self.exempt_from_checks() {
            match crate::checks::dnsbl(&self.ctx, &self.config, self.peer.ip()).await {
                Ok(crate::checks::Dnsbl::Clean) => self.dnsbl_tag = Some(String::new()),
                Ok(crate::checks::Dnsbl::Tag(header)) => self.dnsbl_tag = Some(header),
                Err(reply) => return self.error(reply),
            }
        }
        if self.recipients().len() >= self.config.smtpd.max_recipients {
            return self.error(Reply::TOO_MANY_RECIPIENTS);
        }
        let authenticated = self.user.is_some();
        let resolved = if to.address.eq_ignore_ascii_case("postmaster") {
            postmaster(&self.config, self.peer.ip())
        } else {
            policy::resolve_recipient(&self.config, self.peer.ip(), authenticated, &to.address)
        };
        let targets = match resolved {
            Ok(targets) => targets,
            Err(reply) => return self.error(reply),
        };
        let config = self.config.clone();
        let limits = &config.smtpd.rate_limits;
        if !self
            .within_client_rate(&limits.recipients_per_ip, "recipients_per_ip")
            .await
        {
            return self.error(Reply::RATE_LIMITED);
        }
        if let Some((_, domain)) = crate::queue::split_address(&to.address)
            && self.config.local_domain(domain).is_none()
            && !self
                .within_rate(
                    &format!("domain:{}", domain.to_ascii_lowercase()),
                    &limits.recipients_per_domain,
                    "recipients_per_domain",
                )
                .await
        {
            return self.error(Reply::RATE_LIMITED);
        }
        let notify = (to.flags
            & (RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY | RCPT_NOTIFY_NEVER)
            != 0)
            .then_some(DsnNotify {
                success: to.flags & RCPT_NOTIFY_SUCCESS != 0,
                failure: to.flags & RCPT_NOTIFY_FAILURE != 0,
                delay: to.flags & RCPT_NOTIFY_DELAY != 0,
            });
        if let Some(tx) = self.tx.as_mut() {
            for target in targets {
                // An expanded alias keeps the address the client gave as its original
                // recipient (RFC 3461 ORCPT), so notices name what the sender wrote.
                let orcpt = match &to.orcpt {
                    Some(orcpt) => Some(orcpt.clone()),
                    None if target != to.address => Some(to.address.clone()),
                    None => None,
                };
                let known = tx
                    .envelope
                    .recipients
                    .iter()
                    .any(|r| r.address.eq_ignore_ascii_case(&target));
                if !known {
                    tx.envelope.recipients.push(Recipient {
                        address: target,
                        notify,
                        orcpt,
                        status: Status::Scheduled,
                        remote_mta: None,
                    });
                }
            }
        }
        self.reply(Reply::RECIPIENT_OK)
    }
}
