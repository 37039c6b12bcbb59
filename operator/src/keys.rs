//! Fresh key material: self-signed TLS certificates (rcgen) and DKIM keys (ring).
//!
//! Render never generates keys itself: it asks a [`KeySource`], so render stays a pure,
//! deterministic function in tests ([`FixedKeys`]) while the operator and the `render`
//! command use [`SystemKeys`]. Keys are only asked for when no Secret holds them yet.

use base64::Engine as _;
use crds::DkimAlgorithm;

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// PEM certificate chain (`tls.crt`).
    pub cert_pem: String,
    /// PEM PKCS#8 private key (`tls.key`).
    pub key_pem: String,
}

/// A DKIM private key and the `p=` value of its public record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimMaterial {
    /// PEM PKCS#8 private key.
    pub private_pem: String,
    /// Base64 public key for the `p=` tag (RFC 6376 §3.6.1; RFC 8463 §4 for Ed25519: the
    /// raw 32-byte key).
    pub public_b64: String,
}

/// Why key material could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The crypto library failed.
    #[error("key generation failed: {0}")]
    Failed(String),
}

/// Makes key material on demand.
pub trait KeySource {
    /// A self-signed certificate for `hostname`.
    fn tls(&mut self, hostname: &str) -> Result<TlsMaterial, KeyError>;
    /// A new DKIM key.
    fn dkim(&mut self, algorithm: DkimAlgorithm) -> Result<DkimMaterial, KeyError>;
    /// A random bearer token (hex), e.g. the one a listener's pods share.
    fn token(&mut self) -> Result<String, KeyError>;
}

/// Real keys from the system's randomness.
#[derive(Debug, Default)]
pub struct SystemKeys;

/// How long a self-signed certificate is valid.
const SELF_SIGNED_DAYS: i64 = 365;

impl KeySource for SystemKeys {
    fn token(&mut self) -> Result<String, KeyError> {
        use ring::rand::SecureRandom as _;
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Failed("no randomness".to_owned()))?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    fn tls(&mut self, hostname: &str) -> Result<TlsMaterial, KeyError> {
        let failed = |e: rcgen::Error| KeyError::Failed(e.to_string());
        let mut params =
            rcgen::CertificateParams::new(vec![hostname.to_owned()]).map_err(failed)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hostname);
        let now =
            k8s_openapi::jiff::Zoned::now().with_time_zone(k8s_openapi::jiff::tz::TimeZone::UTC);
        let day = |z: &k8s_openapi::jiff::Zoned| {
            rcgen::date_time_ymd(
                i32::from(z.year()),
                z.month().unsigned_abs(),
                z.day().unsigned_abs(),
            )
        };
        params.not_before = day(&now);
        let later = now
            .checked_add(k8s_openapi::jiff::Span::new().days(SELF_SIGNED_DAYS))
            .map_err(|e| KeyError::Failed(e.to_string()))?;
        params.not_after = day(&later);
        let key = rcgen::KeyPair::generate().map_err(failed)?;
        let cert = params.self_signed(&key).map_err(failed)?;
        Ok(TlsMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn dkim(&mut self, algorithm: DkimAlgorithm) -> Result<DkimMaterial, KeyError> {
        match algorithm {
            DkimAlgorithm::Ed25519 => {
                use ring::signature::KeyPair as _;
                let rng = ring::rand::SystemRandom::new();
                let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|e| KeyError::Failed(e.to_string()))?;
                let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                    .map_err(|e| KeyError::Failed(e.to_string()))?;
                Ok(DkimMaterial {
                    private_pem: pem("PRIVATE KEY", pkcs8.as_ref()),
                    public_b64: base64::engine::general_purpose::STANDARD
                        .encode(pair.public_key().as_ref()),
                })
            }
            DkimAlgorithm::Rsa2048 => {
                use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
                let failed = |e: &dyn std::fmt::Display| KeyError::Failed(e.to_string());
                let key =
                    rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).map_err(|e| failed(&e))?;
                let private_pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| failed(&e))?;
                // RFC 6376 §3.6.1: p= is the DER SubjectPublicKeyInfo, base64.
                let public_der = key
                    .to_public_key()
                    .to_public_key_der()
                    .map_err(|e| failed(&e))?;
                Ok(DkimMaterial {
                    private_pem: private_pem.to_string(),
                    public_b64: base64::engine::general_purpose::STANDARD
                        .encode(public_der.as_bytes()),
                })
            }
        }
    }
}

/// Wraps DER in a PEM block with 64-column lines.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Deterministic placeholder material for golden tests: obviously not keys, stable across
/// runs, and still honest about which algorithms can be generated.
#[derive(Debug, Default)]
pub struct FixedKeys;

impl KeySource for FixedKeys {
    fn token(&mut self) -> Result<String, KeyError> {
        Ok("test-fleet-token".to_owned())
    }

    fn tls(&mut self, hostname: &str) -> Result<TlsMaterial, KeyError> {
        Ok(TlsMaterial {
            cert_pem: format!("TEST CERTIFICATE for {hostname}\n"),
            key_pem: format!("TEST KEY for {hostname}\n"),
        })
    }

    fn dkim(&mut self, algorithm: DkimAlgorithm) -> Result<DkimMaterial, KeyError> {
        match algorithm {
            DkimAlgorithm::Ed25519 => Ok(DkimMaterial {
                private_pem: "TEST ED25519 KEY\n".to_owned(),
                public_b64: "dGVzdC1lZDI1NTE5LXB1YmxpYy1rZXktMzItYnl0ZXM=".to_owned(),
            }),
            DkimAlgorithm::Rsa2048 => Ok(DkimMaterial {
                private_pem: "TEST RSA-2048 KEY\n".to_owned(),
                public_b64: "dGVzdC1yc2EtMjA0OC1wdWJsaWMta2V5".to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_names_the_host_and_parses() {
        let tls = SystemKeys.tls("mx.example.com").expect("generate");
        assert!(tls.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(tls.key_pem.contains("PRIVATE KEY"));
        let (_, pem) = x509_parser::pem::parse_x509_pem(tls.cert_pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let san = cert
            .subject_alternative_name()
            .expect("extension parses")
            .expect("has SAN");
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[DNSName(\"mx.example.com\")]"
        );
        let validity = cert.validity();
        let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
        assert_eq!(days, SELF_SIGNED_DAYS);
    }

    #[test]
    fn ed25519_dkim_key_round_trips_and_public_key_is_32_bytes() {
        let key = SystemKeys.dkim(DkimAlgorithm::Ed25519).expect("generate");
        let public = base64::engine::general_purpose::STANDARD
            .decode(&key.public_b64)
            .expect("base64");
        assert_eq!(public.len(), 32);
        let der: String = key
            .private_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(der)
            .expect("pem body");
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&der).expect("pkcs8");
        use ring::signature::KeyPair as _;
        assert_eq!(pair.public_key().as_ref(), public.as_slice());
    }

    #[test]
    fn rsa_dkim_key_is_2048_bits_and_its_record_holds_its_public_key() {
        let key = SystemKeys.dkim(DkimAlgorithm::Rsa2048).expect("generate");
        let body: String = key
            .private_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(key.private_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("pem body");
        // ring (not the crate that generated it) loads the PKCS#8 key.
        let pair = ring::rsa::KeyPair::from_pkcs8(&der).expect("pkcs8 RSA key");
        assert_eq!(pair.public().modulus_len(), 256, "2048 bits");
        let spki = base64::engine::general_purpose::STANDARD
            .decode(&key.public_b64)
            .expect("base64");
        // The SubjectPublicKeyInfo wraps the PKCS#1 RSAPublicKey in its BIT STRING.
        assert!(spki.ends_with(pair.public().as_ref()));
    }
}
