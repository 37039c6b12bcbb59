//! mta-auth against a real (in-process, authoritative) DNS server: our signatures verify
//! with our verifier, SPF results one by one, DMARC enforcement, DNSBL, DNS failures as
//! temporary results, and forged Authentication-Results removal.
//!
//! dkimpy interop (both directions) lives in `e2e/test_dkim.py`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod dns;

use dns::{TestDns, Zone, closed_port, servfail_server};
use mta_auth::{
    Algorithm, DkimOutcome, DmarcDisposition, DmarcResultSummary, Error, InboundFacts, Signer,
    SigningKey, SpfResult, Verdict, Verifier, dnsbl_listed, strip_forged_authentication_results,
};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

const RSA_PKCS1: &[u8] = include_bytes!("../fixtures/rsa2048-pkcs1.pem");
const RSA_PKCS8: &[u8] = include_bytes!("../fixtures/rsa2048-pkcs8.pem");
const ED25519: &[u8] = include_bytes!("../fixtures/ed25519-pkcs8.pem");

const AUTHSERV: &str = "mx.petrel.test";
/// Inside example.test's SPF record.
const GOOD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
/// Outside every SPF record.
const BAD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

fn rsa_key() -> SigningKey {
    SigningKey::from_pem("example.test", "rsa", RSA_PKCS1).unwrap()
}

fn ed_key() -> SigningKey {
    SigningKey::from_pem("example.test", "ed", ED25519).unwrap()
}

/// The zone every test uses.
async fn world() -> (TestDns, Verifier) {
    let dns = Zone::new()
        .txt("rsa._domainkey.example.test", &rsa_key().dns_record())
        .txt("ed._domainkey.example.test", &ed_key().dns_record())
        .txt("example.test", "v=spf1 ip4:192.0.2.0/24 -all")
        .txt("_dmarc.example.test", "v=DMARC1; p=reject")
        .txt("softfail.test", "v=spf1 ip4:192.0.2.0/24 ~all")
        .txt("neutral.test", "v=spf1 ?all")
        .txt("broken.test", "v=spf1 ip4:not-an-address -all")
        .txt("quarantine.test", "v=spf1 -all")
        .txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine")
        .txt("monitor.test", "v=spf1 -all")
        .txt("_dmarc.monitor.test", "v=DMARC1; p=none")
        .txt("mail.sender.test", "v=spf1 ip4:192.0.2.10 -all")
        .a("2.0.0.127.bl.test", Ipv4Addr::new(127, 0, 0, 2))
        .txt("2.0.0.127.bl.test", "listed: see https://bl.test/127.0.0.2")
        .a("7.100.51.198.bl.test", Ipv4Addr::new(127, 0, 0, 4))
        .serve()
        .await;
    let verifier = Verifier::new(&[dns.address]).unwrap();
    (dns, verifier)
}

fn facts<'a>(ip: IpAddr, mail_from: &'a str) -> InboundFacts<'a> {
    InboundFacts {
        client_ip: ip,
        helo: "mail.sender.test",
        mail_from,
        authserv_id: AUTHSERV,
    }
}

fn message(from: &str, body: &str) -> Vec<u8> {
    format!(
        "Received: from mail.sender.test by mx.petrel.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
From: Sender <{from}>\r\nTo: rcpt@petrel.test\r\nSubject: a test\r\n\
 folded subject line\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\
Message-ID: <1@example.test>\r\nMIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}"
    )
    .into_bytes()
}

async fn verify(verifier: &Verifier, facts: &InboundFacts<'_>, message: &[u8]) -> Verdict {
    tokio::time::timeout(Duration::from_secs(60), verifier.verify(facts, message))
        .await
        .expect("verification finishes")
}

fn signed(signer: &Signer, domain: &str, message: &[u8]) -> Vec<u8> {
    let mut out = signer.sign(domain, message).unwrap().into_bytes();
    out.extend_from_slice(message);
    out
}

#[tokio::test]
async fn rsa_and_ed25519_signatures_verify_and_align_for_dmarc() {
    let (_dns, verifier) = world().await;
    let signer = Signer::new(vec![rsa_key(), ed_key()]);
    let plain = message("alice@example.test", "Grüße, 8-bit body.\r\n");
    let message = signed(&signer, "example.test", &plain);
    // From an address SPF fails: only the (aligned) DKIM signatures can pass DMARC.
    let verdict = verify(&verifier, &facts(BAD_IP, "alice@example.test"), &message).await;
    assert_eq!(verdict.dkim.len(), 2, "{verdict:?}");
    for (result, selector) in verdict.dkim.iter().zip(["rsa", "ed"]) {
        assert_eq!(result.outcome, DkimOutcome::Pass, "{verdict:?}");
        assert_eq!(
            (result.domain.as_str(), result.selector.as_str()),
            ("example.test", selector)
        );
    }
    assert_eq!(verdict.spf, SpfResult::Fail);
    assert_eq!(verdict.dmarc, DmarcResultSummary::Pass);
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::None);
    assert!(!verdict.temporary_error);
    let header = &verdict.header;
    assert!(
        header.starts_with("Authentication-Results: mx.petrel.test;\r\n\tspf=fail"),
        "{header}"
    );
    assert!(
        header.contains("dkim=pass header.d=example.test header.s=rsa"),
        "{header}"
    );
    assert!(
        header.contains("dkim=pass header.d=example.test header.s=ed"),
        "{header}"
    );
    assert!(
        header.contains("dmarc=pass header.from=example.test"),
        "{header}"
    );
    assert!(header.contains("arc=none"), "{header}");
    assert!(header.ends_with("\r\n") && !header[..header.len() - 2].contains("\r\n\r\n"));
}

#[tokio::test]
async fn pkcs8_rsa_key_is_the_same_key() {
    let (_dns, verifier) = world().await;
    let key = SigningKey::from_pem("example.test", "rsa", RSA_PKCS8).unwrap();
    assert_eq!(key.algorithm(), Algorithm::RsaSha256);
    assert_eq!(key.dns_record(), rsa_key().dns_record());
    assert_eq!(ed_key().algorithm(), Algorithm::Ed25519Sha256);
    let message = signed(
        &Signer::new(vec![key]),
        "EXAMPLE.test",
        &message("a@example.test", "x\r\n"),
    );
    let verdict = verify(&verifier, &facts(GOOD_IP, "a@example.test"), &message).await;
    assert_eq!(verdict.dkim[0].outcome, DkimOutcome::Pass, "{verdict:?}");
}

#[tokio::test]
async fn tampered_messages_fail() {
    let (_dns, verifier) = world().await;
    let signer = Signer::new(vec![rsa_key(), ed_key()]);
    let message = signed(
        &signer,
        "example.test",
        &message("alice@example.test", "Pay 10 EUR.\r\n"),
    );
    let facts = facts(BAD_IP, "alice@example.test");

    let body = String::from_utf8(message.clone())
        .unwrap()
        .replace("10 EUR", "1000 EUR");
    let verdict = verify(&verifier, &facts, body.as_bytes()).await;
    for result in &verdict.dkim {
        // mail-auth, like OpenDKIM, reports a body hash mismatch as neutral.
        assert!(
            matches!(result.outcome, DkimOutcome::Neutral | DkimOutcome::Fail),
            "{verdict:?}"
        );
    }
    assert_eq!(verdict.dmarc, DmarcResultSummary::Fail);
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::Reject);

    let subject = String::from_utf8(message.clone())
        .unwrap()
        .replace("a test", "A test");
    let verdict = verify(&verifier, &facts, subject.as_bytes()).await;
    assert!(
        verdict.dkim.iter().all(|d| d.outcome == DkimOutcome::Fail),
        "{verdict:?}"
    );
    assert!(verdict.header.contains("dkim=fail"), "{}", verdict.header);
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::Reject);

    // A second From: added in transit: From is over-signed, so the signature breaks.
    let forged = [b"From: ceo@example.test\r\n".as_slice(), &message].concat();
    let verdict = verify(&verifier, &facts, &forged).await;
    assert!(
        verdict.dkim.iter().all(|d| d.outcome != DkimOutcome::Pass),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn spf_results() {
    let (_dns, verifier) = world().await;
    let unsigned = message("someone@elsewhere.test", "hi\r\n");
    let cases = [
        (GOOD_IP, "bounce@example.test", SpfResult::Pass, "spf=pass"),
        (BAD_IP, "bounce@example.test", SpfResult::Fail, "spf=fail"),
        (
            BAD_IP,
            "x@softfail.test",
            SpfResult::SoftFail,
            "spf=softfail",
        ),
        (BAD_IP, "x@neutral.test", SpfResult::Neutral, "spf=neutral"),
        (BAD_IP, "x@nospf.test", SpfResult::None, "spf=none"),
        (
            GOOD_IP,
            "x@broken.test",
            SpfResult::PermError,
            "spf=permerror",
        ),
        // Null sender: the HELO identity is checked (RFC 7208 §2.4).
        (GOOD_IP, "", SpfResult::Pass, "smtp.helo=mail.sender.test"),
        (BAD_IP, "", SpfResult::Fail, "spf=fail"),
    ];
    for (ip, mail_from, expected, in_header) in cases {
        let verdict = verify(&verifier, &facts(ip, mail_from), &unsigned).await;
        assert_eq!(
            verdict.spf, expected,
            "{mail_from} from {ip}: {}",
            verdict.header
        );
        assert!(verdict.header.contains(in_header), "{}", verdict.header);
        assert!(!verdict.temporary_error, "{}", verdict.header);
    }
}

#[tokio::test]
async fn dns_failure_is_temporary_never_pass_or_reject() {
    // Nothing answers: every query times out (short timeout to keep the test quick).
    let verifier =
        Verifier::with_query_timeout(&[closed_port().await], Duration::from_millis(200)).unwrap();
    // A DMARC p=reject spoof that would be rejected if DNS answered.
    let message = message("ceo@example.test", "wire the money\r\n");
    let verdict = verify(&verifier, &facts(BAD_IP, "ceo@example.test"), &message).await;
    assert_eq!(verdict.spf, SpfResult::TempError, "{}", verdict.header);
    assert!(verdict.temporary_error);
    assert_eq!(
        verdict.dmarc,
        DmarcResultSummary::TempError,
        "{}",
        verdict.header
    );
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::None);
    assert!(
        verdict.header.contains("spf=temperror"),
        "{}",
        verdict.header
    );
    assert!(
        verdict.header.contains("dmarc=temperror"),
        "{}",
        verdict.header
    );

    // A signed message: the key look-up fails temporarily too.
    let signed = signed(&Signer::new(vec![rsa_key()]), "example.test", &message);
    let verdict = verify(&verifier, &facts(GOOD_IP, "ceo@example.test"), &signed).await;
    assert_eq!(
        verdict.dkim[0].outcome,
        DkimOutcome::TempError,
        "{}",
        verdict.header
    );
    assert!(
        verdict.header.contains("dkim=temperror"),
        "{}",
        verdict.header
    );
    assert_ne!(verdict.dmarc, DmarcResultSummary::Pass);
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::None);
}

#[tokio::test]
async fn servfail_is_temporary() {
    let (server, task) = servfail_server().await;
    let verifier = Verifier::new(&[server]).unwrap();
    let message = message("ceo@example.test", "wire the money\r\n");
    let signed = signed(&Signer::new(vec![ed_key()]), "example.test", &message);
    let verdict = verify(&verifier, &facts(BAD_IP, "ceo@example.test"), &signed).await;
    assert_eq!(verdict.spf, SpfResult::TempError, "{}", verdict.header);
    assert_eq!(
        verdict.dkim[0].outcome,
        DkimOutcome::TempError,
        "{}",
        verdict.header
    );
    assert_eq!(
        verdict.dmarc,
        DmarcResultSummary::TempError,
        "{}",
        verdict.header
    );
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::None);
    assert!(verdict.temporary_error);
    let error = dnsbl_listed(verifier.resolver(), BAD_IP, "bl.test").await;
    assert!(error.is_err(), "{error:?}");
    task.abort();
}

#[tokio::test]
async fn dmarc_policies() {
    let (_dns, verifier) = world().await;
    // The classic spoof: our From domain, someone else's envelope and server, no signature.
    let spoof = message("ceo@example.test", "wire the money\r\n");
    let verdict = verify(&verifier, &facts(BAD_IP, "attacker@evil.test"), &spoof).await;
    assert_eq!(
        verdict.dmarc,
        DmarcResultSummary::Fail,
        "{}",
        verdict.header
    );
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::Reject);
    assert!(verdict.header.contains("dmarc=fail"), "{}", verdict.header);
    assert!(
        verdict.header.contains("policy.dmarc=reject"),
        "{}",
        verdict.header
    );
    assert!(verdict.header.contains("dkim=none"), "{}", verdict.header);

    // SPF pass but not aligned (the envelope domain is not the From domain) still fails.
    let verdict = verify(&verifier, &facts(GOOD_IP, "x@mail.sender.test"), &spoof).await;
    assert_eq!(verdict.spf, SpfResult::Pass);
    assert_eq!(
        verdict.dmarc_policy,
        DmarcDisposition::Reject,
        "{}",
        verdict.header
    );

    // Aligned SPF pass: DMARC passes without a signature.
    let verdict = verify(&verifier, &facts(GOOD_IP, "bounce@example.test"), &spoof).await;
    assert_eq!(
        verdict.dmarc,
        DmarcResultSummary::Pass,
        "{}",
        verdict.header
    );
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::None);

    let quarantine = message("x@quarantine.test", "hi\r\n");
    let verdict = verify(&verifier, &facts(BAD_IP, "x@quarantine.test"), &quarantine).await;
    assert_eq!(
        verdict.dmarc_policy,
        DmarcDisposition::Quarantine,
        "{}",
        verdict.header
    );

    let monitor = message("x@monitor.test", "hi\r\n");
    let verdict = verify(&verifier, &facts(BAD_IP, "x@monitor.test"), &monitor).await;
    assert_eq!(
        verdict.dmarc,
        DmarcResultSummary::Fail,
        "{}",
        verdict.header
    );
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::None);

    let no_policy = message("x@neutral.test", "hi\r\n");
    let verdict = verify(&verifier, &facts(BAD_IP, "x@neutral.test"), &no_policy).await;
    assert_eq!(
        verdict.dmarc,
        DmarcResultSummary::None,
        "{}",
        verdict.header
    );
    assert_eq!(verdict.dmarc_policy, DmarcDisposition::None);
}

/// An intermediary (forwarder.example.test, signing as example.test with the Ed25519 key)
/// adds an ARC set; our verifier validates the chain, and a change after sealing breaks it.
#[tokio::test]
async fn arc_chain_is_validated() {
    use mail_auth::arc::ArcSealer;
    use mail_auth::common::crypto::Ed25519Key;
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::{AuthenticatedMessage, AuthenticationResults, MessageAuthenticator, SpfOutput};
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use rustls_pki_types::pem::PemObject;

    let (_dns, verifier) = world().await;
    let original = message("someone@elsewhere.test", "forwarded\r\n");
    let parsed = AuthenticatedMessage::parse(&original).unwrap();
    let authenticator = MessageAuthenticator(verifier.resolver().clone());
    let arc_output = authenticator.verify_arc(&parsed).await;
    let results = AuthenticationResults::new("forwarder.example.test").with_spf_ehlo_result(
        &SpfOutput::default(),
        GOOD_IP,
        "mail.sender.test",
    );
    let der = PrivatePkcs8KeyDer::from_pem_slice(ED25519).unwrap();
    let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der()).unwrap();
    let set = ArcSealer::from_key(key)
        .domain("example.test")
        .selector("ed")
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .seal(&parsed, &results, &arc_output)
        .unwrap();
    let sealed = [set.to_header().as_bytes(), &original].concat();

    let verdict = verify(&verifier, &facts(BAD_IP, "x@elsewhere.test"), &sealed).await;
    assert_eq!(verdict.arc, mta_auth::ArcResult::Pass, "{}", verdict.header);
    assert!(verdict.header.contains("arc=pass"), "{}", verdict.header);

    let tampered = String::from_utf8(sealed)
        .unwrap()
        .replace("forwarded", "changed");
    let verdict = verify(
        &verifier,
        &facts(BAD_IP, "x@elsewhere.test"),
        tampered.as_bytes(),
    )
    .await;
    assert_ne!(verdict.arc, mta_auth::ArcResult::Pass, "{}", verdict.header);
}

#[tokio::test]
async fn dnsbl() {
    let (_dns, verifier) = world().await;
    let resolver = verifier.resolver();
    let listed = dnsbl_listed(resolver, "127.0.0.2".parse().unwrap(), "bl.test")
        .await
        .unwrap()
        .expect("listed");
    assert_eq!(listed.address, Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(
        listed.text.as_deref(),
        Some("listed: see https://bl.test/127.0.0.2")
    );
    assert_eq!(listed.query, "2.0.0.127.bl.test.");
    assert_eq!(
        listed.to_string(),
        "127.0.0.2 (listed: see https://bl.test/127.0.0.2)"
    );

    let listed = dnsbl_listed(resolver, BAD_IP, "bl.test.")
        .await
        .unwrap()
        .expect("listed");
    assert_eq!(
        (listed.address, listed.text),
        (Ipv4Addr::new(127, 0, 0, 4), None)
    );

    assert_eq!(
        dnsbl_listed(resolver, GOOD_IP, "bl.test").await.unwrap(),
        None
    );
    assert_eq!(
        dnsbl_listed(resolver, "2001:db8::1".parse().unwrap(), "bl.test")
            .await
            .unwrap(),
        None
    );

    let down =
        Verifier::with_query_timeout(&[closed_port().await], Duration::from_millis(200)).unwrap();
    let error = dnsbl_listed(down.resolver(), BAD_IP, "bl.test")
        .await
        .unwrap_err();
    assert_eq!(error.query, "7.100.51.198.bl.test.");
}

#[test]
fn forged_authentication_results_are_removed() {
    let message = b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
Authentication-Results: MX.Petrel.Test; spf=pass smtp.mailfrom=ceo@example.test\r\n\
Authentication-Results: other.example; dkim=pass header.d=other.example\r\n\
authentication-results: (forged) mx.petrel.test 1;\r\n\tdkim=pass\r\n\theader.d=example.test\r\n\
Authentication-Results:\r\n mx.petrel.test; dmarc=pass\r\n\
Authentication-Results: mx.petrel.test.evil; none\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.petrel.test; body text stays\r\n";
    let stripped = strip_forged_authentication_results(message, "mx.petrel.test");
    assert_eq!(
        String::from_utf8(stripped).unwrap(),
        "Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
Authentication-Results: other.example; dkim=pass header.d=other.example\r\n\
Authentication-Results: mx.petrel.test.evil; none\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.petrel.test; body text stays\r\n"
    );
    // Nothing to remove: byte-identical.
    let clean = b"Subject: x\r\n\r\nbody";
    assert_eq!(
        strip_forged_authentication_results(clean, "mx.petrel.test"),
        clean
    );
}

#[test]
fn signing_errors() {
    let signer = Signer::new(vec![rsa_key()]);
    assert!(signer.signs_for("Example.Test."));
    assert!(!signer.signs_for("other.test"));
    assert!(matches!(
        signer.sign("other.test", b"From: a@other.test\r\n\r\nx"),
        Err(Error::NoKeyForDomain(d)) if d == "other.test"
    ));
    assert!(matches!(
        signer.sign("example.test", b"X-Only: 1\r\n\r\nx"),
        Err(Error::Sign { .. })
    ));
    assert!(matches!(
        SigningKey::from_pem(
            "example.test",
            "s",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        ),
        Err(Error::Key { .. })
    ));
    assert!(matches!(
        SigningKey::from_pem("example.test", "s", b"not pem"),
        Err(Error::Key { .. })
    ));
    assert!(matches!(
        SigningKey::from_pem_file("example.test", "s", "/nonexistent/key.pem"),
        Err(Error::KeyFile { .. })
    ));
    // Key material never shows in Debug output.
    let debug = format!("{:?}", rsa_key());
    assert!(
        debug.contains("rsa") && debug.contains("RsaSha256") && debug.len() < 120,
        "{debug}"
    );
}
