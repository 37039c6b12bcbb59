//! Inbound verification: SPF (RFC 7208), DKIM (RFC 6376, RFC 8463), DMARC (RFC 7489 and
//! its revision) and ARC (RFC 8617), summarised in one `Authentication-Results` header
//! field (RFC 8601).
//!
//! Input: the SMTP facts ([`InboundFacts`]: client address, HELO name, MAIL FROM, our
//! authserv-id) and the message as received, after
//! [`crate::strip_forged_authentication_results`]. Output: a [`Verdict`]. The evaluation
//! is `mail-auth`'s, against the configured resolver; this module picks the SPF identity,
//! feeds DKIM and SPF into DMARC, and maps the results into enums without payloads so the
//! MTA's policy code matches them exhaustively.
//!
//! Invariants:
//! * A DNS failure is never a pass and never a permanent failure: it is `TempError` in the
//!   result and `temperror` in the header, and it sets [`Verdict::temporary_error`].
//! * [`Verdict::dmarc_policy`] is not `None` only when DMARC *failed* for this message
//!   (the author domain's `p=`, or `sp=`/`np=` for subdomains, lowered one step by `t=y`);
//!   a DMARC temperror never asks for rejection.
//! * No policy decision is made here: rejecting, deferring or tagging is the MTA's.

use crate::Error;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::system_conf::read_system_conf;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    ArcOutput, AuthenticatedMessage, AuthenticationResults, DkimOutput, DmarcOutput,
    MessageAuthenticator, SpfOutput,
};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// How long one DNS query may take before the resolver retries or gives up. Long enough
/// for a slow authoritative server, short enough that the client's end-of-DATA timeout
/// (RFC 5321 §4.5.3.2.6: 10 minutes) is never at risk with the SPF limit of 10 look-ups.
const DNS_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the SMTP session knows about the message's origin.
#[derive(Debug, Clone, Copy)]
pub struct InboundFacts<'a> {
    /// The connecting client's address (after PROXY protocol, if any).
    pub client_ip: IpAddr,
    /// The EHLO/HELO argument.
    pub helo: &'a str,
    /// The MAIL FROM address without angle brackets; empty for the null sender.
    pub mail_from: &'a str,
    /// Our authserv-id (normally the MTA's host name), the first word of the header field.
    pub authserv_id: &'a str,
}

/// SPF result (RFC 7208 §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    /// No SPF record (or no usable identity).
    None,
    /// A DNS failure: try again later.
    TempError,
    /// The record is broken (syntax, too many look-ups).
    PermError,
}

/// The result of one DKIM signature (RFC 8601 §2.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimOutcome {
    Pass,
    /// The signature did not verify (wrong key, altered headers).
    Fail,
    /// The signature could not be checked for a reason that is the signer's (body hash
    /// mismatch, expired, malformed); RFC 6376 treats these like no signature.
    Neutral,
    /// The key record is missing or unusable.
    PermError,
    /// The key record could not be fetched: try again later.
    TempError,
    None,
}

/// One DKIM signature's result and who signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimResult {
    pub outcome: DkimOutcome,
    /// `d=` of the signature (empty when the signature could not be parsed).
    pub domain: String,
    /// `s=` of the signature (empty when the signature could not be parsed).
    pub selector: String,
    /// Why it did not pass, for logs (empty on pass).
    pub detail: String,
}

/// DMARC result for the message (RFC 7489 §11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcResultSummary {
    /// An aligned SPF or DKIM pass.
    Pass,
    /// The author domain publishes a policy and nothing aligned passed.
    Fail,
    /// No policy (or no single author domain).
    None,
    /// A DNS failure decided the outcome: try again later.
    TempError,
    PermError,
}

/// ARC chain validation result (RFC 8617 §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArcResult {
    Pass,
    Fail,
    /// Malformed ARC header fields.
    Neutral,
    PermError,
    TempError,
    /// No ARC set.
    None,
}

/// What the author domain's DMARC policy asks the receiver to do with a failing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcDisposition {
    /// Deliver as usual (`p=none`, or DMARC did not fail).
    None,
    /// Treat as suspicious: tag or file as spam.
    Quarantine,
    /// Refuse the message (the MTA answers `550 5.7.1` at end of DATA).
    Reject,
}

/// Everything inbound verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// One complete `Authentication-Results: <authserv-id>; spf=...; dkim=...; dmarc=...;
    /// arc=...` header field, folded, ending in CRLF: prepend it to the message.
    pub header: String,
    pub spf: SpfResult,
    /// One entry per DKIM-Signature field (malformed ones included, as `Neutral`).
    pub dkim: Vec<DkimResult>,
    pub dmarc: DmarcResultSummary,
    /// What the author domain asks for, given that DMARC failed; `None` when it did not
    /// fail (see the module invariants).
    pub dmarc_policy: DmarcDisposition,
    pub arc: ArcResult,
    /// Some look-up (SPF, a DKIM key, DMARC, ARC) failed temporarily.
    pub temporary_error: bool,
}

/// Verifies inbound messages against one resolver.
#[derive(Clone)]
pub struct Verifier {
    authenticator: MessageAuthenticator,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier querying `nameservers` (UDP with TCP fallback, each on its own port), or
    /// the system's resolv.conf when the list is empty, with a 5-second query timeout.
    ///
    /// Must be called inside a tokio runtime.
    pub fn new(nameservers: &[SocketAddr]) -> Result<Self, Error> {
        Self::with_query_timeout(nameservers, DNS_QUERY_TIMEOUT)
    }

    /// As [`Verifier::new`], with `timeout` per DNS query attempt (the resolver makes two
    /// attempts per name server).
    pub fn with_query_timeout(
        nameservers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Self, Error> {
        let (config, mut options) = if nameservers.is_empty() {
            read_system_conf().map_err(|e| Error::Resolver(format!("system resolver: {e}")))?
        } else {
            let servers = nameservers
                .iter()
                .map(|server| {
                    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                    for connection in &mut ns.connections {
                        connection.port = server.port();
                    }
                    ns
                })
                .collect();
            (
                ResolverConfig::from_name_servers(servers),
                ResolverOpts::default(),
            )
        };
        options.timeout = timeout;
        let authenticator = MessageAuthenticator::new(config, options)
            .map_err(|e| Error::Resolver(e.to_string()))?;
        Ok(Verifier { authenticator })
    }

    /// The resolver, for other look-ups on the same servers (DNSBL: [`crate::dnsbl_listed`]).
    pub fn resolver(&self) -> &TokioResolver {
        self.authenticator.resolver()
    }

    /// Runs SPF, DKIM, ARC and DMARC on `message` and builds the header.
    ///
    /// SPF checks the MAIL FROM identity, or the HELO identity for the null sender
    /// (RFC 7208 §2.4); DMARC's SPF alignment uses the same domain.
    pub async fn verify(&self, facts: &InboundFacts<'_>, message: &[u8]) -> Verdict {
        let spf = self.spf(facts).await;
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            // No header block at all: nothing to verify but SPF.
            let dmarc = DmarcOutput::default();
            let arc = ArcOutput::default();
            return verdict(facts, &spf, &[], &dmarc, &arc, "");
        };
        let dkim = self.authenticator.verify_dkim(&parsed).await;
        let arc = self.authenticator.verify_arc(&parsed).await;
        let dmarc = self
            .authenticator
            .verify_dmarc(DmarcParameters {
                message: &parsed,
                dkim_output: &dkim,
                dkim2_output: None,
                rfc5321_mail_from_domain: spf_domain(facts),
                spf_output: &spf,
            })
            .await;
        let header_from = parsed.from.first().map_or("", String::as_str);
        verdict(facts, &spf, &dkim, &dmarc, &arc, header_from)
    }

    async fn spf(&self, facts: &InboundFacts<'_>) -> SpfOutput {
        let params = if facts.mail_from.is_empty() {
            SpfParameters::verify_ehlo(facts.client_ip, facts.helo, facts.authserv_id)
        } else {
            SpfParameters::verify_mail_from(
                facts.client_ip,
                facts.helo,
                facts.authserv_id,
                facts.mail_from,
            )
        };
        self.authenticator.verify_spf(params).await
    }
}

/// The domain SPF checked: MAIL FROM's, or the HELO name for the null sender.
fn spf_domain<'a>(facts: &InboundFacts<'a>) -> &'a str {
    match facts.mail_from.rsplit_once('@') {
        Some((_, domain)) if !facts.mail_from.is_empty() => domain,
        _ => facts.helo,
    }
}

fn verdict(
    facts: &InboundFacts<'_>,
    spf: &SpfOutput,
    dkim: &[DkimOutput<'_>],
    dmarc: &DmarcOutput,
    arc: &ArcOutput<'_>,
    header_from: &str,
) -> Verdict {
    let spf_result = SpfResult::from(spf.result());
    let dkim_results: Vec<DkimResult> = dkim.iter().map(DkimResult::from).collect();
    let dmarc_result = DmarcResultSummary::from(&dmarc.result());
    let arc_result = ArcResult::from(arc.result());
    let dmarc_policy = match dmarc_result {
        DmarcResultSummary::Fail => match dmarc.policy() {
            Policy::Reject => DmarcDisposition::Reject,
            Policy::Quarantine => DmarcDisposition::Quarantine,
            Policy::None | Policy::Unspecified => DmarcDisposition::None,
        },
        _ => DmarcDisposition::None,
    };
    let temporary_error = spf_result == SpfResult::TempError
        || dkim_results
            .iter()
            .any(|d| d.outcome == DkimOutcome::TempError)
        || dmarc_result == DmarcResultSummary::TempError
        || arc_result == ArcResult::TempError;
    Verdict {
        header: header(facts, spf, dkim, dmarc, arc, header_from),
        spf: spf_result,
        dkim: dkim_results,
        dmarc: dmarc_result,
        dmarc_policy,
        arc: arc_result,
        temporary_error,
    }
}

/// The header field, method by method. `mail-auth` writes each `resinfo` (with the RFC
/// 8601 property names and an explanatory SPF comment); the pieces are assembled here so
/// that a method with nothing to report still says `none` (RFC 8601 §2.2 allows silence,
/// but an explicit `dkim=none` tells the reader the check ran).
fn header(
    facts: &InboundFacts<'_>,
    spf: &SpfOutput,
    dkim: &[DkimOutput<'_>],
    dmarc: &DmarcOutput,
    arc: &ArcOutput<'_>,
    header_from: &str,
) -> String {
    let id = facts.authserv_id;
    let spf_part = if facts.mail_from.is_empty() {
        AuthenticationResults::new(id).with_spf_ehlo_result(spf, facts.client_ip, facts.helo)
    } else {
        AuthenticationResults::new(id).with_spf_mailfrom_result(
            spf,
            facts.client_ip,
            facts.mail_from,
            facts.helo,
        )
    }
    .to_string();
    let spf_part = spf_part.strip_prefix(id).unwrap_or(&spf_part).to_owned();
    let dkim_part = if dkim.is_empty() {
        ";\r\n\tdkim=none".to_owned()
    } else {
        AuthenticationResults::new("")
            .with_dkim_results(dkim, header_from)
            .to_string()
    };
    let dmarc_part = if dmarc.domain().is_empty() {
        ";\r\n\tdmarc=none".to_owned()
    } else {
        AuthenticationResults::new("")
            .with_dmarc_result(dmarc)
            .to_string()
    };
    let arc_part = AuthenticationResults::new("")
        .with_arc_result(arc, facts.client_ip)
        .to_string();
    format!("Authentication-Results: {id}{spf_part}{dkim_part}{dmarc_part}{arc_part}\r\n")
}

impl From<mail_auth::SpfResult> for SpfResult {
    fn from(result: mail_auth::SpfResult) -> Self {
        match result {
            mail_auth::SpfResult::Pass => SpfResult::Pass,
            mail_auth::SpfResult::Fail => SpfResult::Fail,
            mail_auth::SpfResult::SoftFail => SpfResult::SoftFail,
            mail_auth::SpfResult::Neutral => SpfResult::Neutral,
            mail_auth::SpfResult::TempError => SpfResult::TempError,
            mail_auth::SpfResult::PermError => SpfResult::PermError,
            mail_auth::SpfResult::None => SpfResult::None,
        }
    }
}

impl From<&mail_auth::DkimResult> for DkimOutcome {
    fn from(result: &mail_auth::DkimResult) -> Self {
        match result {
            mail_auth::DkimResult::Pass => DkimOutcome::Pass,
            mail_auth::DkimResult::Neutral(_) => DkimOutcome::Neutral,
            mail_auth::DkimResult::Fail(_) => DkimOutcome::Fail,
            mail_auth::DkimResult::PermError(_) => DkimOutcome::PermError,
            mail_auth::DkimResult::TempError(_) => DkimOutcome::TempError,
            mail_auth::DkimResult::None => DkimOutcome::None,
        }
    }
}

impl From<&DkimOutput<'_>> for DkimResult {
    fn from(output: &DkimOutput<'_>) -> Self {
        let result = output.result();
        let detail = match result {
            mail_auth::DkimResult::Neutral(e)
            | mail_auth::DkimResult::Fail(e)
            | mail_auth::DkimResult::PermError(e)
            | mail_auth::DkimResult::TempError(e) => e.to_string(),
            mail_auth::DkimResult::Pass | mail_auth::DkimResult::None => String::new(),
        };
        let (domain, selector) = output
            .signature()
            .map(|s| (s.d.clone(), s.s.clone()))
            .unwrap_or_default();
        DkimResult {
            outcome: DkimOutcome::from(result),
            domain,
            selector,
            detail,
        }
    }
}

impl From<&mail_auth::DkimResult> for ArcResult {
    fn from(result: &mail_auth::DkimResult) -> Self {
        match DkimOutcome::from(result) {
            DkimOutcome::Pass => ArcResult::Pass,
            DkimOutcome::Fail => ArcResult::Fail,
            DkimOutcome::Neutral => ArcResult::Neutral,
            DkimOutcome::PermError => ArcResult::PermError,
            DkimOutcome::TempError => ArcResult::TempError,
            DkimOutcome::None => ArcResult::None,
        }
    }
}

impl From<&mail_auth::DmarcResult> for DmarcResultSummary {
    fn from(result: &mail_auth::DmarcResult) -> Self {
        match result {
            mail_auth::DmarcResult::Pass => DmarcResultSummary::Pass,
            mail_auth::DmarcResult::Fail(_) => DmarcResultSummary::Fail,
            mail_auth::DmarcResult::TempError(_) => DmarcResultSummary::TempError,
            mail_auth::DmarcResult::PermError(_) => DmarcResultSummary::PermError,
            mail_auth::DmarcResult::None => DmarcResultSummary::None,
        }
    }
}
