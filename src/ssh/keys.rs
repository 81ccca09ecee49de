//! The client's identities: loading an unencrypted private key file, and the calling user's
//! default key files when none is configured.
//!
//! Never logs or returns a key's contents (not in an error either) and never prompts: an
//! encrypted key is an error.

use std::path::{Path, PathBuf};

use russh::keys::{Algorithm, PrivateKey};

use super::SshErrorKind;

/// Loads an unencrypted private key (OpenSSH format; PEM/PKCS#8 also work). Never logs or
/// returns the key's contents in an error.
pub fn load_identity(path: &Path) -> Result<PrivateKey, SshErrorKind> {
    let text = std::fs::read_to_string(path).map_err(|source| SshErrorKind::KeyFileUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let unsupported = |reason: String| SshErrorKind::KeyFileUnsupported {
        path: path.to_owned(),
        reason,
    };
    let key = if text.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let key = PrivateKey::from_openssh(text.trim())
            .map_err(|e| unsupported(format!("cannot parse OpenSSH private key: {e}")))?;
        if key.is_encrypted() {
            return Err(SshErrorKind::KeyFileEncrypted {
                path: path.to_owned(),
            });
        }
        key
    } else if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(SshErrorKind::KeyFileEncrypted {
            path: path.to_owned(),
        });
    } else if text.contains("PRIVATE KEY-----") {
        russh::keys::decode_secret_key(&text, None).map_err(|e| match e {
            russh::keys::Error::KeyIsEncrypted => SshErrorKind::KeyFileEncrypted {
                path: path.to_owned(),
            },
            other => unsupported(format!("cannot parse private key: {other}")),
        })?
    } else {
        return Err(unsupported(
            "not a private key file (expected `-----BEGIN OPENSSH PRIVATE KEY-----`)".into(),
        ));
    };
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. } => Ok(key),
        other => Err(unsupported(format!(
            "key type {} is not supported (use ed25519, ecdsa or rsa)",
            other.as_str()
        ))),
    }
}

/// The calling user's default identities that exist (`~/.ssh/id_ed25519`, `id_ecdsa`,
/// `id_rsa`), as OpenSSH would try them when no key is configured.
pub fn default_identities() -> Vec<PathBuf> {
    let Some(home) = std::env::var_os("HOME") else {
        return Vec::new();
    };
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|n| Path::new(&home).join(".ssh").join(n))
        .filter(|p| p.is_file())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_errors_do_not_leak_contents() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            load_identity(&missing),
            Err(SshErrorKind::KeyFileUnreadable { .. })
        ));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "SECRET-MATERIAL-not-a-key").unwrap();
        let e = load_identity(&junk).unwrap_err();
        assert!(matches!(e, SshErrorKind::KeyFileUnsupported { .. }));
        assert!(!e.to_string().contains("SECRET"), "{e}");
    }
}
