//! The corpus (`classify_corpus.tsv`): every reply gets its expected class and
//! disposition. Lines are `reply<TAB>class<TAB>disposition`; `#` starts a comment.

use super::*;
use crate::delivery::outcome;
use crate::queue::Status;

const CORPUS: &str = include_str!("../classify_corpus.tsv");

/// `550 5.1.1 text` as a peer sends it: the reply code, the enhanced code when the text
/// starts with one (as `smtp-proto` reads it), the rest.
fn reply(line: &str) -> mta_client::Reply {
    let (code, rest) = line.split_at(3);
    let rest = rest.trim_start_matches([' ', '-']);
    let enhanced = rest.split_once(' ').and_then(|(word, after)| {
        let parts: Vec<u8> = word.split('.').filter_map(|p| p.parse().ok()).collect();
        (parts.len() == 3 && word.split('.').count() == 3 && matches!(parts[0], 2 | 4 | 5))
            .then(|| ([parts[0], parts[1], parts[2]], after))
    });
    mta_client::Reply {
        code: code.parse().expect("reply code"),
        enhanced: enhanced.map(|(e, _)| e),
        text: enhanced.map_or(rest, |(_, after)| after).to_owned(),
    }
}

fn corpus() -> Vec<(&'static str, &'static str, &'static str)> {
    CORPUS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            assert_eq!(fields.len(), 3, "corpus line: {l}");
            (fields[0], fields[1], fields[2])
        })
        .collect()
}

#[test]
fn the_corpus_is_classified_as_written() {
    let corpus = corpus();
    assert!(corpus.len() >= 200, "{} replies", corpus.len());
    let mut wrong = Vec::new();
    for (line, class, disposition) in &corpus {
        let status = outcome::from_reply(&reply(line));
        let verdict = verdict(&status).expect("a negative reply has a verdict");
        let got = (verdict.class.as_str(), verdict.disposition.as_str());
        if got != (*class, *disposition) {
            wrong.push(format!(
                "{line}\n    want {class} {disposition}, got {} {}",
                got.0, got.1
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {}:\n{}",
        wrong.len(),
        corpus.len(),
        wrong.join("\n")
    );
}

#[test]
fn every_peer_class_appears_in_the_corpus() {
    let corpus = corpus();
    for class in Class::ALL {
        // `local` is this MTA's own trouble: no peer reply says it.
        if class == Class::Local {
            continue;
        }
        assert!(
            corpus.iter().any(|(_, c, _)| *c == class.as_str()),
            "no reply of class {class} in the corpus"
        );
    }
}

/// RFC 5321 §4.2.1: a 4xx is temporary, even when its text says the user is unknown; a
/// hard bad mailbox (5xx, or an enhanced code of class 5) is never retried.
#[test]
fn only_a_hard_bad_mailbox_overrides_a_4xx() {
    for (line, failed) in [
        (
            "450 4.1.1 <u@x.test>: Recipient address rejected: User unknown",
            false,
        ),
        ("450 User unknown", false),
        (
            "450 5.1.1 <u@x.test>: Recipient address rejected: User unknown",
            true,
        ),
        ("451 5.1.2 Domain not found", true),
        ("452 5.2.2 Mailbox full", false),
        ("421 4.7.0 Too many connections", false),
        ("550 5.1.1 User unknown", true),
    ] {
        let status = outcome::from_reply(&reply(line));
        assert_eq!(
            matches!(status, Status::Failed(_)),
            failed,
            "{line}: {status:?}"
        );
    }
}

#[test]
fn throttles_are_visible_to_delivery() {
    let status = outcome::from_reply(&reply("421 4.7.0 Too many connections from your IP"));
    assert!(verdict(&status).is_some_and(|v| v.is_throttle()));
    let status = outcome::from_reply(&reply("451 4.7.1 Greylisted, try again in 5 minutes"));
    assert!(verdict(&status).is_some_and(|v| !v.is_throttle()));
    let status = outcome::from_reply(&reply("250 2.0.0 Ok"));
    assert_eq!(verdict(&status), None);
}

#[test]
fn class_names_are_distinct() {
    let names: std::collections::BTreeSet<&str> = Class::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(names.len(), Class::ALL.len());
}
