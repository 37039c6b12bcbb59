//! DKIM signing of outbound mail, in cleanup, once per message: after the `Received:`
//! header is added and before the message is queued. Signs with every key configured for
//! the From header's domain (several selectors during a rotation), and only messages with
//! at least one non-local recipient (mail that stays here is not signed).

use crate::queue::{Envelope, split_address};
use mta_auth::{Signer, SigningKey};
use mta_config::{DkimConfig, MtaConfig};

/// A key the process has loaded: `(domain, selector, signs)`, as `petrel_mta_dkim_keys`
/// reports it.
pub type LoadedKey = (String, String, bool);

/// Loads every configured key, signing or staged (`sign: false`): a key that does not load
/// refuses the whole config. Returns the signer (signing keys only) and the loaded keys.
pub fn signer(config: &DkimConfig) -> Result<(Option<Signer>, Vec<LoadedKey>), String> {
    let mut signing = Vec::new();
    let mut loaded = Vec::new();
    for k in &config.keys {
        let key = SigningKey::from_pem_file(&k.domain, &k.selector, &k.key_file).map_err(|e| {
            format!(
                "dkim key {} for {} ({}): {e}",
                k.selector,
                k.domain,
                k.key_file.display()
            )
        })?;
        loaded.push((k.domain.clone(), k.selector.clone(), k.sign));
        if k.sign {
            signing.push(key);
        }
    }
    let signer = (!signing.is_empty()).then(|| Signer::new(signing));
    Ok((signer, loaded))
}

/// The DKIM-Signature header(s) for a message, or nothing when it is not signed.
pub fn sign(signer: &Signer, config: &MtaConfig, envelope: &Envelope, content: &[u8]) -> String {
    let leaves = envelope
        .recipients
        .iter()
        .any(|r| split_address(&r.address).is_none_or(|(_, d)| config.local_domain(d).is_none()));
    if !leaves {
        return String::new();
    }
    let Some(domain) = from_domain(content) else {
        return String::new();
    };
    if !signer.signs_for(&domain) {
        return String::new();
    }
    match signer.sign(&domain, content) {
        Ok(headers) => headers,
        Err(e) => {
            tracing::error!(domain, error = %e, "DKIM signing failed; message sent unsigned");
            String::new()
        }
    }
}

/// The domain of the first From address, lower-cased.
fn from_domain(content: &[u8]) -> Option<String> {
    let message = mail_parser::MessageParser::default().parse_headers(content)?;
    let address = message.from()?.first()?.address()?;
    split_address(address).map(|(_, d)| d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domain_of_folded_display_names() {
        let msg = b"Subject: x\r\nFrom: \"Alice, A.\"\r\n <Alice@Example.TEST>\r\n\r\nbody\r\n";
        assert_eq!(from_domain(msg).as_deref(), Some("example.test"));
        assert_eq!(from_domain(b"Subject: none\r\n\r\n"), None);
    }
}
