//! Which Nix a daemon or remote store runs: the host's Debian Nix 2.8, or Nix 2.34 from the
//! cached Debian sid chroot that tests/env/sid-chroot.sh builds.
//!
//! Owns: where each version lives and the checks that it is really there.
//!
//! Must never: build or modify the chroot (tests/env/ owns it), or pretend a missing version
//! is fine: `require` panics with what to run.

use std::path::{Path, PathBuf};

/// The cached sid chroot with Nix 2.34.
pub const SID_CHROOT: &str = "/var/cache/nix-lazy-builder/chroot-sid";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Nix {
    /// Nix 2.8 from the host's Debian bookworm `nix-bin`.
    Host,
    /// Nix 2.34 from Debian sid, run chrooted in [`SID_CHROOT`].
    Sid,
}

impl Nix {
    /// The chroot this version runs in, `None` for the host.
    pub fn chroot(self) -> Option<&'static Path> {
        match self {
            Nix::Host => None,
            Nix::Sid => Some(Path::new(SID_CHROOT)),
        }
    }

    /// The root its programs and `/etc` live under (`/` for the host).
    pub fn root(self) -> &'static Path {
        self.chroot().unwrap_or(Path::new("/"))
    }

    /// A host path for a path inside this version's root.
    pub fn host_path(self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    pub fn label(self) -> &'static str {
        match self {
            Nix::Host => "nix-2.8(host)",
            Nix::Sid => "nix-2.34(sid)",
        }
    }

    /// Whether the version is installed and ready (for the chroot: its `.ready` marker exists).
    pub fn available(self) -> bool {
        match self {
            Nix::Host => Path::new("/usr/bin/nix-daemon").exists(),
            Nix::Sid => Path::new(SID_CHROOT).join(".ready").exists(),
        }
    }

    /// Panics with instructions unless the version can run, and unless we are root.
    #[track_caller]
    pub fn require(self) {
        super::require_root();
        for (bin, pkg) in [
            ("/usr/bin/unshare", "util-linux"),
            ("/usr/bin/nsenter", "util-linux"),
        ] {
            super::require_file(bin, pkg);
        }
        match self {
            Nix::Host => {
                super::require_file("/usr/bin/nix-daemon", "nix-bin");
                super::require_file("/bin/busybox", "busybox-static");
                assert!(
                    Path::new("/nix").is_dir(),
                    "/nix does not exist: install nix-bin (it creates /nix/var/nix), the tests bind a temp dir over it"
                );
            }
            Nix::Sid => {
                assert!(
                    self.available(),
                    "the Nix 2.34 chroot is not ready: {SID_CHROOT}/.ready is missing; run tests/env/sid-chroot.sh (tests/env/provision.sh runs it)"
                );
                for bin in ["usr/bin/nix-daemon", "bin/busybox"] {
                    assert!(
                        self.root().join(bin).exists(),
                        "the sid chroot at {SID_CHROOT} has no /{bin}: rebuild it with tests/env/sid-chroot.sh"
                    );
                }
            }
        }
    }
}
