//! Test derivations without nixpkgs: plain `derivation { … builder = "/bin/sh"; }` (busybox in
//! the sandbox). The standard one claims `system = "aarch64-linux"` (the remote's
//! `extra-platforms` lets it build there; the local daemon cannot), has outputs `out` and `dev`,
//! and one x86_64-linux input built locally, so outputs have real references:
//! `out` → {input, dev, out itself}, `dev` → {input}. It prints log lines tests look for.
//! Variants: failing (log lines, then exit N), required features, slow, a large blob.
//!
//! Owns: what the standard derivations do (their scripts, written out by `expr.rs`), the
//! expected log lines and references, and the checks that a build's outputs arrived intact
//! ([`FakeDrvPaths::assert_built`]).
//!
//! Must never: depend on anything outside the sandbox but busybox's `/bin/sh`, or put
//! unchecked strings into a script (names and seeds are restricted to safe characters).

use std::path::PathBuf;

use super::expr::{DrvExpr, rec_set};
use super::store::StoreQueries;
use super::{CmdOutput, LocalDaemon};

/// The expression of the VM tests and P7 (no nixpkgs): `main` builds on aarch64-linux and
/// records `uname -m`, the content and the path of `input`, which is built locally first
/// (`preferLocalBuild`); `main` prints `nlb-vm <name>: building` first.
#[track_caller]
pub fn uname_expr(name: &str) -> String {
    assert_safe(name);
    let input = DrvExpr::local_input(name, &format!("echo payload-of-{name} > $out"));
    let main = DrvExpr::sh(
        name,
        "aarch64-linux",
        &format!(
            "echo 'nlb-vm {name}: building'; uname -m > $out; cat $input >> $out; echo $input >> $out"
        ),
    )
    .inherit("input");
    rec_set(&[("input", &input), ("main", &main)])
}

/// A fake derivation. Build with [`FakeDrv::new`] and the `with_*` methods.
#[derive(Clone, Debug)]
pub struct FakeDrv {
    /// Derivation name (also the expression file's name).
    pub name: String,
    /// `system`; `aarch64-linux` by default.
    pub system: String,
    /// Goes into the outputs and the input, so different seeds give different store paths.
    pub seed: String,
    /// How many `nlb-log` lines the builder prints before doing anything else.
    pub log_lines: u32,
    /// Exit with this code after printing the log lines, producing no outputs.
    pub fail_exit: Option<u8>,
    /// Sleep this long (after the log lines), printing one more line afterwards.
    pub sleep_secs: u32,
    /// `requiredSystemFeatures`.
    pub required_features: Vec<String>,
    /// Size of an extra random file `$out/blob` (0: none).
    pub blob_bytes: u64,
}

impl FakeDrv {
    /// The standard fake aarch64 derivation, named `name` (letters, digits, `-`, `_`, `.`).
    #[track_caller]
    pub fn new(name: &str) -> Self {
        assert_safe(name);
        FakeDrv {
            name: name.to_owned(),
            system: "aarch64-linux".to_owned(),
            seed: "0".to_owned(),
            log_lines: 3,
            fail_exit: None,
            sleep_secs: 0,
            required_features: Vec::new(),
            blob_bytes: 0,
        }
    }

    #[track_caller]
    pub fn with_seed(mut self, seed: &str) -> Self {
        assert_safe(seed);
        self.seed = seed.to_owned();
        self
    }

    #[track_caller]
    pub fn with_system(mut self, system: &str) -> Self {
        assert_safe(system);
        self.system = system.to_owned();
        self
    }

    /// Prints the log lines, then exits `code` (must be non-zero).
    #[track_caller]
    pub fn failing(mut self, code: u8) -> Self {
        assert_ne!(code, 0, "a failing build needs a non-zero exit code");
        self.fail_exit = Some(code);
        self
    }

    pub fn with_log_lines(mut self, n: u32) -> Self {
        self.log_lines = n;
        self
    }

    pub fn slow(mut self, secs: u32) -> Self {
        self.sleep_secs = secs;
        self
    }

    #[track_caller]
    pub fn with_features(mut self, features: &[&str]) -> Self {
        for f in features {
            assert_safe(f);
        }
        self.required_features = features.iter().map(|f| (*f).to_owned()).collect();
        self
    }

    pub fn with_blob(mut self, bytes: u64) -> Self {
        self.blob_bytes = bytes;
        self
    }

    /// The lines the builder prints (each appears in the build log), in order. A failing
    /// build prints these and then its failure line ([`FakeDrv::failure_line`]).
    pub fn expected_log_lines(&self) -> Vec<String> {
        let mut v: Vec<String> = (1..=self.log_lines)
            .map(|i| format!("nlb-log {}: line {i} of {}", self.name, self.log_lines))
            .collect();
        if self.sleep_secs > 0 {
            v.push(format!(
                "nlb-log {}: slept {} s",
                self.name, self.sleep_secs
            ));
        }
        if self.fail_exit.is_none() {
            v.push(format!("nlb-log {}: done", self.name));
        }
        v
    }

    /// The last line a failing build prints.
    pub fn failure_line(&self) -> Option<String> {
        self.fail_exit
            .map(|c| format!("nlb-log {}: failing with exit code {c}", self.name))
    }

    /// The text of the input's single file.
    pub fn input_payload(&self) -> String {
        format!("input-payload {} {}", self.name, self.seed)
    }

    /// The Nix expression: an attribute set `{ input; main; }`.
    pub fn expr(&self) -> String {
        let mut script = String::from("set -e\n");
        for line in self.expected_log_lines() {
            if line.ends_with(": done") {
                continue;
            }
            if line.contains(": slept ") {
                script += &format!("sleep {}\n", self.sleep_secs);
            }
            script += &format!("echo '{line}'\n");
        }
        if let Some(line) = self.failure_line() {
            script += &format!("echo '{line}' >&2\nexit {}\n", self.fail_exit.unwrap_or(1));
        }
        script += "mkdir $out $dev\n";
        script += "echo $input > $out/input-ref\n";
        script += "cat $input > $out/input-copy\n";
        script += "echo $dev > $out/dev-ref\n";
        script += "echo $out > $out/self-ref\n";
        script += &format!("echo '{}' > $out/seed\n", self.seed);
        if self.blob_bytes > 0 {
            script += &format!("head -c {} /dev/urandom > $out/blob\n", self.blob_bytes);
        }
        script += "echo $input > $dev/input-ref\n";
        script += &format!("echo 'nlb-log {}: done'\n", self.name);

        let input = DrvExpr::local_input(
            &self.name,
            &format!(
                "echo 'nlb-log {}-input: building'; echo '{}' > $out",
                self.name,
                self.input_payload()
            ),
        );
        let mut main = DrvExpr::sh(&self.name, &self.system, &script)
            .outputs(&["out", "dev"])
            .inherit("input");
        if !self.required_features.is_empty() {
            let features: Vec<&str> = self.required_features.iter().map(String::as_str).collect();
            main = main.features(&features);
        }
        rec_set(&[("input", &input), ("main", &main)])
    }

    /// Writes the expression into the daemon's work dir and instantiates it.
    #[track_caller]
    pub fn instantiate(&self, daemon: &LocalDaemon) -> FakeDrvPaths {
        let file = daemon.write_file(&format!("{}.nix", self.name), &self.expr());
        let f = file.to_string_lossy().into_owned();
        let drv_of = |attr: &str| {
            let out = daemon.nix_instantiate(&[&f, "-A", attr]);
            out.assert_success();
            out.stdout.trim().to_owned()
        };
        let input_drv = drv_of("input");
        let drv = drv_of("main");
        let input_out = single(daemon.outputs_of(&input_drv), &input_drv);
        let outs = daemon.outputs_of(&drv);
        // `nix-store -q --outputs` lists outputs sorted by name: dev, out.
        let (mut dev, mut out) = (None, None);
        for o in outs {
            if o.ends_with("-dev") {
                dev = Some(o);
            } else {
                out = Some(o);
            }
        }
        let (Some(out), Some(dev)) = (out, dev) else {
            panic!("{drv} does not have the outputs out and dev");
        };
        FakeDrvPaths {
            drv_spec: self.clone(),
            file,
            drv,
            out,
            dev,
            input_drv,
            input_out,
        }
    }

    /// Builds only the x86_64 input, locally (`--max-jobs 1`, so it works even when the
    /// daemon's `max-jobs` is 0), and returns the instantiated paths.
    #[track_caller]
    pub fn build_input(&self, daemon: &LocalDaemon) -> FakeDrvPaths {
        let paths = self.instantiate(daemon);
        let f = paths.file.to_string_lossy().into_owned();
        daemon
            .nix_build(&[&f, "-A", "input", "--max-jobs", "1"])
            .assert_success();
        paths
    }

    /// `nix-build FILE -A main.out -A main.dev extra…` (both outputs wanted); does not assert.
    #[track_caller]
    pub fn build(&self, daemon: &LocalDaemon, extra: &[&str]) -> (FakeDrvPaths, CmdOutput) {
        let paths = self.instantiate(daemon);
        let f = paths.file.to_string_lossy().into_owned();
        let mut args = vec![f.as_str(), "-A", "main.out", "-A", "main.dev"];
        args.extend_from_slice(extra);
        let out = daemon.nix_build(&args);
        (paths, out)
    }
}

/// The store paths of an instantiated [`FakeDrv`].
#[derive(Clone, Debug)]
pub struct FakeDrvPaths {
    pub drv_spec: FakeDrv,
    /// The expression file.
    pub file: PathBuf,
    /// The aarch64 derivation.
    pub drv: String,
    pub out: String,
    pub dev: String,
    pub input_drv: String,
    pub input_out: String,
}

impl FakeDrvPaths {
    /// `out`'s expected references: input, dev, itself (sorted).
    pub fn expected_out_refs(&self) -> Vec<String> {
        let mut v = vec![self.input_out.clone(), self.dev.clone(), self.out.clone()];
        v.sort();
        v
    }

    /// `dev`'s expected references: input.
    pub fn expected_dev_refs(&self) -> Vec<String> {
        vec![self.input_out.clone()]
    }

    /// Asserts a successful build in `store`: both outputs valid with the right references and
    /// deriver, their files intact, and (when `check_log`) every log line in `nix-store -l`.
    #[track_caller]
    pub fn assert_built(&self, store: &impl StoreQueries, check_log: bool) {
        for p in [&self.out, &self.dev] {
            assert!(store.is_valid(p), "{p} is not valid");
            assert_eq!(
                store.deriver(p).as_deref(),
                Some(self.drv.as_str()),
                "deriver of {p}"
            );
        }
        assert_eq!(
            store.references(&self.out),
            self.expected_out_refs(),
            "references of {}",
            self.out
        );
        assert_eq!(
            store.references(&self.dev),
            self.expected_dev_refs(),
            "references of {}",
            self.dev
        );
        let line = |rel: &str| store.read_store_file(&self.out, rel).trim().to_owned();
        assert_eq!(line("input-ref"), self.input_out);
        assert_eq!(line("input-copy"), self.drv_spec.input_payload());
        assert_eq!(line("dev-ref"), self.dev);
        assert_eq!(line("self-ref"), self.out);
        assert_eq!(line("seed"), self.drv_spec.seed);
        assert_eq!(
            store.read_store_file(&self.dev, "input-ref").trim(),
            self.input_out
        );
        if self.drv_spec.blob_bytes > 0 {
            let len = std::fs::metadata(store.host_path(&self.out).join("blob"))
                .map(|m| m.len())
                .unwrap_or_else(|e| panic!("{}/blob: {e}", self.out));
            assert_eq!(len, self.drv_spec.blob_bytes, "size of {}/blob", self.out);
        }
        if check_log {
            self.assert_log(store);
        }
    }

    /// Asserts every expected log line (and the failure line, for a failing drv) is in the
    /// stored build log of the derivation.
    #[track_caller]
    pub fn assert_log(&self, store: &impl StoreQueries) {
        let log = store
            .build_log(&self.drv)
            .unwrap_or_else(|| panic!("no build log stored for {}", self.drv));
        let mut want = self.drv_spec.expected_log_lines();
        want.extend(self.drv_spec.failure_line());
        for l in want {
            assert!(
                log.lines().any(|x| x.trim_end() == l),
                "log of {} lacks {l:?}; it is:\n{log}",
                self.drv
            );
        }
    }
}

#[track_caller]
fn single(mut v: Vec<String>, what: &str) -> String {
    assert_eq!(v.len(), 1, "{what}: expected one output, got {v:?}");
    v.remove(0)
}

#[track_caller]
fn assert_safe(s: &str) {
    assert!(
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b)),
        "unsafe name for a test derivation: {s:?} (letters, digits, - _ . + only)"
    );
}
