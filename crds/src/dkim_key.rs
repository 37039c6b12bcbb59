//! `DkimKey`: a DKIM signing key for one domain, with its selector naming and rotation
//! schedule.
//!
//! Owns the spec (domain, selector prefix, algorithm, rotation period and overlap) and the
//! status (phase, selectors with their public TXT records, next rotation time). The key
//! material lives in Secrets the operator owns, never in the resource.

// kube's `printcolumn(name = .., type_ = ..)` repeats keys across columns by design.
#![allow(clippy::duplicated_attributes)]

use crate::conditions::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A DKIM signing key. MailDomains name it in `dkimKeyRef`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mail.petrel.dev",
    version = "v1alpha1",
    kind = "DkimKey",
    namespaced,
    status = "DkimKeyStatus",
    shortname = "dkim",
    category = "petrel",
    doc = "A DKIM signing key for one domain, rotated on a schedule.",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(name = "Algorithm", type_ = "string", json_path = ".spec.algorithm"),
    printcolumn(
        name = "Selector",
        type_ = "string",
        json_path = ".status.activeSelector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeySpec {
    /// The signing domain (`d=`), e.g. `example.com`. At most 253 characters.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(crate::DOMAIN_RULE).message("domain must be a lower-case DNS domain name"))]
    pub domain: String,
    /// Selectors are named `<selectorPrefix>-<n>`, n counting up with each rotation.
    /// A lower-case DNS label of at most 32 characters. Default: `petrel`.
    #[serde(default = "default_selector_prefix")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$')").message("selectorPrefix must be a lower-case DNS label of at most 32 characters"))]
    pub selector_prefix: String,
    /// `ed25519` (RFC 8463) or `rsa-2048`. Many receivers verify only RSA; publish both
    /// (two DkimKeys) for the widest reach.
    pub algorithm: DkimAlgorithm,
    /// How long a key signs before the next one takes over, like `90d`; at most 32
    /// characters. Default: `90d`.
    #[serde(default = "default_rotation_period")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(crate::DURATION_RULE).message("rotationPeriod is a duration like 90d"))]
    pub rotation_period: String,
    /// How long a retired key's TXT record stays published after the switch, so mail
    /// signed just before it still verifies. At most 32 characters. Default: `7d`.
    #[serde(default = "default_overlap")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(crate::DURATION_RULE).message("overlap is a duration like 7d"))]
    pub overlap: String,
}

fn default_selector_prefix() -> String {
    "petrel".to_owned()
}

fn default_rotation_period() -> String {
    "90d".to_owned()
}

fn default_overlap() -> String {
    "7d".to_owned()
}

/// DKIM key algorithm.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DkimAlgorithm {
    /// RSA with a 2048-bit modulus, `rsa-sha256`.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// Ed25519, `ed25519-sha256` (RFC 8463).
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl DkimAlgorithm {
    /// The `k=` tag of the public TXT record.
    pub fn key_type(self) -> &'static str {
        match self {
            Self::Rsa2048 => "rsa",
            Self::Ed25519 => "ed25519",
        }
    }
}

/// Where a key is in its life.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DkimKeyPhase {
    /// No key material yet (or it cannot be generated).
    #[default]
    Pending,
    /// Key generated and its TXT record published in status; not yet seen in DNS, so
    /// nothing is signed with it.
    Published,
    /// Its record is visible in DNS and it signs mail.
    Active,
    /// Superseded; its record stays for the overlap period.
    Retiring,
}

/// Observed state of a DkimKey.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeyStatus {
    /// Standard conditions: `Ready`, `DnsReady`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Phase of the newest key.
    #[serde(default)]
    pub phase: DkimKeyPhase,
    /// The selector currently signing, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_selector: Option<String>,
    /// Every selector with key material, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<DkimSelector>,
    /// When the next key will be generated (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<String>,
}

/// One selector and its public record.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimSelector {
    /// Selector name, e.g. `petrel-1`.
    pub selector: String,
    /// Its phase.
    pub phase: DkimKeyPhase,
    /// Owner name of the TXT record, e.g. `petrel-1._domainkey.example.com.`.
    pub record_name: String,
    /// Value of the TXT record, e.g. `v=DKIM1; k=ed25519; p=...`.
    pub record_value: String,
    /// Secret holding the private key.
    pub secret_name: String,
}
