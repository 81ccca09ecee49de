//! The examples are checked as far as this machine allows: the NixOS and nix-darwin modules
//! parse with Nix's own parser (no nixpkgs here to evaluate them), the TOML shown in the
//! README files is accepted by the real config loader, the scripts are valid shell, and the
//! service units run a subcommand the binary really has.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix_lazy_builder::config::Config;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nix_modules_parse() {
    for f in [
        "examples/nixos/module.nix",
        "examples/nixos/builder-vm.nix",
        "examples/nix-darwin/module.nix",
    ] {
        nix_parse(&repo().join(f));
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
    assert!(plist.contains("<string>supervise</string>"), "{plist}");
    let out = Command::new(env!("CARGO_BIN_EXE_nix-lazy-builder"))
        .args(["supervise", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
}
