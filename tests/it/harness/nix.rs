//! Which Nix a daemon or remote store runs: the host's Debian Nix 2.8, Nix 2.26 from the cached
//! Debian trixie chroot, or Nix 2.34 from the cached Debian sid chroot (tests/env/chroot.sh
//! builds both), and what each version needs to be told differently.
//!
//! Owns: where each version lives, the checks that it is really there, and the per-version
//! facts the harness acts on (how `build-hook` must be set, whether Nix's own hook takes a port
//! from the URI, the version string each one reports).
//!
//! Must never: build or modify a chroot (tests/env/ owns them), or pretend a missing version
//! is fine: `require` panics with what to run.

use std::path::{Path, PathBuf};

/// The cached trixie chroot with Nix 2.26.
pub const TRIXIE_CHROOT: &str = "/var/cache/nix-lazy-builder/chroot-trixie";
/// The cached sid chroot with Nix 2.34.
pub const SID_CHROOT: &str = "/var/cache/nix-lazy-builder/chroot-sid";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Nix {
    /// Nix 2.8 from the host's Debian bookworm `nix-bin`.
    Host,
    /// Nix 2.26 from Debian trixie, run chrooted in [`TRIXIE_CHROOT`].
    Trixie,
    /// Nix 2.34 from Debian sid, run chrooted in [`SID_CHROOT`].
    Sid,
}

impl Nix {
    /// The chroot this version runs in, `None` for the host.
    pub fn chroot(self) -> Option<&'static Path> {
        match self {
            Nix::Host => None,
            Nix::Trixie => Some(Path::new(TRIXIE_CHROOT)),
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
            Nix::Trixie => "nix-2.26(trixie)",
            Nix::Sid => "nix-2.34(sid)",
        }
    }

    /// The short version, `2.8`, `2.26` or `2.34`, for case names and reports.
    pub fn short(self) -> &'static str {
        match self {
            Nix::Host => "2.8",
            Nix::Trixie => "2.26",
            Nix::Sid => "2.34",
        }
    }

    /// What `nix-store --version` prints for this version, up to the patch number:
    /// `(Nix) 2.8.`, `(Nix) 2.26.`, `(Nix) 2.34.`.
    pub fn version_marker(self) -> String {
        format!("(Nix) {}.", self.short())
    }

    /// Whether this nix-daemon replaces a `build-hook` set in nix.conf with its built-in default
    /// (every release 2.25.0 through 2.33.x; NixOS/nix#15083, fixed in 2.34.0). Such a daemon
    /// must be given the hook through `NIX_CONFIG` in its environment.
    pub fn ignores_build_hook_in_nix_conf(self) -> bool {
        matches!(self, Nix::Trixie)
    }

    /// Whether this version's own build hook takes the ssh port from the store URI
    /// (`ssh://root@127.0.0.1:PORT`). 2.8 and 2.26 do not: they want `NIX_SSHOPTS="-p PORT"`.
    pub fn own_hook_takes_port_in_uri(self) -> bool {
        matches!(self, Nix::Sid)
    }

    /// Whether `build-hook` is one path here (2.8) rather than a command line (`<bin> hook`).
    pub fn build_hook_is_one_path(self) -> bool {
        matches!(self, Nix::Host)
    }

    /// Whether the version is installed and ready (for a chroot: its `.ready` marker exists).
    pub fn available(self) -> bool {
        match self.chroot() {
            None => Path::new("/usr/bin/nix-daemon").exists(),
            Some(root) => root.join(".ready").exists(),
        }
    }

    /// The Debian suite of a chroot version, as tests/env/chroot.sh takes it.
    fn suite(self) -> &'static str {
        match self {
            Nix::Host => "bookworm",
            Nix::Trixie => "trixie",
            Nix::Sid => "sid",
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
        match self.chroot() {
            None => {
                super::require_file("/usr/bin/nix-daemon", "nix-bin");
                super::require_file("/bin/busybox", "busybox-static");
                assert!(
                    Path::new("/nix").is_dir(),
                    "/nix does not exist: install nix-bin (it creates /nix/var/nix), the tests bind a temp dir over it"
                );
            }
            Some(root) => {
                let suite = self.suite();
                assert!(
                    self.available(),
                    "the {} chroot is not ready: {}/.ready is missing; run tests/env/chroot.sh {suite} (tests/env/provision.sh runs it)",
                    self.label(),
                    root.display()
                );
                for bin in ["usr/bin/nix-daemon", "bin/busybox"] {
                    assert!(
                        root.join(bin).exists(),
                        "the {suite} chroot at {} has no /{bin}: rebuild it with tests/env/chroot.sh {suite}",
                        root.display()
                    );
                }
            }
        }
    }
}
