//! What the peer said it can do in its EHLO/LHLO reply (RFC 5321 4.1.1.1).
//!
//! Keywords are read from the reply text (one keyword per line after the first,
//! case-insensitive). Unknown keywords are ignored. A HELO-only peer has no
//! capabilities at all.

/// The service extensions this client uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 1870: `Some(limit)` when SIZE is offered; `Some(0)` means offered
    /// without a fixed limit.
    pub size: Option<u64>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 3461.
    pub dsn: bool,
    /// RFC 3030 (advertised only; this client always uses DATA).
    pub chunking: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
    /// RFC 4954 with RFC 4616 PLAIN.
    pub auth_plain: bool,
    /// RFC 4954 with the (non-standard, widely deployed) LOGIN mechanism.
    pub auth_login: bool,
}

impl Capabilities {
    /// Reads the keywords of an EHLO/LHLO reply's text (as in [`crate::Reply::text`]).
    pub fn from_ehlo_text(text: &str) -> Self {
        let mut caps = Capabilities::default();
        // The first line is the server's name and greeting, not a keyword.
        for line in text.split('\n').skip(1) {
            let line = line.trim();
            let (keyword, params) = match line.find([' ', '=']) {
                // "AUTH=PLAIN LOGIN" is the pre-RFC 4954 form some servers still send.
                Some(at) => (&line[..at], line[at + 1..].trim()),
                None => (line, ""),
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(params.parse().unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "CHUNKING" => caps.chunking = true,
                "STARTTLS" => caps.starttls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "AUTH" => {
                    for mechanism in params.split_ascii_whitespace() {
                        match mechanism.to_ascii_uppercase().as_str() {
                            "PLAIN" => caps.auth_plain = true,
                            "LOGIN" => caps.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_parameters_and_case() {
        let caps = Capabilities::from_ehlo_text(
            "mx.example Hello [127.0.0.1]\nPIPELINING\nsize 10240000\n8BITMIME\nSMTPUTF8\n\
             DSN\nCHUNKING\nSTARTTLS\nENHANCEDSTATUSCODES\nAUTH CRAM-MD5 login\nX-UNKNOWN foo",
        );
        assert_eq!(
            caps,
            Capabilities {
                pipelining: true,
                size: Some(10_240_000),
                eight_bit_mime: true,
                smtputf8: true,
                dsn: true,
                chunking: true,
                starttls: true,
                enhanced_status_codes: true,
                auth_plain: false,
                auth_login: true,
            }
        );
    }

    #[test]
    fn greeting_line_is_not_a_keyword_and_old_auth_form_counts() {
        let caps = Capabilities::from_ehlo_text("PIPELINING says hello\nAUTH=PLAIN\nSIZE");
        assert!(!caps.pipelining);
        assert!(caps.auth_plain);
        assert_eq!(caps.size, Some(0));
        assert_eq!(
            Capabilities::from_ehlo_text("only a name"),
            Capabilities::default()
        );
    }
}
