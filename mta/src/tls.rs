//! The server side of TLS: loads the certificate and key named in `tls`, generates a
//! self-signed pair when asked to and none exists, and re-reads the files when they
//! change on disk.
//!
//! Reload is checked at each handshake (two `stat` calls): a Kubernetes Secret mount is
//! replaced by a symlink swap, and the next connection gets the new certificate. A new
//! pair that does not load is refused with a log line and the old one stays in use.
//! Handshakes already done are never affected.

use mta_config::TlsConfig;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_rustls::TlsAcceptor;

/// The files' identity: a changed inode, size or modification time means "reload".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified: i64,
    modified_ns: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.mtime(),
        modified_ns: meta.mtime_nsec(),
    })
}

/// Hands out acceptors for the current certificate.
pub struct Certificates {
    cert_file: PathBuf,
    key_file: PathBuf,
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
    /// certificate is configured.
    pub fn load(config: &TlsConfig, hostname: &str) -> Result<Option<Certificates>, String> {
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Ok(None);
        };
        if config.generate_self_signed && !cert_file.exists() && !key_file.exists() {
            generate_self_signed(cert_file, key_file, hostname)?;
        }
        let acceptor = acceptor(cert_file, key_file)?;
        Ok(Some(Certificates {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            current: Mutex::new((stamp(cert_file), stamp(key_file), acceptor)),
        }))
    }

    /// The acceptor to use for a handshake starting now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let (cert_now, key_now) = (stamp(&self.cert_file), stamp(&self.key_file));
        if (cert_now, key_now) != (current.0, current.1) {
            match acceptor(&self.cert_file, &self.key_file) {
                Ok(acceptor) => {
                    tracing::info!(cert = %self.cert_file.display(), "tls: certificate reloaded");
                    *current = (cert_now, key_now, acceptor);
                }
                Err(e) => {
                    tracing::error!(error = %e, "tls: new certificate refused; keeping the old one");
                    // Do not retry on every handshake until the files change again.
                    current.0 = cert_now;
                    current.1 = key_now;
                }
            }
        }
        current.2.clone()
    }
}

fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("{}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in file", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} / {}: {e}", cert_file.display(), key_file.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
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

    #[test]
    fn reloads_changed_files_and_keeps_old_on_broken_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let config = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            generate_self_signed: true,
        };
        let certs = Certificates::load(&config, "mx.test")
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
    }
}
