//! The server side of TLS: loads the certificate and key named in `tls`, generates a
//! self-signed pair when asked to and none exists, and re-reads the files when they
//! change on disk.
//!
//! Reload is checked at each handshake (two `stat` calls): a Kubernetes Secret mount is
//! replaced by a symlink swap, and the next connection gets the new certificate. A new
//! pair that does not load is refused with a log line and the
//! `petrel_mta_tls_reloads_total{result="refused"}` metric, and the old one stays in use.
//! That includes a half-written pair, a key that does not belong to the certificate:
//! rustls (0.23 with ring) compares the key's public key with the certificate's
//! SubjectPublicKeyInfo in `with_single_cert`, and the tests hold it to that. Handshakes
//! already done are never affected.
//!
//! `petrel_mta_tls_certificate_expiry_seconds` is the served certificate's notAfter.

use crate::files::{Stamp, stamp};
use mta_config::TlsConfig;
use mta_telemetry::{MtaMetrics, TlsReload};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_rustls::TlsAcceptor;

/// Hands out acceptors for the current certificate.
pub struct Certificates {
    cert_file: PathBuf,
    key_file: PathBuf,
    metrics: MtaMetrics,
    current: Mutex<(Option<Stamp>, Option<Stamp>, TlsAcceptor)>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("cert_file", &self.cert_file)
            .finish()
    }
}

impl Certificates {
    /// Loads the pair named in `config` (generating it first if asked), or `None` when no
    /// certificate is configured. Reloads and the served certificate's expiry are
    /// reported to `metrics`.
    pub fn load(
        config: &TlsConfig,
        hostname: &str,
        metrics: &MtaMetrics,
    ) -> Result<Option<Certificates>, String> {
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Ok(None);
        };
        if config.generate_self_signed && !cert_file.exists() && !key_file.exists() {
            generate_self_signed(cert_file, key_file, hostname)?;
        }
        let (cert_stamp, key_stamp) = (stamp(cert_file), stamp(key_file));
        let loaded = load_pair(cert_file, key_file)?;
        metrics.set_tls_certificate_expiry(loaded.not_after);
        tracing::info!(
            cert = %cert_file.display(),
            serial = %loaded.serial,
            not_after = loaded.not_after,
            "tls: certificate loaded"
        );
        Ok(Some(Certificates {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            metrics: metrics.clone(),
            current: Mutex::new((cert_stamp, key_stamp, loaded.acceptor)),
        }))
    }

    /// The acceptor to use for a handshake starting now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let (cert_now, key_now) = (stamp(&self.cert_file), stamp(&self.key_file));
        if (cert_now, key_now) != (current.0, current.1) {
            match load_pair(&self.cert_file, &self.key_file) {
                Ok(loaded) => {
                    tracing::info!(
                        cert = %self.cert_file.display(),
                        serial = %loaded.serial,
                        not_after = loaded.not_after,
                        "tls: certificate reloaded"
                    );
                    self.metrics.tls_reload(TlsReload::Loaded);
                    self.metrics.set_tls_certificate_expiry(loaded.not_after);
                    *current = (cert_now, key_now, loaded.acceptor);
                }
                Err(e) => {
                    tracing::error!(error = %e, "tls: new certificate refused; keeping the old one");
                    self.metrics.tls_reload(TlsReload::Refused);
                    // Do not retry on every handshake until the files change again.
                    current.0 = cert_now;
                    current.1 = key_now;
                }
            }
        }
        current.2.clone()
    }
}

/// A pair that loaded, with what the metrics and the log say about it.
struct Loaded {
    acceptor: TlsAcceptor,
    /// notAfter of the end-entity certificate, Unix seconds.
    not_after: i64,
    /// Its serial number, hex.
    serial: String,
}

/// Reads and checks a certificate chain and its key: the key must be the one the first
/// certificate names (rustls compares the public keys), else the pair is refused.
fn load_pair(cert_file: &Path, key_file: &Path) -> Result<Loaded, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("{}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in file", cert_file.display()));
    }
    let (_, end_entity) = x509_parser::parse_x509_certificate(certs[0].as_ref())
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let not_after = end_entity.validity().not_after.timestamp();
    let serial = end_entity.tbs_certificate.raw_serial_as_string();
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            let why = match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    "the key does not belong to the certificate".to_owned()
                }
                e => e.to_string(),
            };
            format!("{} / {}: {why}", cert_file.display(), key_file.display())
        })?;
    Ok(Loaded {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        not_after,
        serial,
    })
}

/// Writes a self-signed certificate for `hostname` (and `localhost`) and its key. The
/// subject's common name is `hostname` too: clients and tools that show the subject (and
/// old ones that still match on it) see this server's name, not a library's placeholder.
pub fn generate_self_signed(
    cert_file: &Path,
    key_file: &Path,
    hostname: &str,
) -> Result<(), String> {
    let mut names = vec![hostname.to_owned()];
    if !hostname.eq_ignore_ascii_case("localhost") {
        names.push("localhost".to_owned());
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, hostname);
    params.distinguished_name = subject;
    let signing_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params
        .self_signed(&signing_key)
        .map_err(|e| e.to_string())?;
    let certified = rcgen::CertifiedKey { cert, signing_key };
    for file in [cert_file, key_file] {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    std::fs::write(cert_file, certified.cert.pem())
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    write_private(key_file, certified.signing_key.serialize_pem().as_bytes())?;
    tracing::info!(cert = %cert_file.display(), "tls: generated a self-signed certificate");
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(data)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of one series in the Prometheus exposition.
    fn metric(metrics: &MtaMetrics, series: &str) -> f64 {
        let text = metrics.encode_prometheus();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    /// Writes a self-signed certificate that expires at `not_after` (Unix seconds) and
    /// returns its key, for pairing it with other files.
    fn write_cert(cert_file: &Path, not_after: i64) -> rcgen::KeyPair {
        let mut params = rcgen::CertificateParams::new(vec!["mx.test".to_owned()]).expect("params");
        params.not_after =
            rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_after as u64);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("sign");
        std::fs::write(cert_file, cert.pem()).expect("write cert");
        key
    }

    /// Replaces the file at `path` by a new one renamed over it (a new inode: the change
    /// is seen even within the same modification second).
    fn replace(path: &Path, data: &[u8]) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }

    #[test]
    fn reloads_changed_files_and_keeps_old_on_broken_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let config = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            generate_self_signed: true,
        };
        let metrics = MtaMetrics::new();
        let certs = Certificates::load(&config, "mx.test", &metrics)
            .expect("load")
            .expect("configured");
        let first = certs.acceptor().config().clone();
        assert!(
            Arc::ptr_eq(&first, certs.acceptor().config()),
            "unchanged files: same config"
        );

        // A new pair (written as Kubernetes does: new files renamed into place).
        let (c2, k2) = (dir.path().join("c2.pem"), dir.path().join("k2.pem"));
        generate_self_signed(&c2, &k2, "mx.test").expect("generate");
        std::fs::rename(&c2, &cert).expect("swap cert");
        std::fs::rename(&k2, &key).expect("swap key");
        let second = certs.acceptor().config().clone();
        assert!(!Arc::ptr_eq(&first, &second), "new files: new config");

        // A broken certificate is refused; the previous one stays.
        std::fs::write(dir.path().join("bad.pem"), b"not a certificate").expect("write");
        std::fs::rename(dir.path().join("bad.pem"), &cert).expect("swap");
        assert!(Arc::ptr_eq(&second, certs.acceptor().config()));
        let refused = r#"petrel_mta_tls_reloads_total{result="refused"}"#;
        assert_eq!(metric(&metrics, refused), 1.0);
        // ... once: the next handshakes do not read the same broken files again.
        assert!(Arc::ptr_eq(&second, certs.acceptor().config()));
        assert_eq!(metric(&metrics, refused), 1.0);
    }

    /// A half-written pair (the certificate replaced, its key not yet, or a key from
    /// another pair) parses well and would fail every handshake: rustls's public key
    /// comparison refuses it, the old pair keeps serving, and the metrics say so. When
    /// the matching key arrives, the new pair is taken.
    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        const OLD_EXPIRY: i64 = 1_900_000_000;
        const NEW_EXPIRY: i64 = 2_000_000_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let old_key = write_cert(&cert, OLD_EXPIRY);
        std::fs::write(&key, old_key.serialize_pem()).expect("write key");
        let config = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            generate_self_signed: false,
        };
        let metrics = MtaMetrics::new();
        let expiry = "petrel_mta_tls_certificate_expiry_seconds";
        let refused = r#"petrel_mta_tls_reloads_total{result="refused"}"#;
        let loaded = r#"petrel_mta_tls_reloads_total{result="loaded"}"#;
        let certs = Certificates::load(&config, "mx.test", &metrics)
            .expect("load")
            .expect("configured");
        let old = certs.acceptor().config().clone();
        assert_eq!(metric(&metrics, expiry), OLD_EXPIRY as f64);

        // The new certificate lands first; the key file still holds the old key.
        let new_cert = dir.path().join("new.crt");
        let new_key = write_cert(&new_cert, NEW_EXPIRY);
        replace(&cert, &std::fs::read(&new_cert).expect("read"));
        let error = load_pair(&cert, &key).err().expect("mismatch detected");
        assert!(error.contains("does not belong"), "{error}");
        assert!(
            Arc::ptr_eq(&old, certs.acceptor().config()),
            "old pair kept"
        );
        assert_eq!(metric(&metrics, refused), 1.0);
        assert_eq!(metric(&metrics, loaded), 0.0);
        assert_eq!(metric(&metrics, expiry), OLD_EXPIRY as f64);

        // A key of yet another pair: refused again.
        let stranger = rcgen::KeyPair::generate().expect("key");
        replace(&key, stranger.serialize_pem().as_bytes());
        assert!(
            Arc::ptr_eq(&old, certs.acceptor().config()),
            "old pair kept"
        );
        assert_eq!(metric(&metrics, refused), 2.0);

        // The matching key completes the pair: served from the next handshake on.
        replace(&key, new_key.serialize_pem().as_bytes());
        assert!(
            !Arc::ptr_eq(&old, certs.acceptor().config()),
            "new pair taken"
        );
        assert_eq!(metric(&metrics, refused), 2.0);
        assert_eq!(metric(&metrics, loaded), 1.0);
        assert_eq!(metric(&metrics, expiry), NEW_EXPIRY as f64);
    }

    #[test]
    fn a_mismatched_pair_does_not_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let _ = write_cert(&cert, 1_900_000_000);
        let other = rcgen::KeyPair::generate().expect("key");
        std::fs::write(&key, other.serialize_pem()).expect("write key");
        let config = TlsConfig {
            cert_file: Some(cert),
            key_file: Some(key),
            generate_self_signed: false,
        };
        let error =
            Certificates::load(&config, "mx.test", &MtaMetrics::new()).expect_err("refused");
        assert!(error.contains("does not belong"), "{error}");
    }
}
