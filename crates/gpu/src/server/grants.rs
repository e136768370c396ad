//! A region GPU server's admission: the credentials of the vGPUs attached
//! on it, by hash, as the region lists them.
//!
//! A credential reads `vg1_SERVER_ATTACHMENT_SECRET` (the region makes
//! them: `softcard_region::service::vgpus::vgpu_credential`): the names
//! let the server say why it refuses one meant for another server, and
//! only the whole string, by its SHA-256, admits anything.

use std::collections::HashMap;
use std::sync::RwLock;

use sha2::Digest;

use super::{Admission, Grant};

/// The longest credential looked at.
const MAX_CREDENTIAL: usize = 256;

/// The server and attachment a credential names, or why it is malformed.
pub fn parse_credential(c: &str) -> Result<(&str, &str), String> {
    const SHAPE: &str = "expected vg1_SERVER_ATTACHMENT_SECRET";
    if c.len() > MAX_CREDENTIAL {
        return Err(format!("malformed credential: too long ({SHAPE})"));
    }
    let mut parts = c.splitn(4, '_');
    let (Some("vg1"), Some(server), Some(attachment), Some(secret)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed credential ({SHAPE})"));
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !name_ok(server) || !name_ok(attachment) {
        return Err(format!("malformed credential: bad names ({SHAPE})"));
    }
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(
            "malformed credential: the secret is not 64 hex digits (truncated?)".to_string(),
        );
    }
    Ok((server, attachment))
}

/// The hash a credential is listed under.
pub fn credential_hash(c: &str) -> String {
    let d = sha2::Sha256::digest(c.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// What GPU server `server` admits.
#[derive(Debug)]
pub struct Grants {
    server: String,
    by_hash: RwLock<HashMap<String, Grant>>,
}

impl Grants {
    /// No grants yet, for GPU server `server` (its name in the region).
    pub fn new(server: &str) -> Self {
        Self {
            server: server.to_owned(),
            by_hash: RwLock::default(),
        }
    }

    /// Replaces the grants (credential hash -> grant); returns the
    /// attachments that are gone, whose sessions the caller ends.
    pub fn set(&self, next: HashMap<String, Grant>) -> Vec<String> {
        let mut g = self.by_hash.write().unwrap_or_else(|p| p.into_inner());
        let gone = g
            .values()
            .filter(|old| !next.values().any(|n| n.attachment == old.attachment))
            .map(|old| old.attachment.clone())
            .collect();
        *g = next;
        gone
    }
}

impl Admission for Grants {
    fn admit(&self, credential: Option<&str>) -> Result<Grant, String> {
        let c = credential
            .ok_or("no credential: this GPU server admits only a vGPU attachment's credential")?;
        let (server, attachment) = parse_credential(c)?;
        if server != self.server {
            return Err(format!(
                "the credential is for GPU server {server}, this is {}",
                self.server
            ));
        }
        self.by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&credential_hash(c))
            .filter(|g| g.attachment == attachment)
            .cloned()
            .ok_or_else(|| format!("unknown or revoked credential for attachment {attachment}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(server: &str, a: &str, fill: char) -> String {
        format!("vg1_{server}_{a}_{}", fill.to_string().repeat(64))
    }

    #[test]
    fn admits_exactly_the_listed_credentials_of_this_server() {
        let g = Grants::new("gpu-a");
        let good = cred("gpu-a", "egpu-1", 'a');
        let grant = Grant {
            attachment: "egpu-1".into(),
            quota: 1 << 30,
        };
        assert!(g
            .set(HashMap::from([(credential_hash(&good), grant.clone())]))
            .is_empty());
        assert_eq!(g.admit(Some(&good)), Ok(grant));
        let why = |c: Option<&str>| g.admit(c).unwrap_err();
        assert!(why(None).contains("no credential"));
        assert!(why(Some(&cred("gpu-b", "egpu-1", 'a'))).contains("for GPU server gpu-b"));
        assert!(why(Some(&cred("gpu-a", "egpu-1", 'b'))).contains("unknown or revoked"));
        // A listed secret presented under another attachment's name.
        assert!(why(Some(&cred("gpu-a", "egpu-2", 'a'))).contains("unknown or revoked"));
        assert!(why(Some(&good[..good.len() - 1])).contains("truncated"));
        assert!(why(Some("sc_0000")).contains("malformed"));
        assert!(why(Some(&"x".repeat(10_000))).contains("too long"));
        // Revoked: gone from the list, and reported as gone.
        assert_eq!(g.set(HashMap::new()), vec!["egpu-1".to_string()]);
        assert!(why(Some(&good)).contains("unknown or revoked"));
    }
}
