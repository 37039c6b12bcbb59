//! STARTTLS in every mode against a server whose certificate comes from a
//! throwaway CA (rcgen), plus AUTH over TLS and a STARTTLS injection attempt.

use mta_client::{
    ClientError, Connection, Credentials, OutboundMessage, OutboundRecipient, TlsFailure, TlsMode,
};

use crate::server::{self, Script, expired_pki, pki};
use crate::{config, tcp};

const MX: &str = "mx.example.test";

fn tls_script(pki: &server::Pki) -> Script {
    let mut script = Script::esmtp().keywords(&["PIPELINING", "8BITMIME", "STARTTLS"]);
    script.tls = Some(pki.server_config.clone());
    script
}

#[tokio::test]
async fn opportunistic_upgrades_and_says_ehlo_again() {
    let pki = pki(&[MX]);
    let (addr, log) = server::start(tls_script(&pki)).await;
    // Opportunistic accepts a certificate from an unknown CA.
    let mut conn = Connection::connect(&tcp(addr), MX, &config())
        .await
        .unwrap();
    assert!(conn.tls_active());
    assert_eq!(conn.tls_version().as_deref(), Some("TLSv1.3"));
    // Capabilities are from the EHLO after TLS (the server drops STARTTLS there).
    assert!(!conn.capabilities().starttls);
    assert!(conn.capabilities().pipelining);
    let to = [OutboundRecipient::new("a@example.org")];
    let replies = conn
        .send(&OutboundMessage::new("s@example.net", &to, b"hello\r\n"))
        .await
        .unwrap();
    assert_eq!(replies[0].code, 250);
    conn.quit().await;
    let log = log.lock().unwrap();
    assert_eq!(log.tls_sessions, 1);
    assert_eq!(log.verbs()[..3], ["EHLO", "STARTTLS", "EHLO"]);
    assert_eq!(log.messages, vec![b"hello\r\n".to_vec()]);
}

#[tokio::test]
async fn opportunistic_stays_plain_without_starttls_and_required_refuses() {
    let (addr, log) = server::start(Script::esmtp()).await;
    let conn = Connection::connect(&tcp(addr), MX, &config())
        .await
        .unwrap();
    assert!(!conn.tls_active());
    assert_eq!(conn.tls_version(), None);
    conn.quit().await;

    for mode in [TlsMode::Required, TlsMode::Verified] {
        let mut config = config();
        config.tls = mode;
        assert!(matches!(
            Connection::connect(&tcp(addr), MX, &config).await,
            Err(ClientError::TlsUnavailable)
        ));
    }
    assert!(!log.lock().unwrap().verbs().contains(&"MAIL".to_string()));
}

#[tokio::test]
async fn none_ignores_offered_starttls() {
    let pki = pki(&[MX]);
    let (addr, log) = server::start(tls_script(&pki)).await;
    let mut config = config();
    config.tls = TlsMode::None;
    let conn = Connection::connect(&tcp(addr), MX, &config).await.unwrap();
    assert!(!conn.tls_active());
    assert!(conn.capabilities().starttls);
    conn.quit().await;
    assert_eq!(log.lock().unwrap().tls_sessions, 0);
}

#[tokio::test]
async fn required_accepts_any_certificate() {
    let pki = pki(&["some.other.name"]);
    let (addr, _) = server::start(tls_script(&pki)).await;
    let mut config = config();
    config.tls = TlsMode::Required;
    let conn = Connection::connect(&tcp(addr), MX, &config).await.unwrap();
    assert!(conn.tls_active());
    conn.quit().await;
}

#[tokio::test]
async fn verified_with_the_ca_and_the_right_name() {
    let pki = pki(&[MX]);
    let (addr, _) = server::start(tls_script(&pki)).await;
    let mut config = config();
    config.tls = TlsMode::Verified;
    config.extra_roots_pem = Some(pki.ca_pem.clone().into_bytes());
    let conn = Connection::connect(&tcp(addr), MX, &config).await.unwrap();
    assert!(conn.tls_active());
    conn.quit().await;
}

#[tokio::test]
async fn verified_fails_on_a_name_mismatch() {
    let pki = pki(&[MX]);
    let (addr, _) = server::start(tls_script(&pki)).await;
    let mut config = config();
    config.tls = TlsMode::Verified;
    config.extra_roots_pem = Some(pki.ca_pem.clone().into_bytes());
    match Connection::connect(&tcp(addr), "mx2.example.test", &config).await {
        Err(ClientError::Tls { cause, detail }) => {
            assert!(detail.contains("not valid for name"), "{detail}");
            assert_eq!(cause, TlsFailure::HostMismatch);
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn verified_fails_on_an_expired_certificate() {
    let pki = expired_pki(&[MX]);
    let (addr, _) = server::start(tls_script(&pki)).await;
    let mut config = config();
    config.tls = TlsMode::Verified;
    config.extra_roots_pem = Some(pki.ca_pem.clone().into_bytes());
    match Connection::connect(&tcp(addr), MX, &config).await {
        Err(ClientError::Tls { cause, .. }) => assert_eq!(cause, TlsFailure::Expired),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn verified_fails_on_an_unknown_ca() {
    let pki = pki(&[MX]);
    let (addr, _) = server::start(tls_script(&pki)).await;
    let mut config = config();
    config.tls = TlsMode::Verified;
    match Connection::connect(&tcp(addr), MX, &config).await {
        Err(ClientError::Tls { cause, detail }) => {
            assert!(detail.contains("UnknownIssuer"), "{detail}");
            assert_eq!(cause, TlsFailure::NotTrusted);
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_extra_roots_are_a_tls_error() {
    let pki = pki(&[MX]);
    let (addr, _) = server::start(tls_script(&pki)).await;
    let mut config = config();
    config.tls = TlsMode::Verified;
    config.extra_roots_pem = Some(b"not a certificate".to_vec());
    assert!(matches!(
        Connection::connect(&tcp(addr), MX, &config).await,
        Err(ClientError::Tls {
            cause: TlsFailure::Setup,
            ..
        })
    ));
}

#[tokio::test]
async fn reply_injected_before_the_handshake_is_refused() {
    let pki = pki(&[MX]);
    let mut script = tls_script(&pki);
    script.inject_after_starttls = Some("250-injected\r\n250 AUTH PLAIN\r\n".into());
    let (addr, _) = server::start(script).await;
    assert!(matches!(
        Connection::connect(&tcp(addr), MX, &config()).await,
        Err(ClientError::Protocol {
            phase: mta_client::Phase::StartTls,
            ..
        })
    ));
}

#[tokio::test]
async fn auth_plain_and_login_over_tls() {
    let pki = pki(&[MX]);
    for mechanism in ["AUTH PLAIN LOGIN", "AUTH LOGIN"] {
        let mut script = tls_script(&pki);
        script.ehlo_after_tls = Some(vec!["PIPELINING".into(), mechanism.into()]);
        script.credentials = Some(("relay-user".into(), "s3cret".into()));
        let (addr, log) = server::start(script).await;
        let mut config = config();
        config.tls = TlsMode::Required;
        config.auth = Some(Credentials {
            username: "relay-user".into(),
            password: "s3cret".into(),
        });
        let conn = Connection::connect(&tcp(addr), MX, &config).await.unwrap();
        conn.quit().await;
        let log = log.lock().unwrap();
        let auth = log.commands.iter().find(|c| c.starts_with("AUTH")).unwrap();
        let expected = if mechanism.contains("PLAIN") {
            "AUTH PLAIN "
        } else {
            "AUTH LOGIN"
        };
        assert!(auth.starts_with(expected), "{auth}");
        // Nothing about AUTH was said before TLS.
        let starttls = log.verbs().iter().position(|v| v == "STARTTLS").unwrap();
        let first_auth = log.verbs().iter().position(|v| v == "AUTH").unwrap();
        assert!(starttls < first_auth);
    }
}
