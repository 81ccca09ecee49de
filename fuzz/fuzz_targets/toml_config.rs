//! The lazy-builder TOML loader: no panic, every error names the file and a line inside the
//! text, and every accepted builder is pinned and usable.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nix_lazy_builder::config::{Config, ConfigError, HostKeySpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `host-key-file` is read from disk: keep the fuzzer away from device files.
    if text.contains("/dev") || text.contains("/proc") || text.contains("/sys") {
        return;
    }
    match Config::parse(text, Path::new("/etc/nix/lazy-builder.toml")) {
        Ok(c) => {
            assert!(c.supervisor.state_dir.is_absolute());
            for b in c.builders {
                assert!(!matches!(b.host_keys, HostKeySpec::SshDefault));
                assert!(b.max_jobs >= 1 && b.speed_factor.is_finite() && b.speed_factor > 0.0);
                assert!(!b.systems.is_empty());
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("/etc/nix/lazy-builder.toml"), "{msg}");
            if let ConfigError::Toml { line, column, .. } = e {
                assert!(
                    line >= 1 && line <= text.lines().count() + 1 && column >= 1,
                    "{msg}"
                );
            }
        }
    }
});
