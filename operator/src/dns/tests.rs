//! DNS guidance tests: the records for the example domain, the zone fragment, and the live
//! check against an in-process authoritative server on loopback.

use super::*;
use std::path::PathBuf;

/// The example MailDomain for example.com.
fn example_com(world: &World) -> crds::mail_domain::MailDomain {
    world
        .domains
        .iter()
        .find(|d| d.spec.domain == "example.com")
        .expect("example.com in manifests/examples")
        .clone()
}

fn example_world() -> World {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    crate::input::load(&[repo.join("manifests/examples")], "default").expect("examples")
}

#[test]
fn guidance_lists_every_record_the_example_domain_needs() {
    let mut world = example_world().in_namespace("mail");
    let desired = crate::render::render(&world, &mut crate::keys::FixedKeys).expect("render");
    for o in desired.objects {
        if let crate::render::Object::Secret(s) = o {
            world.secrets.push(s);
        }
    }
    let domain = example_com(&world);
    let g = guidance(&domain, &world, &["192.0.2.10".parse().expect("ip")]);
    let lines: Vec<String> = g
        .records
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.type_, r.value))
        .collect();
    assert_eq!(
        lines,
        vec![
            "example.com. MX 10 mx.example.com.",
            "example.com. TXT v=spf1 mx ip4:192.0.2.0/24 -all",
            "petrel-a._domainkey.example.com. TXT v=DKIM1; k=ed25519; p=dGVzdC1lZDI1NTE5LXB1YmxpYy1rZXktMzItYnl0ZXM=",
            "_dmarc.example.com. TXT v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@example.com",
            "_mta-sts.example.com. TXT v=STSv1; id=e7ef2023328f741b60fc",
            "_smtp._tls.example.com. TXT v=TLSRPTv1; rua=mailto:tls-reports@example.com",
            "10.2.0.192.in-addr.arpa. PTR mx.example.com.",
            "10.2.0.192.in-addr.arpa. PTR smtp.example.com.",
        ]
    );
    assert_eq!(
        g.mta_sts_policy.as_deref(),
        Some("version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 604800\n")
    );
    let zone = zone_fragment(&domain, &g);
    assert!(zone.contains("_dmarc.example.com. 3600 IN TXT \"v=DMARC1; p=quarantine;"));
    assert!(zone.contains(";   mode: testing"));
}

#[test]
fn a_dkim_key_without_its_secret_is_listed_as_pending() {
    let world = example_world().in_namespace("mail");
    let g = guidance(&example_com(&world), &world, &[]);
    assert_eq!(
        g.pending_dkim,
        vec!["petrel-a._domainkey.example.com.".to_owned()]
    );
    assert!(g.records.iter().all(|r| !r.purpose.starts_with("DKIM")));
}

#[test]
fn long_txt_values_are_split_into_255_byte_strings() {
    let long = "p=".to_owned() + &"A".repeat(400);
    let quoted = quote_txt(&long);
    assert_eq!(quoted.matches('"').count(), 4);
}

#[test]
fn reverse_names() {
    assert_eq!(
        reverse_name("192.0.2.1".parse().expect("ip")),
        "1.2.0.192.in-addr.arpa."
    );
    assert!(
        reverse_name("2001:db8::1".parse().expect("ip")).ends_with(".8.b.d.0.1.0.0.2.ip6.arpa.")
    );
}
