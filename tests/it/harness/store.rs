//! Questions tests ask a store, the same for the local daemon's store and a remote's: is a
//! path valid, its references, its deriver, a derivation's build log, and which entries of the
//! store directory are left over without being valid.
//!
//! Owns: the `nix-store` invocations behind those answers and their parsing.
//!
//! Must never: change a store (queries only), or turn a failed query into an answer: a
//! `nix-store` that fails for any reason other than the question's is a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{CmdOutput, run_command};

/// Store queries, provided for every handle that can run `nix-store` against its store.
pub trait StoreQueries {
    /// A command running `program` inside the store's namespace, against its store.
    fn store_command(&self, program: &str) -> Command;
    /// The host directory that is `/nix` inside the namespace.
    fn host_nix_dir(&self) -> PathBuf;
    /// Limit for one command.
    fn command_timeout(&self) -> Duration;

    /// Runs `program args…` in the namespace against this store.
    #[track_caller]
    fn run_nix(&self, program: &str, args: &[&str]) -> CmdOutput {
        let mut c = self.store_command(program);
        c.args(args);
        run_command(&mut c, None, self.command_timeout())
    }

    /// Runs `nix-store args…`.
    #[track_caller]
    fn nix_store(&self, args: &[&str]) -> CmdOutput {
        self.run_nix("nix-store", args)
    }

    /// The host path of a store path (read outputs without entering the namespace).
    fn host_path(&self, store_path: &str) -> PathBuf {
        let rel = store_path
            .strip_prefix("/nix/")
            .unwrap_or_else(|| panic!("not a /nix path: {store_path}"));
        self.host_nix_dir().join(rel)
    }

    /// The subset of `paths` that is NOT valid. Panics if the query itself fails.
    #[track_caller]
    fn invalid_among(&self, paths: &[String]) -> Vec<String> {
        if paths.is_empty() {
            return Vec::new();
        }
        let mut args = vec!["--check-validity", "--print-invalid"];
        args.extend(paths.iter().map(String::as_str));
        let out = self.nix_store(&args);
        out.assert_success();
        out.stdout_lines()
    }

    /// Whether `path` is a valid store path in this store.
    #[track_caller]
    fn is_valid(&self, path: &str) -> bool {
        self.invalid_among(&[path.to_owned()]).is_empty()
    }

    /// `nix-store -q --references`, sorted.
    #[track_caller]
    fn references(&self, path: &str) -> Vec<String> {
        let out = self.nix_store(&["-q", "--references", path]);
        out.assert_success();
        let mut refs = out.stdout_lines();
        refs.sort();
        refs
    }

    /// `nix-store -q --deriver`; `None` for `unknown-deriver`.
    #[track_caller]
    fn deriver(&self, path: &str) -> Option<String> {
        let out = self.nix_store(&["-q", "--deriver", path]);
        out.assert_success();
        let d = out.stdout.trim().to_owned();
        (d != "unknown-deriver" && !d.is_empty()).then_some(d)
    }

    /// The output paths of a derivation (`nix-store -q --outputs`), in Nix's order.
    #[track_caller]
    fn outputs_of(&self, drv: &str) -> Vec<String> {
        let out = self.nix_store(&["-q", "--outputs", drv]);
        out.assert_success();
        out.stdout_lines()
    }

    /// The stored build log of `drv` (`nix-store -l`); `None` if there is none.
    #[track_caller]
    fn build_log(&self, drv: &str) -> Option<String> {
        let out = self.nix_store(&["-l", drv]);
        if out.success() {
            Some(out.stdout)
        } else if out.stderr.contains("not available") || out.stderr.contains("no build log") {
            None
        } else {
            panic!("nix-store -l failed in an unexpected way:\n{out}")
        }
    }

    /// Every entry of the store directory that is not a valid path, ignoring `*.lock` files,
    /// `*.drv` files and `.links`. Tests assert this is empty: no half-written path may remain.
    #[track_caller]
    fn invalid_leftovers(&self) -> Vec<String> {
        let dir = self.host_nix_dir().join("store");
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("cannot list {}: {e}", dir.display()),
        };
        let names: Vec<String> = entries
            .map(|e| e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock") && !n.ends_with(".drv") && n != ".links")
            .collect();
        // Names that cannot be store paths (temp files) are leftovers without asking Nix,
        // which would reject the whole query.
        let (paths, mut odd): (Vec<String>, Vec<String>) = names
            .into_iter()
            .map(|n| format!("/nix/store/{n}"))
            .partition(|p| looks_like_store_path(p));
        let mut left = self.invalid_among(&paths);
        left.append(&mut odd);
        left.sort();
        left
    }

    /// Reads a file inside a store path, e.g. `read_store_file(out, "input-copy")`.
    #[track_caller]
    fn read_store_file(&self, store_path: &str, rel: &str) -> String {
        let p = self.host_path(store_path).join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
    }

    /// Whether a store path exists on disk at all (valid or not).
    fn exists_on_disk(&self, store_path: &str) -> bool {
        Path::new(&self.host_path(store_path))
            .symlink_metadata()
            .is_ok()
    }
}

/// `/nix/store/<32 nix32 chars>-<name>` with a plausible name.
pub(crate) fn looks_like_store_path(p: &str) -> bool {
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let Some(base) = p.strip_prefix("/nix/store/") else {
        return false;
    };
    let b = base.as_bytes();
    b.len() > 33
        && b[..32].iter().all(|c| NIX32.contains(c))
        && b[32] == b'-'
        && b[33..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(c))
}
