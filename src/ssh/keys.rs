//! The client's identities: loading an unencrypted private key file, and the calling user's
//! default key files when none is configured.
//!
//! Never logs or returns a key's contents (not in an error either) and never prompts: an
//! encrypted key is an error. A key file others may read is refused, as OpenSSH refuses it.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use russh::keys::{Algorithm, PrivateKey};

use super::SshErrorKind;

/// The most of a key file that is read: real private keys are a few KiB (RSA 16384: ~13 KiB).
const MAX_KEY_FILE: u64 = 256 * 1024;

/// What a key file that is not a private key at all is told.
const NOT_A_KEY: &str = "not an OpenSSH private key (expected a text file that starts with \
                         `-----BEGIN OPENSSH PRIVATE KEY-----`)";

/// Loads an unencrypted private key (OpenSSH format; PEM/PKCS#8 also work). Never logs or
/// returns the key's contents in an error. Like OpenSSH, refuses a key file owned by the caller
/// that its group or others may access (mode & 077).
pub fn load_identity(path: &Path) -> Result<PrivateKey, SshErrorKind> {
    let unreadable = |source| SshErrorKind::KeyFileUnreadable {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    let mode = meta.mode() & 0o777;
    if meta.uid() == rustix::process::getuid().as_raw() && mode & 0o077 != 0 {
        return Err(SshErrorKind::KeyFileTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let unsupported = |reason: String| SshErrorKind::KeyFileUnsupported {
        path: path.to_owned(),
        reason,
    };
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(unsupported(format!(
            "{NOT_A_KEY}: it is larger than {} KiB",
            MAX_KEY_FILE / 1024
        )));
    }
    // Binary junk (a public key's .pub is text; a random or truncated file is not).
    let text = String::from_utf8(bytes).map_err(|_| unsupported(NOT_A_KEY.to_owned()))?;
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
        return Err(unsupported(NOT_A_KEY.to_owned()));
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
        write_private(&junk, b"SECRET-MATERIAL-not-a-key");
        let e = load_identity(&junk).unwrap_err();
        assert!(matches!(e, SshErrorKind::KeyFileUnsupported { .. }));
        assert!(!e.to_string().contains("SECRET"), "{e}");
        assert!(e.to_string().contains("not an OpenSSH private key"), "{e}");
        // Binary junk says the same, not "stream did not contain valid UTF-8".
        let binary = dir.path().join("binary");
        write_private(&binary, b"\xff\xfe\x00SECRET\x80");
        let e = load_identity(&binary).unwrap_err();
        assert!(
            e.to_string()
                .ends_with(&format!("{}: {NOT_A_KEY}", binary.display())),
            "{e}"
        );
        assert!(!e.to_string().contains("UTF-8"), "{e}");
    }

    fn write_private(path: &Path, bytes: &[u8]) {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
    }

    #[test]
    fn a_key_others_can_read_is_refused_as_openssh_does() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        let k = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            &[7; 32],
        ));
        write_private(
            &key,
            k.to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .unwrap()
                .as_bytes(),
        );
        assert!(load_identity(&key).is_ok());
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_identity(&key).unwrap_err();
            assert!(
                matches!(e, SshErrorKind::KeyFileTooOpen { mode: m, .. } if m == mode),
                "{e}"
            );
            assert!(
                e.to_string()
                    .contains(&format!("permissions 0{mode:o}, which are too open")),
                "{e}"
            );
        }
        // Read-only for its owner is fine, as for OpenSSH.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_identity(&key).is_ok());
    }
}
