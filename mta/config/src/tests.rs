use super::*;

#[test]
fn embedded_default_is_valid_and_round_trips() {
    let config = MtaConfig::embedded_default();
    config.validate().expect("embedded default validates");
    let yaml = config.to_yaml();
    let back = MtaConfig::from_yaml(&yaml).expect("serialised default parses");
    assert_eq!(back, config);
}

#[test]
fn example_config_in_repo_is_valid() {
    let text = include_str!("../../../manifests/mta-config.example.yaml");
    let config = MtaConfig::from_yaml(text).expect("example config validates");
    assert_eq!(config.hostname, "mx.example.test");
    assert_eq!(config.listeners.len(), 1);
    assert!(config.local_domain("EXAMPLE.test").is_some());
}

#[test]
fn unknown_key_is_named() {
    let err = MtaConfig::from_yaml("hostname: a.test\nsmtpd:\n  max_recipents: 5\n")
        .expect_err("typo must be refused");
    let text = err.to_string();
    assert!(text.contains("max_recipents"), "{text}");
}

#[test]
fn bad_duration_is_explained() {
    let err = MtaConfig::from_yaml("smtpd:\n  command_timeout: soon\n").expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("invalid duration"), "{text}");
}

/// The keys named by the semantic problems `yaml` has (it must parse).
fn problem_keys(yaml: &str) -> Vec<String> {
    let err = MtaConfig::from_yaml(yaml).expect_err("refused");
    let ConfigError::Invalid(problems) = err else {
        panic!("expected semantic problems, got {err}");
    };
    problems.into_iter().map(|p| p.key).collect()
}

#[test]
fn semantic_problems_are_all_listed_with_keys() {
    let yaml = "\
hostname: 'bad host'
smtpd:
  max_recipients: 0
local_domains:
  - name: a.test
    delivery: { maildir: { root: /tmp/a } }
  - name: A.test
    delivery: { maildir: { root: /tmp/b } }
    recipients: ['../etc']
";
    assert_eq!(
        problem_keys(yaml),
        [
            "hostname",
            "smtpd.max_recipients",
            "local_domains[1].name",
            "local_domains[1].recipients[0]"
        ]
    );
}

#[test]
fn alias_catch_all_and_relay_problems_name_their_keys() {
    let yaml = "\
local_domains:
  - name: a.test
    delivery: { relay: { host: 'no-port' } }
    aliases:
      'sales+x': [ok@a.test]
      empty: []
      team: ['not an address', 'x@bad_domain']
    catch_all: nobody@a.test
";
    assert_eq!(
        problem_keys(yaml),
        [
            "local_domains[0].delivery.relay.host",
            "local_domains[0].aliases.empty",
            "local_domains[0].aliases.sales+x",
            "local_domains[0].aliases.team[0]",
            "local_domains[0].aliases.team[1]",
            "local_domains[0].catch_all"
        ]
    );
}

#[test]
fn smarthost_auth_needs_exactly_one_user_name() {
    let route = |auth: &str| {
        format!(
            "routes:\n  - domain: '*'\n    smarthost: relay.test:587\n    auth: {{{auth}password_file: /p}}\n"
        )
    };
    assert!(MtaConfig::from_yaml(&route("username: u, ")).is_ok());
    assert!(MtaConfig::from_yaml(&route("username_file: /u, ")).is_ok());
    for bad in ["", "username: u, username_file: /u, "] {
        let err = MtaConfig::from_yaml(&route(bad)).expect_err("refused");
        assert!(err.to_string().contains("routes[0].auth"), "{err}");
    }
}

#[test]
fn domain_name_table() {
    for (name, ok) in [
        ("example.test", true),
        ("a", true),
        ("xn--bcher-kva.test", true),
        ("", false),
        ("a..b", false),
        ("-a.test", false),
        ("a.test.", false),
        ("a b", false),
        ("a_b.test", false),
    ] {
        assert_eq!(validate::is_domain_name(name), ok, "{name:?}");
    }
}

#[test]
fn proxy_protocol_is_off_by_default_and_left_out_when_off() {
    let config = MtaConfig::from_yaml("listeners:\n  - address: 127.0.0.1:25\n").expect("valid");
    assert!(!config.listeners[0].proxy_protocol);
    assert_eq!(config.listeners[0].proxy_trusted_networks, None);
    assert!(!config.to_yaml().contains("proxy_protocol"));
}

#[test]
fn proxy_protocol_settings_parse_and_round_trip() {
    let yaml = "\
listeners:
  - address: 0.0.0.0:10025
    proxy_protocol: true
    proxy_trusted_networks: [10.0.0.0/8, 'fd00::/8']
smtpd:
  proxy_header_timeout: 500ms
";
    let config = MtaConfig::from_yaml(yaml).expect("valid");
    let listener = &config.listeners[0];
    assert!(listener.proxy_protocol);
    assert_eq!(
        listener.proxy_trusted_networks.as_deref().map(<[_]>::len),
        Some(2)
    );
    assert_eq!(
        config.smtpd.proxy_header_timeout,
        Duration::from_millis(500)
    );
    let back = MtaConfig::from_yaml(&config.to_yaml()).expect("round trip");
    assert_eq!(back, config);
}

#[test]
fn proxy_settings_problems_name_their_keys() {
    let yaml = "\
listeners:
  - address: 127.0.0.1:25
    proxy_trusted_networks: [10.0.0.0/8]
  - address: 127.0.0.1:26
    proxy_protocol: true
    proxy_trusted_networks: []
smtpd:
  proxy_header_timeout: 0s
";
    assert_eq!(
        problem_keys(yaml),
        [
            "listeners[0].proxy_trusted_networks",
            "listeners[1].proxy_trusted_networks",
            "smtpd.proxy_header_timeout"
        ]
    );
}

#[test]
fn proxy_trusted_networks_must_be_networks() {
    let yaml = "listeners:\n  - address: 127.0.0.1:25\n    proxy_protocol: true\n    proxy_trusted_networks: [haproxy]\n";
    let text = MtaConfig::from_yaml(yaml).expect_err("refused").to_string();
    assert!(text.contains("proxy_trusted_networks"), "{text}");
}

#[test]
fn admin_token_file_defaults_beside_the_spool() {
    let laptop = MtaConfig::embedded_default();
    assert_eq!(
        laptop.admin_token_file(),
        std::path::Path::new("./petrel-data/admin.token")
    );
    let pod = MtaConfig::from_yaml("spool:\n  path: /var/lib/petrel/spool\n").expect("valid");
    assert_eq!(
        pod.admin_token_file(),
        std::path::Path::new("/var/lib/petrel/admin.token")
    );
    let set = MtaConfig::from_yaml("admin:\n  token_file: /run/petrel/token\n").expect("valid");
    assert_eq!(
        set.admin_token_file(),
        std::path::Path::new("/run/petrel/token")
    );
    assert_eq!(
        problem_keys("admin:\n  token_file: \"\"\n"),
        ["admin.token_file"]
    );
}

/// Issue 13, item 6: the slow-client limits are checked, and appear in the serialised form
/// only when they differ from their defaults.
#[test]
fn slow_client_limits_are_validated_and_rendered_when_set() {
    let keys = problem_keys(
        "smtpd:\n  transaction_timeout: 0s\n  min_data_rate: 0\n  pressure_idle_timeout: 0s\n",
    );
    assert_eq!(
        keys,
        [
            "smtpd.transaction_timeout",
            "smtpd.min_data_rate",
            "smtpd.pressure_idle_timeout"
        ]
    );
    let default = MtaConfig::default().to_yaml();
    assert!(!default.contains("min_data_rate"), "{default}");
    let set = MtaConfig::from_yaml(
        "smtpd:\n  transaction_timeout: 2m\n  min_data_rate: 100\n  pressure_idle_timeout: 1s\n",
    )
    .expect("valid");
    assert_eq!(set.smtpd.min_data_rate, 100);
    assert_eq!(
        MtaConfig::from_yaml(&set.to_yaml()).expect("round trip"),
        set
    );
}

/// Issue 13, item 11: who is spared the per-IP limits.
#[test]
fn limits_spare_the_exempt_networks() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    let laptop = MtaConfig::embedded_default();
    assert!(laptop.limits_exempt(ip("127.0.0.1")));
    assert!(laptop.limits_exempt(ip("::1")));
    assert!(!laptop.limits_exempt(ip("192.0.2.1")));
    assert!(
        laptop.relay.client_networks.is_empty(),
        "exempt, not a relay"
    );
    let relay = MtaConfig::from_yaml("relay:\n  client_networks: [10.0.0.0/8]\n").expect("valid");
    assert!(
        relay.limits_exempt(ip("10.1.2.3")),
        "default: the relay networks"
    );
    assert!(!relay.limits_exempt(ip("127.0.0.1")));
    let none = MtaConfig::from_yaml(
        "relay:\n  client_networks: [10.0.0.0/8]\nsmtpd:\n  limit_exempt_networks: []\n",
    )
    .expect("valid");
    assert!(!none.limits_exempt(ip("10.1.2.3")));
    assert!(!MtaConfig::default().limits_exempt(ip("127.0.0.1")));
}

/// Issue 13, item 10: two listeners that cannot both be bound are refused: the same
/// address, or a wildcard that covers the other on the same port.
#[test]
fn colliding_listeners_table() {
    use crate::validate::sockets_collide;
    let cases = [
        ("127.0.0.1:25", "127.0.0.1:25", true),
        ("0.0.0.0:25", "127.0.0.1:25", true),
        ("127.0.0.1:25", "0.0.0.0:25", true),
        ("[::]:25", "0.0.0.0:25", true),
        ("[::]:25", "192.0.2.1:25", true),
        ("[::]:25", "[::1]:25", true),
        ("0.0.0.0:25", "[::1]:25", false),
        ("127.0.0.1:25", "127.0.0.2:25", false),
        ("0.0.0.0:25", "0.0.0.0:587", false),
        ("127.0.0.1:0", "127.0.0.1:0", false),
    ];
    for (a, b, collide) in cases {
        let (a, b) = (a.parse().expect("a"), b.parse().expect("b"));
        assert_eq!(sockets_collide(a, b), collide, "{a} {b}");
        let yaml = format!("listeners:\n  - address: \"{a}\"\n  - address: \"{b}\"\n");
        let result = MtaConfig::from_yaml(&yaml);
        match collide {
            true => assert_eq!(problem_keys(&yaml), ["listeners[1].address"], "{a} {b}"),
            false => assert!(result.is_ok(), "{a} {b}: {result:?}"),
        }
    }
}

/// Issue 16, limits shared by the fleet: `smtpd.rate_limits.redis` is optional, checked,
/// and absent from the serialised form when unset.
#[test]
fn fleet_redis_limits_are_validated() {
    let default = MtaConfig::default().to_yaml();
    assert!(!default.contains("redis"), "{default}");
    let set = MtaConfig::from_yaml(
        "smtpd:\n  rate_limits:\n    redis:\n      url: redis://127.0.0.1:6379/0\n      fleet_size: 3\n",
    )
    .expect("valid");
    let redis = set.smtpd.rate_limits.redis.clone().expect("set");
    assert_eq!(redis.timeout, std::time::Duration::from_millis(50));
    assert_eq!(redis.fleet_size, 3);
    assert_eq!(
        MtaConfig::from_yaml(&set.to_yaml()).expect("round trip"),
        set
    );
    let yaml = |url: &str, timeout: &str, fleet: u32| {
        format!(
            "smtpd:\n  rate_limits:\n    redis:\n      url: {url:?}\n      timeout: {timeout}\n      fleet_size: {fleet}\n"
        )
    };
    let bad = |url: &str, timeout: &str, fleet: u32| problem_keys(&yaml(url, timeout, fleet));
    assert_eq!(
        bad("http://x:6379", "0s", 0),
        [
            "smtpd.rate_limits.redis.url",
            "smtpd.rate_limits.redis.timeout",
            "smtpd.rate_limits.redis.fleet_size"
        ]
    );
    assert_eq!(bad("rediss://x:6379", "2s", 1).len(), 2);
    assert_eq!(bad("redis://", "1s", 1), ["smtpd.rate_limits.redis.url"]);
    assert!(MtaConfig::from_yaml(&yaml("redis://x:6379/0", "1s", 5)).is_ok());
    // fleet_size is required: a shared limit without it cannot fall back to a share.
    assert!(
        MtaConfig::from_yaml("smtpd:\n  rate_limits:\n    redis:\n      url: redis://x\n").is_err()
    );
}

/// A pod's share of a rate while the fleet's counters are unreachable.
#[test]
fn fallback_share_never_exceeds_the_fleet_rate() {
    let rate = |count| Rate {
        count,
        interval: std::time::Duration::from_secs(60),
    };
    assert_eq!(rate(12).share(3), rate(4));
    assert_eq!(rate(10).share(3), rate(3));
    assert_eq!(rate(2).share(3), rate(1));
    assert_eq!(rate(7).share(1), rate(7));
    assert_eq!(rate(7).share(0), rate(7));
    for count in 1..200 {
        for fleet in 1..20 {
            let share = rate(count).share(fleet);
            assert!(share.count >= 1);
            assert!(share.count * fleet <= count.max(fleet), "{count}/{fleet}");
            assert_eq!(share.interval, rate(count).interval);
        }
    }
}

#[test]
fn dane_is_on_by_default_and_its_mistakes_name_their_keys() {
    let config = MtaConfig::from_yaml("hostname: a.test\n").expect("parses");
    assert!(config.smtp_client.dane);
    assert_eq!(config.smtp_client.dnssec_trust_anchor, None);
    let yaml = "\
smtp_client:
  dnssec_trust_anchor: ''
routes:
  - domain: '*'
    smarthost: relay.test:587
    dane: true
  - domain: mx.test
    dane: false
";
    assert_eq!(
        problem_keys(yaml),
        ["routes[0].dane", "smtp_client.dnssec_trust_anchor"]
    );
}

#[test]
fn route_dane_is_true_false_or_required() {
    let yaml = "\
routes:
  - domain: on.test
    dane: true
  - domain: off.test
    dane: false
  - domain: must.test
    dane: required
  - domain: quoted.test
    dane: 'required'
  - domain: unset.test
";
    let config = MtaConfig::from_yaml(yaml).expect("parses");
    let dane: Vec<Option<DaneMode>> = config.routes.iter().map(|r| r.dane).collect();
    assert_eq!(
        dane,
        [
            Some(DaneMode::Opportunistic),
            Some(DaneMode::Off),
            Some(DaneMode::Required),
            Some(DaneMode::Required),
            None,
        ]
    );
    // Rendered as written: true/false stay booleans, so older MTAs read them too.
    let rendered = config.to_yaml();
    assert!(rendered.contains("dane: true"), "{rendered}");
    assert!(rendered.contains("dane: false"), "{rendered}");
    assert!(rendered.contains("dane: required"), "{rendered}");
    assert_eq!(MtaConfig::from_yaml(&rendered).expect("round trip"), config);

    for wrong in ["dane: sometimes", "dane: 1", "dane: Required"] {
        let yaml = format!("routes:\n  - domain: a.test\n    {wrong}\n");
        let err = MtaConfig::from_yaml(&yaml).expect_err(wrong);
        assert!(matches!(err, ConfigError::Syntax(_)), "{wrong}: {err}");
        assert!(
            err.to_string().contains("true, false or required"),
            "{wrong}: {err}"
        );
    }

    let yaml = "routes:\n  - domain: '*'\n    smarthost: relay.test:587\n    dane: required\n";
    let err = MtaConfig::from_yaml(yaml).expect_err("refused");
    let ConfigError::Invalid(problems) = err else {
        panic!("expected a semantic problem, got {err}");
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "routes[0].dane");
    assert!(
        problems[0].message.contains("cannot require DANE"),
        "{}",
        problems[0]
    );
}

#[test]
fn tls_rpt_defaults_and_mistakes() {
    let config = MtaConfig::from_yaml("hostname: a.test\n").expect("parses");
    assert!(config.smtp_client.tls_rpt.enabled);
    assert_eq!(
        config.smtp_client.tls_rpt.report_interval,
        std::time::Duration::from_secs(86400)
    );
    assert!(
        !config.to_yaml().contains("tls_rpt"),
        "defaults are not rendered"
    );
    let yaml = "smtp_client:\n  tls_rpt: {report_interval: 0s, sender: nobody}\n";
    assert_eq!(
        problem_keys(yaml),
        [
            "smtp_client.tls_rpt.report_interval",
            "smtp_client.tls_rpt.sender"
        ]
    );
}

/// Issue 17: site limits default sensibly, stay out of a rendered config at their
/// defaults, round-trip when set, and every mistake names its key.
#[test]
fn site_limits_defaults_rules_and_mistakes() {
    let default = MtaConfig::default();
    assert_eq!(default.queue.site_limits.max_connections, 20);
    assert_eq!(default.queue.site_limits.max_message_rate, "off");
    let yaml = default.to_yaml();
    assert!(!yaml.contains("site"), "{yaml}");
    let set = MtaConfig::from_yaml(
        "queue:\n  site_limits: {max_message_rate: 600/1m, recovery_interval: 10s}\n  sites:\n    - name: bigmail\n      mx: ['*.mail.example']\n      limits: {max_connections: 50}\n    - name: small.example\n      domains: [small.example]\n",
    )
    .expect("valid");
    assert_eq!(set.queue.sites.len(), 2);
    assert_eq!(
        set.queue.site_limits.recovery_interval,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(
        MtaConfig::from_yaml(&set.to_yaml()).expect("round trip"),
        set
    );
    assert_eq!(
        problem_keys(
            "queue:\n  site_limits: {max_connections: 0, max_message_rate: fast, recovery_interval: 0s, suspend_after: 0, suspend_time: 0s}\n"
        ),
        [
            "queue.site_limits.max_connections",
            "queue.site_limits.max_message_rate",
            "queue.site_limits.recovery_interval",
            "queue.site_limits.suspend_after",
            "queue.site_limits.suspend_time",
        ]
    );
    assert_eq!(
        problem_keys(
            "queue:\n  site_limits: {throttle_memory: 1s, recovery_interval: 5s, suspend_time: 10m, max_suspend_time: 1m}\n"
        ),
        [
            "queue.site_limits.throttle_memory",
            "queue.site_limits.max_suspend_time"
        ]
    );
    assert_eq!(
        problem_keys(
            "queue:\n  sites:\n    - name: a\n      mx: ['*.x.example', 'mx.*.example']\n    - name: a\n      domains: [b.example]\n    - name: 'no spaces'\n      limits: {max_connections: 0}\n"
        ),
        [
            "queue.sites[0].mx[1]",
            "queue.sites[1].name",
            "queue.sites[2].name",
            "queue.sites[2]",
            "queue.sites[2].limits.max_connections",
        ]
    );
}

#[test]
fn route_dane_reads_every_boolean_as_the_bool_it_replaced() {
    // `dane` was an `Option<bool>`: whatever that read, `DaneMode` reads the same way.
    #[derive(serde::Deserialize)]
    struct Before {
        dane: Option<bool>,
    }
    for value in [
        "true",
        "false",
        "True",
        "FALSE",
        "yes",
        "no",
        "on",
        "off",
        "'true'",
        "\"false\"",
        "~",
        "null",
        "1",
        "0",
        "maybe",
        "[true]",
    ] {
        let before = serde_saphyr::from_str::<Before>(&format!("dane: {value}\n"))
            .map(|b| {
                b.dane.map(|on| {
                    if on {
                        DaneMode::Opportunistic
                    } else {
                        DaneMode::Off
                    }
                })
            })
            .ok();
        let now =
            serde_saphyr::from_str::<RouteConfig>(&format!("domain: a.test\ndane: {value}\n"))
                .map(|r| r.dane)
                .ok();
        assert_eq!(now, before, "dane: {value}");
    }
}
