//! `DkimKey`: a DKIM signing key for one domain, with its selector naming and rotation
//! schedule.
//!
//! Owns the spec (domain, selector slots, algorithm, rotation period and overlap) and the
//! status (phase, selectors with their public TXT records and states, next rotation time).
//! The key material and the rotation state live in Secrets the operator owns (one per
//! selector slot), never in the resource: status is a report, and can be rebuilt from them.

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
    /// The two selector slots are `<selectorPrefix>-a` and `<selectorPrefix>-b` (unless
    /// `selectors` names them); keys alternate between them, so the DNS names stay the
    /// same across rotations (they can be created once, or delegated by CNAME). A
    /// lower-case DNS label of at most 32 characters. Default: `petrel`.
    #[serde(default = "default_selector_prefix")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$')").message("selectorPrefix must be a lower-case DNS label of at most 32 characters"))]
    pub selector_prefix: String,
    /// `ed25519` (RFC 8463) or `rsa-2048`. Many receivers verify only RSA; publish both
    /// (two DkimKeys) for the widest reach.
    pub algorithm: DkimAlgorithm,
    /// Two selector names of your choosing instead of `<selectorPrefix>-a`/`-b`: exactly
    /// two distinct lower-case DNS labels of at most 63 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(min = 2, max = 2),
        inner(length(max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))
    )]
    #[x_kube(validation = Rule::new("size(self) == 2 && self[0] != self[1]").message("selectors names exactly two distinct selectors"))]
    pub selectors: Vec<String>,
    /// `Automatic` (default): a new key every `rotationPeriod`. `Manual`: only when asked,
    /// by setting the annotation `mail.petrel.dev/rotate` to a new value (e.g. the date).
    /// The annotation works in both modes.
    #[serde(default)]
    pub rotation: DkimRotation,
    /// How long a key signs before the next one takes over, like `90d`; at most 32
    /// characters. Default: `90d`.
    #[serde(default = "default_rotation_period")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(crate::DURATION_RULE).message("rotationPeriod is a duration like 90d"))]
    pub rotation_period: String,
    /// How long a retired key's TXT record stays published after the last pod stopped
    /// signing with it, so mail signed just before (or still queued) verifies. Make it at
    /// least the queue lifetime plus the time receivers take to verify. At most 32
    /// characters. Default: `7d`.
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

/// Whether keys rotate on a schedule.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DkimRotation {
    /// A new key every `rotationPeriod` (and whenever `mail.petrel.dev/rotate` changes).
    #[default]
    Automatic,
    /// Only when `mail.petrel.dev/rotate` changes.
    Manual,
}

/// Annotation on a DkimKey that asks for a rotation now: each new value starts one
/// rotation (e.g. `kubectl annotate dkimkey k mail.petrel.dev/rotate="$(date +%s)" --overwrite`).
pub const ROTATE_ANNOTATION: &str = "mail.petrel.dev/rotate";

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

/// Where a key is in its life. A key moves forward only:
/// Generated → Published → Active → Retiring → Revoked; its slot is then reused.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DkimKeyPhase {
    /// No key material yet (or it cannot be generated).
    #[default]
    Pending,
    /// Private key in its Secret; the TXT record (in status) is not yet answered by every
    /// authoritative nameserver of the zone. Nothing is signed with it.
    Generated,
    /// Every authoritative nameserver answers the record; once the record TTL and the
    /// zone's negative-caching TTL have passed, the pods load the key (without signing).
    Published,
    /// Every Ready MTA pod has loaded it; it signs mail.
    Active,
    /// Superseded: no longer signs; its record stays for `overlap` after the last pod
    /// stopped signing with it.
    Retiring,
    /// The private key is deleted and the record published with an empty `p=` (RFC 6376
    /// §3.6.1: revoked) until the slot takes the next key.
    Revoked,
}

/// Observed state of a DkimKey.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeyStatus {
    /// Standard conditions: `Ready`, `DnsReady`, `Rotation`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Phase of the newest key (the one a rotation is bringing in, else the active one).
    #[serde(default)]
    pub phase: DkimKeyPhase,
    /// The selector currently signing, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_selector: Option<String>,
    /// Every selector whose record must exist in DNS now (next, active, retiring,
    /// revoked), newest first, with its state: the DNS guidance for this key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<DkimSelector>,
    /// When the next key will be generated (RFC 3339); empty with `rotation: Manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<String>,
}

/// One selector and its public record.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimSelector {
    /// Selector name, e.g. `petrel-a`.
    pub selector: String,
    /// Its phase.
    pub phase: DkimKeyPhase,
    /// When it entered that phase (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// What the zone's authoritative nameservers answer for the record, e.g.
    /// `answered by all 2 nameservers` or `not answered by ns2.example.com.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// Owner name of the TXT record, e.g. `petrel-a._domainkey.example.com.`.
    pub record_name: String,
    /// Value of the TXT record, e.g. `v=DKIM1; k=ed25519; p=...` (`p=` empty once revoked).
    pub record_value: String,
    /// Secret holding the private key.
    pub secret_name: String,
}
