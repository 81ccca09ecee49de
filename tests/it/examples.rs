//! The examples and the command line's own documentation, checked as far as this machine allows.
//!
//! - The NixOS and nix-darwin modules are evaluated with nixpkgs' real `lib.evalModules`
//!   against the stub option declarations in examples/test/stubs (this repository's own, with
//!   NixOS', nixpkgs' and nix-darwin's types), whenever a nixpkgs `lib` is on NIX_PATH
//!   (`nixpkgs-lib=…` or `nixpkgs=…`); every output is forced, the scripts they generate run
//!   here (keys, the runner wrapper around a stand-in runner, man pages), and the TOML they
//!   write goes through the real config loader (`status --config`). Without a `lib` the test
//!   says so on stderr, uncaptured, and checks only that the files parse.
//! - The TOML shown in the README files is accepted by the real config loader, the scripts are
//!   valid shell, and the service units run a subcommand the binary really has.
//! - `completions`, `man`, `help` and the `--help` texts, from the real binary.
//!
//! Never: fetch nixpkgs (a `lib` is used only if the machine has one), or write outside the
//! test's temporary directories.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix_lazy_builder::config::Config;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nix-lazy-builder")
}

fn nix_lazy_builder(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` to its end; unless it exits 0, panics with `what` went wrong and all it printed.
#[track_caller]
fn run_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Says something the test run must show even when the test passes (libtest captures only
/// the print macros, not writes to the stderr handle).
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn nix_parse(file: &Path) {
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nix-instantiate (install nix-bin): {e}"));
    assert!(
        out.status.success(),
        "{} does not parse: {}",
        file.display(),
        text(&out.stderr)
    );
}

/// Every .nix file under `dir`.
fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            nix_files(&p, found);
        } else if p.extension().is_some_and(|x| x == "nix") {
            found.push(p);
        }
    }
}

#[test]
fn nix_files_parse() {
    let mut files = Vec::new();
    nix_files(&repo().join("examples"), &mut files);
    assert!(files.len() >= 12, "too few .nix files found: {files:?}");
    for f in &files {
        nix_parse(f);
    }
    // The check can fail: a broken module is refused.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.nix");
    std::fs::write(&bad, "{ config, ... }: { services = ; }").unwrap();
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

// ------------------------------------------------------------------------------------------
// Evaluating the modules.

/// A nixpkgs `lib` directory on NIX_PATH: `<nixpkgs-lib>` (a nixpkgs.lib checkout, or a `lib`
/// directory itself), else `<nixpkgs/lib>`.
fn nixpkgs_lib() -> Option<PathBuf> {
    let find = |entry: &str| -> Option<PathBuf> {
        let out = Command::new("nix-instantiate")
            .args(["--find-file", entry])
            .output()
            .unwrap_or_else(|e| panic!("cannot run nix-instantiate (install nix-bin): {e}"));
        out.status
            .success()
            .then(|| PathBuf::from(text(&out.stdout).trim()))
    };
    let is_lib = |p: &Path| p.join("modules.nix").is_file() && p.join("default.nix").is_file();
    if let Some(p) = find("nixpkgs-lib") {
        for c in [p.join("lib"), p.clone()] {
            if is_lib(&c) {
                return Some(c);
            }
        }
    }
    find("nixpkgs/lib").filter(|p| is_lib(p))
}

/// One evaluated case of examples/test/eval.nix, with the directories it points at.
struct Eval {
    case: String,
    _dir: tempfile::TempDir,
    data: PathBuf,
    store: PathBuf,
    pkg: PathBuf,
    out: Value,
}

impl Eval {
    fn new(lib: &Path, case: &str) -> Eval {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = dir.path().join("store");
        let pkg = dir.path().join("pkg");
        std::fs::create_dir_all(pkg.join("bin")).unwrap();
        std::fs::create_dir_all(&store).unwrap();
        std::os::unix::fs::symlink(bin(), pkg.join("bin/nix-lazy-builder")).unwrap();
        let out = run_ok(
            Command::new("nix-instantiate")
                .args(["--eval", "--strict", "--json"])
                .arg(repo().join("examples/test/eval.nix"))
                .args(["--argstr", "case", case, "--argstr", "dataDir"])
                .arg(&data)
                .args(["--argstr", "package"])
                .arg(&pkg)
                .env("NLB_NIXPKGS_LIB", lib)
                .env("NLB_FAKE_STORE", &store),
            &format!("evaluating case {case} failed:\n"),
        );
        let out = serde_json::from_slice(&out.stdout).unwrap();
        Eval {
            case: case.to_owned(),
            _dir: dir,
            data,
            store,
            pkg,
            out,
        }
    }

    fn get(&self, pointer: &str) -> &Value {
        self.out
            .pointer(pointer)
            .unwrap_or_else(|| panic!("case {}: no {pointer} in {:#}", self.case, self.out))
    }

    fn str(&self, pointer: &str) -> &str {
        self.get(pointer)
            .as_str()
            .unwrap_or_else(|| panic!("case {}: {pointer} is not a string", self.case))
    }

    fn assert_clean(&self) {
        assert_eq!(
            self.get("/failedAssertions"),
            &Value::Array(vec![]),
            "{}",
            self.case
        );
        assert_eq!(
            self.get("/warnings"),
            &Value::Array(vec![]),
            "{}",
            self.case
        );
    }

    /// `build-hook` in nix.conf and in the daemon's NIX_CONFIG, which every daemon reads: the
    /// package's `bin/nix-lazy-builder` followed by `args`.
    #[track_caller]
    fn assert_build_hook(&self, args: &str) {
        let hook = format!("{}/bin/nix-lazy-builder{args}", self.pkg.display());
        assert_eq!(self.str("/buildHook"), hook, "case {}", self.case);
        assert_eq!(
            self.str("/daemonEnvironment/NIX_CONFIG"),
            format!("build-hook = {hook}"),
            "case {}",
            self.case
        );
    }

    /// Writes every generated script and file under the fake store and runs the build
    /// commands (as nixpkgs' runCommand would, with `$out` set), in the order eval.nix gives.
    fn materialize(&self) {
        for f in self.get("/files").as_array().unwrap() {
            let path = Path::new(f["path"].as_str().unwrap());
            assert!(
                path.starts_with(&self.store),
                "{} outside the fake store",
                path.display()
            );
            let body = f["text"].as_str().unwrap();
            match f["kind"].as_str().unwrap() {
                "file" => std::fs::write(path, body).unwrap(),
                "script" => {
                    std::fs::write(path, body).unwrap();
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
                    run_ok(
                        Command::new("bash").arg("-n").arg(path),
                        &format!("{} is not valid bash", path.display()),
                    );
                }
                "dir" => {
                    run_ok(
                        Command::new("bash")
                            .args(["-euo", "pipefail", "-c", body])
                            .env("out", path),
                        &format!("building {} failed", path.display()),
                    );
                }
                k => panic!("unknown kind {k}"),
            }
        }
    }

    /// The TOML the module writes, converted from the value as nixpkgs' formats.toml does (a
    /// null, which TOML cannot hold, fails here as it fails there).
    fn toml(&self) -> PathBuf {
        let value: toml::Value = toml::Value::try_from(self.get("/toml").clone())
            .unwrap_or_else(|e| panic!("case {}: the TOML value does not convert: {e}", self.case));
        let file = self.data.join("lazy-builder.toml");
        std::fs::create_dir_all(&self.data).unwrap();
        std::fs::write(&file, toml::to_string(&value).unwrap()).unwrap();
        file
    }

    /// `nix-lazy-builder status --config FILE` must accept the generated TOML.
    fn status(&self, toml: &Path) -> String {
        let generated = std::fs::read_to_string(toml).unwrap();
        let out = run_ok(
            Command::new(bin()).arg("status").arg("--config").arg(toml),
            &format!(
                "case {}: status --config refuses the generated TOML\n{generated}\n",
                self.case
            ),
        );
        text(&out.stdout)
    }

    /// Runs a generated bash fragment (a unit's preStart, an activation script).
    fn run_fragment(&self, what: &str, script: &str) {
        run_ok(
            Command::new("bash").args(["-euo", "pipefail", "-c", script]),
            &format!("case {}: {what} failed\n{script}\n", self.case),
        );
    }

    /// Starts a runner wrapper the way the supervisor does: in a state directory, with the
    /// builder's `environment`, QEMU_OPTS and QEMU_NET_OPTS, and an inherited TMPDIR. The
    /// runner behind it is the stand-in (it writes QEMU's arguments instead of running QEMU).
    fn run_runner(&self, builder: &str) -> RunnerRun {
        let runner = self
            .str(&format!("/toml/builders/{builder}/boot/runner"))
            .to_owned();
        let cwd = self.data.join("state").join(builder);
        let outer_tmp = self.data.join("outer-tmp");
        std::fs::create_dir_all(&cwd).unwrap();
        std::fs::create_dir_all(&outer_tmp).unwrap();
        let args_file = self.data.join(format!("{builder}.qemu-args"));
        let mut cmd = Command::new(&runner);
        cmd.current_dir(&cwd)
            .env("TMPDIR", &outer_tmp)
            .env("NLB_STUB_QEMU_ARGS", &args_file)
            .env("QEMU_OPTS", "-chardev socket,id=nlbqmp,path=/x/qmp.sock,server=on,wait=off -mon chardev=nlbqmp,mode=control")
            .env("QEMU_NET_OPTS", "hostfwd=tcp:127.0.0.1:0-:22");
        let env = self.get(&format!("/toml/builders/{builder}/boot/environment"));
        for (k, v) in env.as_object().unwrap() {
            cmd.env(k, v.as_str().unwrap());
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "case {}: the runner {runner} failed: {}{}",
            self.case,
            text(&out.stdout),
            text(&out.stderr)
        );
        let leaked: Vec<_> = std::fs::read_dir(&outer_tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            leaked.is_empty(),
            "case {}: the runner left {leaked:?} in the TMPDIR it was started with",
            self.case
        );
        RunnerRun {
            args: std::fs::read_to_string(&args_file)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect(),
            output: text(&out.stdout) + &text(&out.stderr),
        }
    }
}

struct RunnerRun {
    /// The arguments QEMU would have got.
    args: Vec<String>,
    output: String,
}

impl RunnerRun {
    fn has(&self, arg: &str) -> bool {
        self.args.iter().any(|a| a == arg)
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The man pages and completions the modules install were rendered by the real binary.
fn check_docs(ev: &Eval) {
    let docs = ev
        .get("/systemPackages")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| PathBuf::from(v.as_str().unwrap()))
        .find(|p| p.to_string_lossy().ends_with("-nix-lazy-builder-docs"))
        .expect("the docs package is installed");
    for page in [
        "nix-lazy-builder.1",
        "nix-lazy-builder-status.1",
        "nix-lazy-builder-doctor.1",
    ] {
        let p = docs.join("share/man/man1").join(page);
        let t = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(t.contains(".TH"), "{page} is not a man page");
    }
    for c in [
        "share/bash-completion/completions/nix-lazy-builder",
        "share/zsh/site-functions/_nix-lazy-builder",
        "share/fish/vendor_completions.d/nix-lazy-builder.fish",
    ] {
        let t = std::fs::read_to_string(docs.join(c)).unwrap();
        assert!(
            t.contains("doctor"),
            "{c} does not complete the subcommands"
        );
    }
}

fn eval_nixos(lib: &Path) {
    let ev = Eval::new(lib, "nixos");
    ev.assert_clean();
    // 5: build-hook in nix.conf and in the daemon's NIX_CONFIG.
    ev.assert_build_hook(" hook");
    // 4: the aarch64 guest's system is aarch64, its runner (QEMU) this host's.
    assert_eq!(ev.str("/vms/aarch64/guestSystem"), "aarch64-linux");
    assert_eq!(ev.str("/vms/aarch64/toplevelSystem"), "aarch64-linux");
    assert_eq!(ev.str("/vms/aarch64/runnerSystem"), "x86_64-linux");
    assert_eq!(ev.str("/vms/native/runnerSystem"), "x86_64-linux");
    for vm in ["aarch64", "native"] {
        // 9: what nix-builder-vm.nix does for a builder.
        assert_eq!(
            ev.get(&format!("/vms/{vm}/nixSettings/min-free")),
            1073741824
        );
        assert_eq!(
            ev.get(&format!("/vms/{vm}/nixSettings/max-free")),
            3221225472u64
        );
        assert_eq!(ev.get(&format!("/vms/{vm}/channel")), false);
        assert_eq!(ev.get(&format!("/vms/{vm}/disableInstallerTools")), true);
        // 10: the key share is mounted read-only in the guest.
        let opts = ev.get(&format!("/vms/{vm}/options")).as_array().unwrap();
        assert!(opts.iter().any(|o| o == "ro"), "{vm}: {opts:?}");
        // 7: a free port at each boot, never a shared default.
        assert_eq!(ev.get(&format!("/toml/builders/{vm}/boot/ssh-port")), 0);
    }
    assert_eq!(ev.str("/toml/builders/aarch64/systems/0"), "aarch64-linux");
    // The guest's own config reached the runner.
    assert!(ev.str("/vms/native/runnerScript").contains("-m 4096"));
    // 10: the unit.
    let unit = ev.str("/unit");
    for line in [
        "RestartSec=5",
        "UMask=0077",
        "Restart=on-failure",
        "KillMode=mixed",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line} in\n{unit}");
    }
    assert!(
        unit.contains("supervise --config /etc/nix/lazy-builder.toml"),
        "{unit}"
    );

    ev.materialize();
    check_docs(&ev);
    // The preStart makes the keys; the guest's directory holds no client private key.
    let pre = ev.get("/serviceConfig/ExecStartPre/0").as_str().unwrap();
    let out = Command::new(pre).output().unwrap();
    assert!(
        out.status.success(),
        "preStart failed: {}",
        text(&out.stderr)
    );
    for vm in ["aarch64", "native"] {
        let d = ev.data.join("vms").join(vm);
        assert_eq!(mode(&d), 0o700);
        assert_eq!(
            names(&d.join("guest")),
            [
                "authorized_keys",
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub"
            ]
        );
        assert_eq!(mode(&d.join("guest/ssh_host_ed25519_key")), 0o600);
        assert_eq!(
            std::fs::read(d.join("guest/authorized_keys")).unwrap(),
            std::fs::read(d.join("client_ed25519_key.pub")).unwrap()
        );
    }
    // The TOML loads (keys and host keys in place) as the supervisor and the hook read it.
    let toml = ev.toml();
    let status = ev.status(&toml);
    assert!(
        status.contains("aarch64") && status.contains("native"),
        "{status}"
    );

    // 3, 8, 10: the runner the TOML names runs the guest's real runner (named after the
    // guest), in its own TMPDIR that is empty afterwards, even after a boot that was killed.
    let stale = ev.data.join("vms/native/tmp");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("store.img"), b"left by a killed boot").unwrap();
    for vm in ["aarch64", "native"] {
        let run = ev.run_runner(vm);
        let tmp = ev.data.join("vms").join(vm).join("tmp");
        assert!(
            !tmp.exists(),
            "{vm}: {} is left after the boot",
            tmp.display()
        );
        let d = ev.data.join("vms").join(vm);
        let store_img = format!("file={}/store.img,if=virtio,format=raw", tmp.display());
        assert!(
            run.has(&store_img),
            "{vm}: the store image was not made in our TMPDIR: {:?}",
            run.args
        );
        let disk = format!("file={}/disk.qcow2,if=virtio", d.display());
        assert!(run.has(&disk), "{vm}: {:?}", run.args);
        let share = format!(
            "local,path={}/guest,readonly=on,security_model=none,mount_tag=nlb-keys",
            d.display()
        );
        assert!(
            run.has(&share),
            "{vm}: the key share is not read-only: {:?}",
            run.args
        );
        assert!(
            run.has("user,id=user.0,hostfwd=tcp:127.0.0.1:0-:22"),
            "{:?}",
            run.args
        );
        assert!(run.has("chardev=nlbqmp,mode=control"), "{:?}", run.args);
    }

    // 7: two VMs on one fixed port are refused, naming both.
    let ev = Eval::new(lib, "nixos-clash");
    let failed = ev.get("/failedAssertions").as_array().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let msg = failed[0].as_str().unwrap();
    assert!(
        msg.contains("a and b") && msg.contains("2222") && !msg.contains("2223"),
        "{msg}"
    );
    say(&format!("  nixos-clash says: {msg}"));

    // 4: an aarch64 guest with nothing to build its system is warned about.
    let ev = Eval::new(lib, "nixos-no-binfmt");
    let warnings = ev.get("/warnings").as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = warnings[0].as_str().unwrap();
    assert!(
        w.contains("boot.binfmt.emulatedSystems") && w.contains("\"aarch64-linux\""),
        "{w}"
    );
    say(&format!("  nixos-no-binfmt warns: {w}"));

    // Nix 2.8 takes build-hook as one bare path.
    let ev = Eval::new(lib, "nixos-nix28");
    ev.assert_clean();
    ev.assert_build_hook("");
}

fn eval_darwin(lib: &Path) {
    let ev = Eval::new(lib, "darwin");
    ev.assert_clean();
    // 1: the guest's system, not uname's "arm64".
    assert_eq!(ev.str("/guest/system"), "aarch64-linux");
    assert_eq!(
        ev.get("/toml/builders/linux-builder/systems"),
        &serde_json::json!(["aarch64-linux"])
    );
    // 2: the guest is nixpkgs' own, unchanged (the cached one); only its runner differs.
    assert_eq!(ev.str("/guest/toplevel"), ev.str("/guest/stockToplevel"));
    assert_eq!(ev.str("/guest/runnerSystem"), "aarch64-darwin");
    assert_eq!(ev.get("/guest/forwardPorts"), &Value::Array(vec![]));
    assert_eq!(
        ev.get("/toml/builders/linux-builder/allow-well-known-host-key"),
        true
    );
    // 5
    ev.assert_build_hook(" hook");
    assert!(ev.str("/daemonPlist").contains("<key>NIX_CONFIG</key>"));
    // 6: the launchd job.
    let sc = ev.get("/serviceConfig");
    assert_eq!(sc["ExitTimeOut"], 120);
    assert_eq!(sc["Umask"], 0o077);
    assert_eq!(sc["StandardOutPath"], "/var/log/nix-lazy-builder.log");
    assert_eq!(sc["StandardErrorPath"], "/var/log/nix-lazy-builder.log");
    assert_eq!(sc["KeepAlive"]["SuccessfulExit"], false);
    assert_eq!(
        sc["EnvironmentVariables"]["NIX_SSL_CERT_FILE"],
        "/etc/ssl/certs/ca-certificates.crt"
    );
    let wait = sc["ProgramArguments"][2].as_str().unwrap();
    assert!(
        wait.starts_with("/bin/wait4path /nix/store && exec ")
            && wait
                .ends_with("/bin/nix-lazy-builder supervise --config /etc/nix/lazy-builder.toml"),
        "{wait}"
    );
    let plist = ev.str("/plist");
    for want in [
        "<key>ExitTimeOut</key>\n\t<integer>120</integer>",
        "<key>Umask</key>\n\t<integer>63</integer>",
        "/bin/wait4path /nix/store &amp;&amp; exec ",
    ] {
        assert!(plist.contains(want), "no {want:?} in\n{plist}");
    }
    assert_eq!(
        ev.get("/toml/builders/linux-builder/boot/environment/NIX_SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt"
    );
    // 6: keys before launchd starts the job.
    let pre = ev.str("/preActivation");
    assert!(
        pre.contains("ssh-keygen"),
        "preActivation makes no keys: {pre:?}"
    );
    let activation = ev.str("/activation");
    assert!(
        activation.starts_with(pre.trim_end()),
        "preActivation does not come first:\n{activation}"
    );

    ev.materialize();
    check_docs(&ev);
    ev.run_fragment("preActivation", pre);
    let d = ev.data.join("linux-builder");
    // 10: the guest's share has the public key only.
    assert_eq!(names(&d.join("guest-keys")), ["builder_ed25519.pub"]);
    assert_eq!(mode(&d.join("keys")), 0o700);
    let toml = ev.toml();
    ev.status(&toml);
    let run = ev.run_runner("linux-builder");
    // 10: read-only share, the disk where the TOML says (workingDirectory did nothing).
    assert!(
        run.has(&format!(
            "local,path={}/guest-keys,readonly=on,security_model=mapped-xattr,mount_tag=keys",
            d.display()
        )),
        "{:?}",
        run.args
    );
    assert!(
        run.has(&format!("file={}/disk.qcow2,if=virtio", d.display())),
        "{:?}",
        run.args
    );
    // 3: the store image was made in our TMPDIR, which is gone.
    assert!(run.has(&format!(
        "file={}/tmp/store.img,if=virtio,format=raw",
        d.display()
    )));
    assert!(!d.join("tmp").exists());
    // 6: the runner found the CA bundle to copy into the guest.
    assert!(
        !run.output.contains("NIX_SSL_CERT_FILE should point"),
        "{}",
        run.output
    );
    // 2: no port forward of the runner's own, only the supervisor's.
    assert!(
        run.has("user,id=user.0,hostfwd=tcp:127.0.0.1:0-:22"),
        "{:?}",
        run.args
    );

    // The opt-in per-install host key changes the guest (so it is not the cached one).
    let ev = Eval::new(lib, "darwin-own-host-key");
    ev.assert_clean();
    assert_ne!(ev.str("/guest/toplevel"), ev.str("/guest/stockToplevel"));
    assert_eq!(
        ev.str("/guest/hostKeys/0/path"),
        "/var/nlb-hostkey/ssh_host_ed25519_key"
    );
    assert!(
        ev.get("/toml/builders/linux-builder")
            .get("allow-well-known-host-key")
            .is_none()
    );
    ev.materialize();
    ev.run_fragment("preActivation", ev.str("/preActivation"));
    let toml = ev.toml();
    ev.status(&toml);
    let run = ev.run_runner("linux-builder");
    assert!(run.has(&format!(
        "local,path={}/linux-builder/hostkey,readonly=on,security_model=none,mount_tag=nlb-hostkey",
        ev.data.display()
    )));

    // 1: an Intel Mac's guest is x86_64-linux.
    let ev = Eval::new(lib, "darwin-x86");
    ev.assert_clean();
    assert_eq!(
        ev.get("/toml/builders/linux-builder/systems"),
        &serde_json::json!(["x86_64-linux"])
    );
}

#[test]
fn modules_evaluate_against_nixpkgs_lib() {
    let Some(lib) = nixpkgs_lib() else {
        // Counted and listed by tests/run, never silent: without a nixpkgs `lib` the modules
        // are only parsed (nix_files_parse), not evaluated.
        crate::harness::skipped(
            "examples::modules_evaluate_against_nixpkgs_lib",
            "the NixOS and nix-darwin modules' evaluation (types, assertions, generated files)",
            "no nixpkgs lib on NIX_PATH (set NIX_PATH=nixpkgs-lib=/path/to/nixpkgs.lib \
             or nixpkgs=/path/to/nixpkgs)",
        );
        return;
    };
    say(&format!(
        "modules_evaluate_against_nixpkgs_lib: evaluating with {}",
        lib.display()
    ));
    eval_nixos(&lib);
    eval_darwin(&lib);
    eval_doors(&lib);
}

/// `setting = value` as Nix 2.34 (the sid chroot's) reads it back with `nix config show`, or
/// `None` when this machine has no such chroot or the test is not root (needed to enter it). Nix only warns
/// about a value it cannot parse and keeps the default, so the value read back is the check.
fn nix_234_reads(setting: &str, value: &str) -> Option<String> {
    let root = crate::harness::Nix::Sid.root();
    // SAFETY: geteuid has no preconditions.
    if !root.join("usr/bin/nix").exists() || unsafe { libc::geteuid() } != 0 {
        return None;
    }
    // Nix needs /proc (it reads /proc/self/exe): a private mount namespace with its own.
    let out = Command::new("unshare")
        .args(["--mount", "--fork", "sh", "-c"])
        .arg(
            "mount -t proc proc \"$1/proc\" && exec chroot \"$1\" env HOME=/tmp \
             NIX_CONF_DIR=/nonexistent nix --extra-experimental-features \
             'nix-command external-builders' --option \"$2\" \"$3\" config show \"$2\"",
        )
        .args(["sh"])
        .arg(root)
        .args([setting, value])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix config show: {}",
        text(&out.stderr)
    );
    Some(text(&out.stdout).trim().to_owned())
}

/// The door option (examples/shared-module.nix): which nix.conf settings each choice writes.
fn eval_doors(lib: &Path) {
    let external = |ev: &Eval| -> Value {
        serde_json::from_str(ev.str("/externalBuilders"))
            .unwrap_or_else(|e| panic!("case {}: external-builders is not JSON: {e}", ev.case))
    };
    let entry = |ev: &Eval, systems: &[&str]| {
        serde_json::json!([{
            "systems": systems,
            "program": format!("{}/bin/nix-lazy-builder", ev.pkg.display()),
            "args": ["external-build"],
        }])
    };

    // The default door is the hook alone: no experimental feature, no external builder.
    let ev = Eval::new(lib, "nixos");
    assert_eq!(ev.get("/externalBuilders"), &Value::Null);
    assert_eq!(ev.get("/experimentalFeatures"), &serde_json::json!([]));

    // external-builders alone: Nix's own build hook, with no machines, is switched off (in
    // nix.conf and in NIX_CONFIG, which Nix 2.32 and 2.33 need), the systems are every
    // builder's (a VM's and one from `settings`) but this machine's own x86_64-linux.
    let ev = Eval::new(lib, "nixos-external");
    ev.assert_clean();
    assert_eq!(ev.str("/buildHook"), "");
    assert_eq!(ev.str("/daemonEnvironment/NIX_CONFIG"), "build-hook = ");
    assert_eq!(
        ev.get("/experimentalFeatures"),
        &serde_json::json!(["external-builders"])
    );
    let want = entry(&ev, &["aarch64-linux", "riscv64-linux"]);
    assert_eq!(external(&ev), want);
    // The program's argument is a subcommand the binary has.
    let program = want[0]["program"].as_str().unwrap();
    let help = Command::new(program)
        .args(["external-build", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success(), "{}", text(&help.stderr));
    // The supervisor still runs (the unprivileged program cannot start one).
    assert!(
        ev.str("/unit")
            .contains("supervise --config /etc/nix/lazy-builder.toml")
    );
    // Nix 2.34 reads the setting back as written (it would warn and keep `[]` otherwise).
    match nix_234_reads("external-builders", ev.str("/externalBuilders")) {
        Some(shown) => assert_eq!(
            serde_json::from_str::<Value>(&shown).unwrap_or(Value::Null),
            want,
            "Nix 2.34 read {shown}"
        ),
        None => crate::harness::skipped(
            "examples::modules_evaluate_against_nixpkgs_lib",
            "Nix 2.34 reading back the external-builders setting the module writes",
            "no sid chroot with Nix 2.34, or not root",
        ),
    }

    // ... but Nix's own hook stays when it has machines of its own.
    let ev = Eval::new(lib, "nixos-external-nix-machines");
    ev.assert_clean();
    let nix_hook = ev.str("/buildHook");
    assert!(nix_hook.ends_with("/bin/nix __build-remote"), "{nix_hook}");
    assert_eq!(
        ev.str("/daemonEnvironment/NIX_CONFIG"),
        format!("build-hook = {nix_hook}")
    );
    assert_eq!(external(&ev), entry(&ev, &["aarch64-linux"]));

    // Both doors: the hook in nix.conf and NIX_CONFIG, and the external builder for the
    // systems given.
    let ev = Eval::new(lib, "nixos-both");
    ev.assert_clean();
    ev.assert_build_hook(" hook");
    assert_eq!(external(&ev), entry(&ev, &["x86_64-linux", "i686-linux"]));

    // Refused: a Nix without external-builders, and a build socket inside the root-only data
    // directory.
    let ev = Eval::new(lib, "nixos-external-old-nix");
    let failed = ev.get("/failedAssertions").as_array().unwrap();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        failed[0]
            .as_str()
            .unwrap()
            .contains("needs Nix 2.32 or newer"),
        "{failed:?}"
    );
    assert!(
        failed[1].as_str().unwrap().contains("root-only"),
        "{failed:?}"
    );
    // nix-darwin: not on macOS yet (its build users are not in /etc/group).
    let ev = Eval::new(lib, "darwin-external");
    let failed = ev.get("/failedAssertions").as_array().unwrap();
    assert!(
        failed
            .iter()
            .any(|m| m.as_str().unwrap().contains("not supported on macOS yet")),
        "{failed:?}"
    );
    let ev = Eval::new(lib, "darwin");
    assert_eq!(ev.get("/externalBuilders"), &Value::Null);
}

// ------------------------------------------------------------------------------------------
// The README's samples, scripts, service units.

/// Every ```toml block of a Markdown file.
fn toml_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in md.lines() {
        match (&mut cur, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => cur = Some(String::new()),
            (Some(b), l) if l.starts_with("```") => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn documented_configs_load() {
    // Host key files named in the samples exist only on a configured machine: point them at one.
    let dir = tempfile::tempdir().unwrap();
    let pubkey = dir.path().join("host.pub");
    std::fs::write(
        &pubkey,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ host\n",
    )
    .unwrap();
    for md in ["examples/darling/README.md", "README.md"] {
        let text = std::fs::read_to_string(repo().join(md)).unwrap();
        let blocks = toml_blocks(&text);
        assert!(!blocks.is_empty(), "{md} shows no TOML");
        for b in blocks {
            // The README's sample shortens the host key with an ellipsis; give it a real one.
            let b = b.replace(
                "ssh-ed25519 AAAA…",
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ",
            );
            let b: String = b
                .lines()
                .map(|l| {
                    if l.starts_with("host-key-file") {
                        format!("host-key-file = {:?}", pubkey.display().to_string())
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let cfg = Config::parse(&b, Path::new(md))
                .unwrap_or_else(|e| panic!("a TOML block in {md} is refused: {e}\n{b}"));
            assert!(!cfg.builders.is_empty(), "{md}: no builder in\n{b}");
        }
    }
}

#[test]
fn readme_runs_the_two_commands_as_root_without_sudo() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme.find("## The two commands").expect("the section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    assert!(section.contains("as root"), "{section}");
    assert!(
        !section.contains("sudo"),
        "a fresh Debian 12 has no sudo:\n{section}"
    );
    assert!(section.contains("\nexamples/quickstart.sh\n") && section.contains("\ntests/run\n"));
}

#[test]
fn scripts_are_valid_shell() {
    for s in [
        "examples/quickstart.sh",
        "examples/vm/make-image",
        "examples/vm/check-image",
        "tests/run",
        ".ci/run",
        "tests/env/provision.sh",
    ] {
        let st = Command::new("bash")
            .arg("-n")
            .arg(repo().join(s))
            .status()
            .unwrap();
        assert!(st.success(), "{s} is not valid bash");
    }
}

#[test]
fn service_units_run_a_real_subcommand() {
    let unit =
        std::fs::read_to_string(repo().join("examples/systemd/nix-lazy-builder.service")).unwrap();
    let plist =
        std::fs::read_to_string(repo().join("examples/launchd/org.nixos.nix-lazy-builder.plist"))
            .unwrap();
    assert!(unit.contains("nix-lazy-builder supervise"), "{unit}");
    for line in ["RestartSec=5s", "UMask=0077", "KillMode=mixed"] {
        assert!(unit.lines().any(|l| l == line), "no {line} in the unit");
    }
    // launchd: wait for the store's volume, then exec the supervisor.
    assert!(
        plist.contains("/bin/wait4path /nix/store &amp;&amp; exec /nix/var/nix/profiles/default/bin/nix-lazy-builder supervise --config /etc/nix/lazy-builder.toml"),
        "{plist}"
    );
    for key in [
        "ExitTimeOut",
        "Umask",
        "StandardOutPath",
        "StandardErrorPath",
        "NIX_SSL_CERT_FILE",
    ] {
        assert!(
            plist.contains(&format!("<key>{key}</key>")),
            "no {key} in the plist"
        );
    }
    let out = nix_lazy_builder(&["supervise", "--help"]);
    assert!(out.status.success());
}

// ------------------------------------------------------------------------------------------
// The command line's own documentation.

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = nix_lazy_builder(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["nix-lazy-builder", "doctor", "supervise", "config"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    // The bash one is valid bash and completes the subcommands when sourced.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.bash");
    std::fs::write(&f, nix_lazy_builder(&["completions", "bash"]).stdout).unwrap();
    // The function `complete -p` names, called as bash calls it for `nix-lazy-builder do<TAB>`.
    let probe = format!(
        "source {}; f=$(complete -p nix-lazy-builder | sed 's/.*-F \\([^ ]*\\).*/\\1/'); \
         COMP_WORDS=(nix-lazy-builder do); COMP_CWORD=1; COMP_LINE='nix-lazy-builder do'; \
         COMP_POINT=${{#COMP_LINE}}; \"$f\" nix-lazy-builder do nix-lazy-builder; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        f.display()
    );
    let out = Command::new("bash").args(["-c", &probe]).output().unwrap();
    let replies = text(&out.stdout);
    assert!(
        replies.lines().any(|l| l == "doctor") && replies.lines().any(|l| l == "down"),
        "{replies}{}",
        text(&out.stderr)
    );
    // An unknown shell is a usage error that lists the known ones.
    let out = nix_lazy_builder(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("tcsh") && err.contains("bash") && err.contains("zsh"),
        "{err}"
    );
}

#[test]
fn man_pages() {
    let out = nix_lazy_builder(&["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(page.contains(".TH nix-lazy-builder 1"), "{page}");
    for word in ["doctor", "supervise", "completions", "build\\-hook"] {
        assert!(page.contains(word), "the page lacks {word}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("man")
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pages = names(dir.path());
    for want in [
        "nix-lazy-builder.1",
        "nix-lazy-builder-hook.1",
        "nix-lazy-builder-status.1",
        "nix-lazy-builder-up.1",
        "nix-lazy-builder-doctor.1",
    ] {
        assert!(pages.iter().any(|p| p == want), "no {want} in {pages:?}");
    }
    // groff reads it (man-db's `man -l` renders with it).
    if Path::new("/usr/bin/groff").exists() {
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(dir.path().join("nix-lazy-builder-up.1"))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff: {}",
            text(&out.stderr)
        );
        let out = Command::new("groff")
            .args(["-man", "-Tascii", "-P", "-cbou"])
            .arg(dir.path().join("nix-lazy-builder-up.1"))
            .output()
            .unwrap();
        let rendered = text(&out.stdout);
        assert!(
            rendered.contains("NAME") && rendered.contains("--config"),
            "{rendered}"
        );
    }
    // A directory it cannot write to is an error that names it.
    let out = nix_lazy_builder(&["man", "--dir", "/nonexistent/man1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/man1"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_texts() {
    // --config and NAME say what they are.
    for sub in ["hook", "supervise", "status", "up", "down", "doctor"] {
        let out = nix_lazy_builder(&[sub, "--help"]);
        assert!(out.status.success(), "{sub}");
        let help = text(&out.stdout);
        assert!(
            help.contains("--config <FILE>")
                && help.contains("$NIX_LAZY_BUILDER_CONFIG")
                && help.contains("/etc/nix/lazy-builder.toml"),
            "{sub} --help:\n{help}"
        );
    }
    for sub in ["up", "down"] {
        let help = text(&nix_lazy_builder(&[sub, "--help"]).stdout);
        assert!(
            help.contains("<NAME>") && help.contains("[builders.NAME]"),
            "{sub}:\n{help}"
        );
    }
    // `help --help` works, `help CMD` is `CMD --help`, an unknown one is an error.
    let out = nix_lazy_builder(&["help", "--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Usage: nix-lazy-builder help [COMMAND]..."));
    assert_eq!(
        nix_lazy_builder(&["help", "up"]).stdout,
        nix_lazy_builder(&["up", "--help"]).stdout
    );
    assert_eq!(
        nix_lazy_builder(&["help"]).stdout,
        nix_lazy_builder(&["--help"]).stdout
    );
    let out = nix_lazy_builder(&["help", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unrecognized subcommand 'nope'"),
        "{}",
        text(&out.stderr)
    );
    // The Nix 2.8 bare-path hook mode is documented.
    for args in [&["--help"][..], &["hook", "--help"]] {
        let help = text(&nix_lazy_builder(args).stdout);
        assert!(
            help.contains("Nix 2.8 and 2.9:     build-hook = /path/to/nix-lazy-builder\n")
                && help.contains("`nix-lazy-builder 3` is the hook")
                && help.contains("NIX_CONFIG"),
            "{args:?}:\n{help}"
        );
    }
}
