//! DKIM signing of outbound mail (RFC 6376; Ed25519-SHA256 per RFC 8463).
//!
//! Input: the message as it will be queued (the `Received:` header already added) and
//! the signing domain (normally the domain of the RFC 5322 `From:`). Output: one complete
//! `DKIM-Signature:` header field per key configured for that domain, CRLF-terminated,
//! for the caller to prepend. Several keys per domain are the normal state during key
//! rotation (old and new selector both active); each signature stands alone, and a
//! verifier needs only one to pass.
//!
//! Defaults: relaxed/relaxed canonicalisation (survives the header re-folding and
//! trailing-white-space changes that relays make; `simple` breaks on them), no `l=` (a
//! body-length limit lets anyone append content under a valid signature), no `x=`
//! expiry. The signed header list is [`DEFAULT_SIGNED_HEADERS`] filtered to the fields the
//! message actually has, with `From` listed once more than it occurs ("over-signed"), so
//! a second `From:` added in transit breaks the signature instead of being shown to the
//! reader as the author (RFC 6376 §8.15). Absent fields are deliberately not over-signed:
//! signing the absence of `List-*` or `Reply-To` would make every mailing list that adds
//! them break our signatures for no gain.
//!
//! Keys never leave this module: [`SigningKey`]'s `Debug` shows domain, selector and
//! algorithm only.

use crate::Error;
use crate::headers;
use base64::Engine as _;
use mail_auth::common::crypto::{
    Algorithm as MailAuthAlgorithm, DkimKey, Ed25519Key, RsaKey, Sha256,
    SigningKey as MailAuthSigningKey,
};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use std::fmt;
use std::path::Path;

/// The signature algorithms we sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `a=ed25519-sha256` (RFC 8463): short keys and signatures; not yet verified by every
    /// receiver, so it is normally paired with an RSA selector.
    Ed25519Sha256,
    /// `a=rsa-sha256`, 2048-bit keys or larger: what every verifier understands.
    RsaSha256,
}

impl Algorithm {
    /// The `k=` tag of the public key record.
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::Ed25519Sha256 => "ed25519",
            Algorithm::RsaSha256 => "rsa",
        }
    }
}

/// The header fields signed when present, in the order they are looked up. `From` appears
/// twice: the second entry over-signs it (see the module documentation).
pub const DEFAULT_SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Sender",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "Content-ID",
    "Content-Description",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "Autocrypt",
    "Openpgp",
];

/// One private key and the `d=` / `s=` it signs as.
pub struct SigningKey {
    /// The signing domain (`d=`).
    pub domain: String,
    /// The selector (`s=`): the public key is at `<selector>._domainkey.<domain>`.
    pub selector: String,
    key: DkimKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads a PEM private key file: RSA as PKCS#1 (`BEGIN RSA PRIVATE KEY`, `openssl genrsa
    /// -traditional`) or PKCS#8 (`BEGIN PRIVATE KEY`, `openssl genrsa` / `genpkey`), or
    /// Ed25519 as PKCS#8 (`openssl genpkey -algorithm ed25519`, or ring's v2 documents as
    /// the operator writes them).
    pub fn from_pem_file(
        domain: impl Into<String>,
        selector: impl Into<String>,
        path: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|source| Error::KeyFile {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(domain, selector, &pem)
    }

    /// Parses a PEM private key (see [`SigningKey::from_pem_file`] for the formats).
    pub fn from_pem(
        domain: impl Into<String>,
        selector: impl Into<String>,
        pem: &[u8],
    ) -> Result<Self, Error> {
        let domain = domain.into();
        let selector = selector.into();
        let invalid = |detail: String| Error::Key {
            domain: domain.clone(),
            selector: selector.clone(),
            detail,
        };
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| invalid(format!("no PEM private key: {e}")))?;
        let key = match der {
            PrivateKeyDer::Pkcs1(_) => DkimKey::Rsa(
                RsaKey::<Sha256>::from_key_der(der)
                    .map_err(|e| invalid(format!("RSA key: {e}")))?,
            ),
            PrivateKeyDer::Pkcs8(ref pkcs8) => {
                // PKCS#8 carries either algorithm. `maybe_unchecked` accepts the v1
                // documents OpenSSL writes (no embedded public key) as well as ring's v2.
                match Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der()) {
                    Ok(key) => DkimKey::Ed25519(key),
                    Err(_) => DkimKey::Rsa(RsaKey::<Sha256>::from_key_der(der).map_err(|e| {
                        invalid(format!("PKCS#8 key is neither Ed25519 nor usable RSA: {e}"))
                    })?),
                }
            }
            _ => {
                return Err(invalid(
                    "unsupported key type (DKIM signs with RSA or Ed25519)".into(),
                ));
            }
        };
        Ok(SigningKey {
            domain,
            selector,
            key,
        })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        match self.key {
            DkimKey::Rsa(_) => Algorithm::RsaSha256,
            DkimKey::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }

    /// The public key as the `p=` value: base64 of the SubjectPublicKeyInfo for RSA
    /// (RFC 6376 §3.6.1), of the raw 32-byte key for Ed25519 (RFC 8463 §4).
    pub fn public_key_base64(&self) -> String {
        let bytes = match &self.key {
            DkimKey::Rsa(key) => rsa_subject_public_key_info(&key.public_key()),
            DkimKey::Ed25519(key) => key.public_key(),
        };
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// The TXT record to publish at `<selector>._domainkey.<domain>`, e.g.
    /// `v=DKIM1; k=ed25519; p=...`.
    pub fn dns_record(&self) -> String {
        format!(
            "v=DKIM1; k={}; p={}",
            self.algorithm().key_type(),
            self.public_key_base64()
        )
    }

    /// One signature over `message` with this key and the header names `headers`.
    fn sign(&self, headers: &[String], message: &[u8]) -> Result<String, Error> {
        let signature = DkimSigner::from_key(BorrowedKey(&self.key))
            .domain(self.domain.as_str())
            .selector(self.selector.as_str())
            .headers(headers.iter().map(String::as_str))
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed)
            .sign(message)
            .map_err(|e| Error::Sign {
                domain: self.domain.clone(),
                selector: self.selector.clone(),
                detail: e.to_string(),
            })?;
        Ok(signature.to_header())
    }
}

/// `mail-auth`'s signer takes its key by value; keys are loaded once and shared by every
/// message, so sign through a reference instead of cloning key material per message.
struct BorrowedKey<'a>(&'a DkimKey);

impl MailAuthSigningKey for BorrowedKey<'_> {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> MailAuthAlgorithm {
        self.0.algorithm()
    }
}

/// Wraps a PKCS#1 `RSAPublicKey` (what ring exposes) in a SubjectPublicKeyInfo with the
/// rsaEncryption algorithm identifier, the form DKIM records carry.
fn rsa_subject_public_key_info(pkcs1: &[u8]) -> Vec<u8> {
    // SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }
    const RSA_ALGORITHM_ID: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x03];
    der_length(pkcs1.len() + 1, &mut bit_string);
    bit_string.push(0x00); // no unused bits
    bit_string.extend_from_slice(pkcs1);
    let mut spki = vec![0x30];
    der_length(RSA_ALGORITHM_ID.len() + bit_string.len(), &mut spki);
    spki.extend_from_slice(RSA_ALGORITHM_ID);
    spki.extend_from_slice(&bit_string);
    spki
}

fn der_length(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let first = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - first) as u8);
        out.extend_from_slice(&bytes[first..]);
    }
}

/// Signs outbound messages with every key configured for the signing domain.
#[derive(Debug)]
pub struct Signer {
    keys: Vec<SigningKey>,
    headers: Vec<String>,
}

impl Signer {
    /// A signer with the default header list ([`DEFAULT_SIGNED_HEADERS`]).
    pub fn new(keys: Vec<SigningKey>) -> Self {
        Signer {
            keys,
            headers: DEFAULT_SIGNED_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
        }
    }

    /// Replaces the header list. Every field of a listed name that the message has is
    /// signed; list a name twice to over-sign it.
    pub fn with_headers(mut self, headers: Vec<String>) -> Self {
        self.headers = headers;
        self
    }

    /// Whether any key signs for `domain` (ASCII case-insensitive).
    pub fn signs_for(&self, domain: &str) -> bool {
        self.keys_for(domain).next().is_some()
    }

    /// The keys loaded, for logging and status.
    pub fn keys(&self) -> &[SigningKey] {
        &self.keys
    }

    fn keys_for<'a>(&'a self, domain: &'a str) -> impl Iterator<Item = &'a SigningKey> + 'a {
        let domain = domain.trim_end_matches('.');
        self.keys
            .iter()
            .filter(move |k| k.domain.trim_end_matches('.').eq_ignore_ascii_case(domain))
    }

    /// One `DKIM-Signature:` header field per key of `signing_domain`, concatenated, each
    /// ending in CRLF: prepend the result to `message` unchanged.
    ///
    /// Fails with [`Error::NoKeyForDomain`] when no key signs for the domain and with
    /// [`Error::Sign`] when the message has none of the signed fields (no `From:`).
    pub fn sign(&self, signing_domain: &str, message: &[u8]) -> Result<String, Error> {
        let headers = self.headers_for(message);
        let mut out = String::new();
        for key in self.keys_for(signing_domain) {
            out.push_str(&key.sign(&headers, message)?);
        }
        if out.is_empty() {
            return Err(Error::NoKeyForDomain(signing_domain.to_owned()));
        }
        Ok(out)
    }

    /// The configured list reduced to the names this message has. `mail-auth` signs every
    /// field of a listed name and, for a name listed twice, adds the extra listing as an
    /// over-sign (RFC 6376 §5.4.2), so duplicates in the list are kept as they are.
    fn headers_for(&self, message: &[u8]) -> Vec<String> {
        let (fields, _) = headers::split(message);
        self.headers
            .iter()
            .filter(|name| headers::count(&fields, name) > 0)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_length_forms() {
        let mut out = Vec::new();
        der_length(5, &mut out);
        der_length(0x80, &mut out);
        der_length(0x1234, &mut out);
        assert_eq!(out, [5, 0x81, 0x80, 0x82, 0x12, 0x34]);
    }

    #[test]
    fn header_list_keeps_present_fields_and_over_signs_from() {
        let signer = Signer::new(Vec::new());
        let message = b"From: a@example.test\r\nTo: b@example.test\r\nto: c@example.test\r\n\
Subject: hi\r\nX-Other: 1\r\n\r\nbody\r\n";
        assert_eq!(
            signer.headers_for(message),
            ["From", "From", "To", "Subject"]
        );
    }
}
