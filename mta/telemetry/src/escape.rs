//! Client- and peer-supplied text in logs: [`Escaped`] writes control characters (CR, LF,
//! ESC, …) as Rust escapes, so a user name like `x\nINFO authenticated user=root` or an
//! ANSI sequence cannot forge a log line or recolour a terminal (issue 13, item 7). Use
//! it for every field whose text came from outside: `user = %Escaped(&name)`.

use std::fmt;

/// Displays its text with every control character escaped (`\n`, `\r`, `\t`, `\u{1b}`);
/// everything else, including non-ASCII letters, is written as is.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        let mut rest = self.0;
        while let Some(at) = rest.find(char::is_control) {
            f.write_str(&rest[..at])?;
            let ch = rest[at..].chars().next().unwrap_or_default();
            for escaped in ch.escape_default() {
                f.write_char(escaped)?;
            }
            rest = &rest[at + ch.len_utf8()..];
        }
        f.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let cases = [
            ("alice@example.test", "alice@example.test"),
            (
                "x\r\n2025-01-01T00:00:00Z  INFO authenticated user=root",
                "x\\r\\n2025-01-01T00:00:00Z  INFO authenticated user=root",
            ),
            ("\u{1b}[31mred\u{1b}[0m", "\\u{1b}[31mred\\u{1b}[0m"),
            ("tab\there\0", "tab\\there\\u{0}"),
            ("jörg\u{85}", "jörg\\u{85}"),
        ];
        for (input, expected) in cases {
            assert_eq!(Escaped(input).to_string(), expected, "{input:?}");
        }
    }
}
