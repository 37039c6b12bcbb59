//! Golden tests: each notice is compared with a committed `.eml` under
//! `mta/tests/golden/dsn/`; on mismatch the actual output is written next to it as
//! `<name>.actual` for review (set `PETREL_BLESS=1` to accept it).

use super::*;
use crate::queue::{Class, Diagnostic, DsnNotify};

fn envelope() -> Envelope {
    Envelope {
        recipients: vec![
            Recipient {
                address: "bob@remote.test".into(),
                notify: None,
                orcpt: Some("Bob@remote.test".into()),
                status: Status::Failed(Diagnostic {
                    code: Some(550),
                    enhanced: Some([5, 1, 1]),
                    text: "<bob@remote.test>: user unknown".into(),
                    class: Some(Class::BadMailbox),
                }),
                remote_mta: Some("mx1.remote.test".into()),
            },
            Recipient {
                address: "carol@remote.test".into(),
                notify: Some(DsnNotify {
                    success: true,
                    failure: true,
                    delay: false,
                }),
                orcpt: None,
                status: Status::Delivered(Diagnostic {
                    code: Some(250),
                    enhanced: Some([2, 0, 0]),
                    text: "ok".into(),
                    class: None,
                }),
                remote_mta: Some("mx1.remote.test".into()),
            },
            Recipient {
                address: "dave@slow.test".into(),
                notify: None,
                orcpt: None,
                status: Status::Deferred(Diagnostic {
                    code: Some(451),
                    enhanced: Some([4, 7, 1]),
                    text: "greylisted".into(),
                    class: None,
                }),
                remote_mta: None,
            },
        ],
        dsn_envid: Some("ENV-42".into()),
        received_at: 1_795_435_200,
        attempts: 1,
        ..Envelope::new(
            "alice@sender.test",
            "192.0.2.1".parse().expect("ip"),
            "client.test",
        )
    }
}

const ORIGINAL: &[u8] =
    b"Received: from x\r\nSubject: hello\r\nFrom: alice@sender.test\r\n\r\nbody line\r\n";

fn golden(name: &str, actual: &[u8]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dsn");
    let expected_path = dir.join(format!("{name}.eml"));
    let actual_path = dir.join(format!("{name}.eml.actual"));
    if std::env::var_os("PETREL_BLESS").is_some() {
        std::fs::write(&expected_path, actual).expect("bless");
    }
    let expected = std::fs::read(&expected_path).unwrap_or_default();
    if expected != actual {
        std::fs::write(&actual_path, actual).expect("write .actual");
        panic!(
            "{name}: notice differs from {}; see {}",
            expected_path.display(),
            actual_path.display()
        );
    }
    let _ = std::fs::remove_file(actual_path);
}

fn notice(kind: Kind, env: &Envelope) -> Vec<u8> {
    let mut config = MtaConfig::embedded_default();
    config.hostname = "mx.petrel.test".into();
    let reported: Vec<&Recipient> = env.recipients.iter().filter(|r| wants(r, kind)).collect();
    build(
        &config,
        env,
        &reported,
        kind,
        ORIGINAL,
        QueueId(0xABCDEF),
        1_795_440_000,
    )
}

#[test]
fn failure_notice() {
    let out = notice(Kind::Failure, &envelope());
    golden("failure", &out);
}

#[test]
fn delay_notice_headers_only() {
    let mut env = envelope();
    env.dsn_ret = Some(DsnReturn::Headers);
    golden("delay-headers-only", &notice(Kind::Delay, &env));
}

#[test]
fn success_notice_only_for_notify_success() {
    let out = notice(Kind::Success, &envelope());
    let text = String::from_utf8(out.clone()).expect("utf8");
    assert!(text.contains("Final-Recipient: rfc822; carol@remote.test"));
    assert!(!text.contains("Final-Recipient: rfc822; bob@remote.test"));
    golden("success", &out);
}

#[test]
fn status_codes() {
    let cases = [
        (
            Status::Failed(Diagnostic {
                code: Some(550),
                enhanced: Some([5, 1, 1]),
                text: "unknown".into(),
                class: None,
            }),
            "5.1.1",
        ),
        (
            Status::Failed(Diagnostic {
                code: Some(550),
                enhanced: None,
                text: "no enhanced code".into(),
                class: None,
            }),
            "5.0.0",
        ),
        (
            Status::Deferred(Diagnostic {
                code: Some(451),
                enhanced: Some([4, 7, 1]),
                text: "later".into(),
                class: None,
            }),
            "4.7.1",
        ),
        (
            Status::Failed(Diagnostic {
                code: None,
                enhanced: Some([5, 4, 7]),
                text: "message expired".into(),
                class: None,
            }),
            "5.4.7",
        ),
        (
            Status::Delivered(Diagnostic {
                code: Some(250),
                enhanced: None,
                text: "ok".into(),
                class: None,
            }),
            "2.0.0",
        ),
    ];
    for (status, code) in cases {
        assert_eq!(status_code(&status), code, "{status:?}");
    }
}
