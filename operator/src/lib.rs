//! `petrel-operator`: turns Petrel custom resources into a fleet of `petrel-mta` pods.
//!
//! Modules in flow order: [`input`] reads CR files for offline use and [`stores`] keeps the
//! cluster's resources in reflector stores; [`render`] is the pure function from CRs (+
//! observed Secrets) to desired objects, using [`keys`] for fresh key material; [`dns`]
//! computes each domain's DNS guidance and checks it against live DNS; [`apply`]
//! server-side-applies and prunes; [`status`] builds conditions; [`reconcile`] ties them
//! together, one file per kind, and [`controller`] runs the kube-rs Controllers.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod apply;
pub mod context;
pub mod controller;
pub mod dns;
pub mod input;
pub mod keys;
pub mod metrics;
pub mod pods;
pub mod reconcile;
pub mod render;
pub mod status;
pub mod stores;

#[cfg(test)]
mod fixtures;

/// The field manager of every server-side apply this operator makes.
pub const FIELD_MANAGER: &str = "petrel-operator";

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resources cannot be rendered into a valid configuration (a user can fix this).
    #[error("render failed: {0}")]
    Render(#[from] render::RenderError),
    /// The Kubernetes API refused or failed a request.
    #[error("kubernetes API error: {0}")]
    Kube(#[source] Box<kube::Error>),
    /// A CR file could not be read or parsed.
    #[error("{0}")]
    Input(#[from] input::InputError),
    /// A resource lacks a field the API server always sets (name, namespace).
    #[error("resource is missing {0}")]
    MissingField(&'static str),
    /// JSON (de)serialisation of an object failed.
    #[error("serialisation failed: {0}")]
    Serialization(#[from] serde_json::Error),
    /// An object the operator would write exists and was not made by it (a user's
    /// Secret, say): it is never taken over.
    #[error(
        "{kind} {name} already exists and is not managed by petrel-operator; rename or delete it"
    )]
    NotOwned {
        /// Kind of the object.
        kind: String,
        /// Its name.
        name: String,
    },
    /// `tls.issuerRef` needs cert-manager, and the API server does not serve its
    /// `Certificate` kind.
    #[error(
        "tls.issuerRef needs cert-manager, but the API server does not serve certificates.cert-manager.io/v1: install cert-manager (or its CRDs), or use tls.secretName"
    )]
    CertManagerMissing,
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Kube(Box::new(e))
    }
}

impl Error {
    /// Stable, low-cardinality label for metrics and the `reason` of `Degraded` conditions.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Render(_) => "RenderFailed",
            Self::Kube(_) => "KubeApiError",
            Self::Input(_) => "InputError",
            Self::MissingField(_) => "MissingField",
            Self::Serialization(_) => "SerializationFailed",
            Self::NotOwned { .. } => "ObjectNotOwned",
            Self::CertManagerMissing => "CertManagerMissing",
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
