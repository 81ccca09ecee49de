//! What a boot section needs on this machine, checked without booting it: the program it runs
//! (the QEMU binary or runner script, `darling`, the boot and stop commands) and the files it
//! names (kernel, initrd, disk, the Darling prefix and its sshd config). `doctor` checks a
//! builder's settings this way even while an instance booted from older settings runs.
//!
//! Must never start anything or write anything; it only looks the paths up.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use super::find_program;
use super::qemu::guest_arch;
use crate::config::BootSpec;

/// `Ok` with what was found ("qemu-system-aarch64 at /usr/bin/…; kernel /k"), or `Err` with
/// every problem, each saying what is missing and where it was looked for.
pub fn check_spec(spec: &BootSpec, systems: &[String]) -> Result<String, String> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let program = |name: &str, what: &str, found: &mut Vec<String>, problems: &mut Vec<String>| {
        match find_program(name, what) {
            Ok(p) if p.to_string_lossy() == name => found.push(format!("{what} {name}")),
            Ok(p) => found.push(format!("{what} {name} at {}", p.display())),
            Err(e) => problems.push(e.to_string()),
        }
    };
    match spec {
        BootSpec::Qemu(q) => {
            if let Some(r) = &q.runner {
                program(
                    &r.to_string_lossy(),
                    "QEMU runner script",
                    &mut found,
                    &mut problems,
                );
                if r.is_file()
                    && std::fs::metadata(r).is_ok_and(|m| m.permissions().mode() & 0o111 == 0)
                {
                    problems.push(format!(
                        "QEMU runner script {} is not executable",
                        r.display()
                    ));
                }
            } else {
                match (&q.binary, guest_arch(systems)) {
                    (Some(b), _) => program(b, "QEMU", &mut found, &mut problems),
                    (None, Some(a)) => program(
                        &format!("qemu-system-{a}"),
                        "QEMU",
                        &mut found,
                        &mut problems,
                    ),
                    (None, None) => problems.push(format!(
                        "cannot tell which qemu-system-* to run for systems {systems:?}; set binary"
                    )),
                }
            }
            for (what, p) in [
                ("kernel", &q.kernel),
                ("initrd", &q.initrd),
                ("disk", &q.disk),
            ] {
                if let Some(p) = p {
                    file(p, &format!("QEMU {what}"), &mut found, &mut problems);
                }
            }
        }
        BootSpec::Darling(d) => {
            program("darling", "darling", &mut found, &mut problems);
            if d.prefix.is_dir() {
                found.push(format!("prefix {}", d.prefix.display()));
                let inside = d
                    .prefix
                    .join(d.sshd_config.strip_prefix("/").unwrap_or(&d.sshd_config));
                file(&inside, "sshd config", &mut found, &mut problems);
            } else {
                problems.push(format!(
                    "Darling prefix not found: {} is not a directory",
                    d.prefix.display()
                ));
            }
        }
        BootSpec::Command(c) => {
            match c.command.first() {
                Some(p) => program(p, "boot command", &mut found, &mut problems),
                None => problems.push("the boot command is empty".to_owned()),
            }
            if let Some(p) = c.stop_command.as_ref().and_then(|s| s.first()) {
                program(p, "stop command", &mut found, &mut problems);
            }
        }
    }
    if problems.is_empty() {
        Ok(found.join("; "))
    } else {
        Err(problems.join("; "))
    }
}

fn file(p: &Path, what: &str, found: &mut Vec<String>, problems: &mut Vec<String>) {
    if p.is_file() {
        found.push(format!("{what} {}", p.display()));
    } else {
        problems.push(format!("{what} not found: {} does not exist", p.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CommandBoot, QemuBoot, StopSignal};

    #[test]
    fn every_missing_piece_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, "k").unwrap();
        let q = |kernel: &Path, binary: &str| {
            BootSpec::Qemu(Box::new(QemuBoot {
                binary: Some(binary.into()),
                kernel: Some(kernel.to_owned()),
                initrd: Some(dir.path().join("initrd")),
                ..QemuBoot::default()
            }))
        };
        let e = check_spec(&q(&kernel, "sh"), &[]).unwrap_err();
        assert_eq!(
            e,
            format!(
                "QEMU initrd not found: {} does not exist",
                dir.path().join("initrd").display()
            )
        );
        std::fs::write(dir.path().join("initrd"), "i").unwrap();
        let ok = check_spec(&q(&kernel, "sh"), &[]).unwrap();
        assert!(ok.starts_with("QEMU sh at /"), "{ok}");
        assert!(
            ok.contains(&format!("QEMU kernel {}", kernel.display())),
            "{ok}"
        );
        let e = check_spec(&q(&dir.path().join("gone"), "no-such-qemu-nlb"), &[]).unwrap_err();
        assert!(
            e.starts_with("QEMU not found: no-such-qemu-nlb is not on PATH"),
            "{e}"
        );
        assert!(e.contains("QEMU kernel not found"), "{e}");
        let c = BootSpec::Command(CommandBoot {
            command: vec!["/nonexistent/start".into()],
            stop_command: Some(vec!["true".into()]),
            stop_signal: StopSignal::Term,
            environment: Default::default(),
        });
        assert_eq!(
            check_spec(&c, &[]).unwrap_err(),
            "boot command not found: /nonexistent/start does not exist"
        );
    }
}
