//! What [`crate::Connection::send`] delivers: an envelope and its content, borrowed
//! from the spool so that no copy of the body is made before it is written out.

/// One envelope recipient with its DSN parameters (RFC 3461 section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundRecipient<'a> {
    /// The address without angle brackets.
    pub address: &'a str,
    /// `NOTIFY=` as (success, failure, delay); `Some((false, false, false))` is
    /// `NOTIFY=NEVER`. Sent only when the peer offers DSN.
    pub notify: Option<(bool, bool, bool)>,
    /// The original recipient, sent as `ORCPT=rfc822;<xtext>` when the peer offers DSN.
    pub orcpt: Option<&'a str>,
}

impl<'a> OutboundRecipient<'a> {
    /// A recipient without DSN parameters.
    pub fn new(address: &'a str) -> Self {
        Self {
            address,
            notify: None,
            orcpt: None,
        }
    }
}

/// One message for one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundMessage<'a> {
    /// Reverse path without angle brackets; `""` is the null sender (bounces).
    pub sender: &'a str,
    pub recipients: &'a [OutboundRecipient<'a>],
    /// The message (headers and body) with CRLF line ends, not dot-stuffed. Bare
    /// CR or LF are sent as CRLF; a missing final CRLF is added.
    pub content: &'a [u8],
    /// The content has 8-bit octets: `BODY=8BITMIME`, and an error for a peer
    /// without 8BITMIME.
    pub eight_bit: bool,
    /// The message needs SMTPUTF8 (RFC 6531). Non-ASCII envelope addresses imply it.
    pub smtputf8: bool,
    /// `RET=FULL` (`Some(true)`) or `RET=HDRS` (`Some(false)`), sent only when
    /// the peer offers DSN.
    pub dsn_ret_full: Option<bool>,
    /// `ENVID=` (xtext-encoded here), sent only when the peer offers DSN.
    pub dsn_envid: Option<&'a str>,
}

impl<'a> OutboundMessage<'a> {
    /// A 7-bit message without DSN parameters.
    pub fn new(
        sender: &'a str,
        recipients: &'a [OutboundRecipient<'a>],
        content: &'a [u8],
    ) -> Self {
        Self {
            sender,
            recipients,
            content,
            eight_bit: false,
            smtputf8: false,
            dsn_ret_full: None,
            dsn_envid: None,
        }
    }
}
