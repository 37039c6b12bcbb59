//! Credentials for SMTP AUTH: a file of `user:PHC-hash[:sender,…]` lines.
//!
//! Hashes are Argon2 PHC strings (`$argon2id$…`), verified with the `argon2` crate (its
//! comparison is constant-time). The file is re-read when it changes on disk. Each user may
//! use the sender addresses (or `@domain`s, or `*` for any address and the null sender)
//! listed after the hash; without a list, only the user name itself when it is an address.
//! Passwords never reach logs.
//!
//! Cost: a check holds the hash's memory cost (`m`, 19 MiB for the hashes `passwd` writes)
//! while it runs. The AUTH guard runs at most [`MAX_CONCURRENT_CHECKS`] at once, and a hash
//! above [`MAX_M_COST_KIB`], [`MAX_T_COST`] or [`MAX_P_COST`] is refused when the file is
//! read, so memory for password checks stays below
//! `MAX_CONCURRENT_CHECKS × MAX_M_COST_KIB` whatever the file or the clients do.

use argon2::{Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Password checks that may run at once (the AUTH guard holds the permits).
pub const MAX_CONCURRENT_CHECKS: usize = 2;
/// Largest Argon2 memory cost accepted, in KiB: OWASP's strongest recommended setting
/// (m=46 MiB, t=1). `passwd` writes m=19 MiB, t=2.
pub const MAX_M_COST_KIB: u32 = 47_104;
/// Largest Argon2 time cost (passes) accepted.
pub const MAX_T_COST: u32 = 10;
/// Largest Argon2 parallelism accepted (the check runs on one thread either way).
pub const MAX_P_COST: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    hash: String,
    /// Exact addresses (lower-case) and `@domain`s this user may send as.
    senders: Vec<String>,
}

/// In a user's sender list: any address, and the null sender.
pub const ANY_SENDER: &str = "*";

impl User {
    /// Whether `address` (MAIL FROM) is one this user may use. The null sender (`""`) is
    /// allowed only with [`ANY_SENDER`]: it names no one, so a user restricted to their own
    /// addresses could otherwise send anonymous mail to anyone (issue 13, item 9). Those
    /// who send bounces or auto-replies through submission get `*`.
    pub fn may_send_as(&self, address: &str) -> bool {
        if self.senders.iter().any(|allowed| allowed == ANY_SENDER) {
            return true;
        }
        if address.is_empty() {
            return false;
        }
        let address = address.to_ascii_lowercase();
        let domain = address.rsplit_once('@').map(|(_, d)| format!("@{d}"));
        if self.senders.is_empty() {
            return address == self.name.to_ascii_lowercase();
        }
        self.senders
            .iter()
            .any(|allowed| *allowed == address || Some(allowed) == domain.as_ref())
    }
}

/// The parsed file.
#[derive(Debug, Default)]
struct Table {
    users: HashMap<String, User>,
}

fn parse(text: &str) -> Result<Table, String> {
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(3, ':');
        let (Some(name), Some(hash)) = (fields.next(), fields.next()) else {
            return Err(format!("line {}: expected user:hash[:senders]", n + 1));
        };
        // PHC strings contain no ':'; a third field lists senders.
        let parsed =
            PasswordHash::new(hash).map_err(|e| format!("line {}: bad hash: {e}", n + 1))?;
        check_cost(&parsed).map_err(|e| format!("line {}: {e}", n + 1))?;
        let senders = fields
            .next()
            .map(|list| {
                list.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        users.insert(
            name.to_owned(),
            User {
                name: name.to_owned(),
                hash: hash.to_owned(),
                senders,
            },
        );
    }
    Ok(Table { users })
}

/// The users file, re-read when its modification time changes.
#[derive(Debug)]
pub struct Users {
    path: PathBuf,
    state: Mutex<(Option<SystemTime>, Table)>,
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let table = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Users {
            path: path.to_owned(),
            state: Mutex::new((modified(path), table)),
        })
    }

    /// The user if `password` is right. Blocking (Argon2 is slow on purpose): call from a
    /// blocking thread.
    pub fn verify(&self, name: &str, password: &str) -> Option<User> {
        let user = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = modified(&self.path);
            if now != state.0 {
                match std::fs::read_to_string(&self.path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| parse(&t))
                {
                    Ok(table) => *state = (now, table),
                    Err(e) => {
                        tracing::error!(file = %self.path.display(), error = %e, "auth: users file not reloaded");
                        state.0 = now;
                    }
                }
            }
            state.1.users.get(name).cloned()
        };
        // Verify against a fixed dummy hash when the user is unknown, so the time taken
        // does not tell whether a user exists.
        let hash = user
            .as_ref()
            .map(|u| u.hash.clone())
            .unwrap_or_else(dummy_hash);
        let parsed = PasswordHash::new(&hash).ok()?;
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        if ok { user } else { None }
    }
}

/// Refuses hashes whose check would cost more than the limits above (a users file line
/// with m=4 GiB would otherwise take 4 GiB per AUTH).
fn check_cost(hash: &PasswordHash) -> Result<(), String> {
    let params = Params::try_from(hash).map_err(|e| format!("bad Argon2 parameters: {e}"))?;
    if params.m_cost() > MAX_M_COST_KIB
        || params.t_cost() > MAX_T_COST
        || params.p_cost() > MAX_P_COST
    {
        return Err(format!(
            "Argon2 cost m={} t={} p={} is above the limit m={MAX_M_COST_KIB} t={MAX_T_COST} \
             p={MAX_P_COST}; set the password again with `petrel-mta passwd`",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn dummy_hash() -> String {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| hash_password("not a real password").unwrap_or_default())
        .clone()
}

/// An Argon2id PHC string for `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let hash: PasswordHash = Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(hash.to_string())
}

/// Adds or replaces `name`'s line in the users file (written to a temporary file and
/// renamed into place).
pub fn set_password(
    path: &Path,
    name: &str,
    password: &str,
    senders: &[String],
) -> Result<(), String> {
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        return Err(format!("{name:?} is not a usable user name"));
    }
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let hash = hash_password(password)?;
    let mut line = format!("{name}:{hash}");
    if !senders.is_empty() {
        line += &format!(":{}", senders.join(","));
    }
    let mut out: Vec<String> = existing
        .lines()
        .filter(|l| l.split(':').next() != Some(name))
        .map(str::to_owned)
        .collect();
    out.push(line);
    let tmp = path.with_extension("tmp");
    // A fresh temporary file, so a leftover one's mode is not kept; 0600 (issue 13, item 8).
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {e}", tmp.display()));
        }
        _ => {}
    }
    let written = crate::files::open_private(
        std::fs::OpenOptions::new().write(true).create_new(true),
        &tmp,
    )
    .and_then(|mut file| {
        use std::io::Write;
        file.write_all((out.join("\n") + "\n").as_bytes())?;
        file.sync_all()
    });
    written.map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_then_verify_and_sender_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("users");
        set_password(&file, "alice@example.test", "s3cret", &[]).expect("set");
        set_password(
            &file,
            "bob",
            "hunter2",
            &["@example.test".into(), "boss@corp.test".into()],
        )
        .expect("set");
        set_password(&file, "bob", "hunter3", &["@example.test".into()]).expect("replace");
        let users = Users::load(&file).expect("load");
        assert!(users.verify("alice@example.test", "wrong").is_none());
        assert!(users.verify("nobody", "s3cret").is_none());
        let alice = users.verify("alice@example.test", "s3cret").expect("alice");
        assert!(alice.may_send_as("Alice@Example.test"));
        assert!(!alice.may_send_as("other@example.test"));
        assert!(users.verify("bob", "hunter2").is_none(), "replaced");
        let bob = users.verify("bob", "hunter3").expect("bob");
        assert!(bob.may_send_as("anyone@example.test"));
        assert!(!bob.may_send_as("boss@corp.test"));
        assert!(!bob.may_send_as(""), "null sender: not without *");
        assert!(!alice.may_send_as(""), "null sender: not without *");
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(!text.contains("hunter"), "only hashes are stored");
    }

    /// Issue 13, item 9: the null sender is a sender like any other, allowed only by `*`.
    #[test]
    fn null_sender_needs_any_sender() {
        let user = |senders: &[&str]| User {
            name: "alice@example.test".to_owned(),
            hash: String::new(),
            senders: senders.iter().map(|s| (*s).to_owned()).collect(),
        };
        let cases: [(&[&str], &str, bool); 8] = [
            (&[], "alice@example.test", true),
            (&[], "", false),
            (&["@example.test"], "", false),
            (&["alice@example.test"], "", false),
            (&["*"], "", true),
            (&["*"], "anyone@elsewhere.test", true),
            (&["@example.test", "*"], "", true),
            (&["@example.test"], "bob@example.test", true),
        ];
        for (senders, address, expected) in cases {
            assert_eq!(
                user(senders).may_send_as(address),
                expected,
                "{senders:?} {address:?}"
            );
        }
    }

    /// Issue 13, item 1: a hash whose check would take absurd memory is refused at load.
    #[test]
    fn costly_hashes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("users");
        let salt = "c2FsdHNhbHRzYWx0c2FsdA";
        let out = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        for (params, ok) in [
            ("m=19456,t=2,p=1", true),
            ("m=47104,t=1,p=1", true),
            ("m=4194304,t=1,p=1", false),
            ("m=19456,t=1000,p=1", false),
            ("m=19456,t=2,p=64", false),
        ] {
            std::fs::write(&file, format!("u:$argon2id$v=19${params}${salt}${out}\n"))
                .expect("write");
            assert_eq!(Users::load(&file).is_ok(), ok, "{params}");
        }
    }
}
