//! `doctor`'s local-daemon rows: the running nix-daemon's version (from the worker handshake) and
//! the build hook it really starts (from `store::probe_daemon`), and, when that hook is not
//! nix-lazy-builder, one line that says so with the fix. Nix 2.25.0 through 2.33.x replace a
//! `build-hook` set in nix.conf with their own default (introduced by 58b03ef1cd in 2.25.0,
//! fixed by NixOS/nix#15083 in 2.34.0), so the README's set-up silently gives those daemons Nix's
//! own hook; `NIX_CONFIG` in the daemon's environment survives the bug on every version.
//!
//! Must never: guess (no answer from the daemon is a warning that the hook is unchecked, not a
//! pass), or change the daemon's configuration: it only says what to change.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::{self, DaemonFacts};

/// How long the probe's build may take before doctor answers with what the daemon said by then
/// (the hook's start comes first; a hook that declines at once ends it in well under a second).
const PROBE_WAIT: Duration = Duration::from_secs(30);

/// Probes the daemon at the socket a client would use (`NIX_DAEMON_SOCKET_PATH` or the default)
/// and makes the rows.
pub(super) fn check(rt: &tokio::runtime::Runtime) -> DaemonReport {
    let own = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("nix-lazy-builder"));
    let socket = store::socket_path();
    let probe = rt
        .block_on(store::probe_daemon(&socket, PROBE_WAIT))
        .map_err(|e| e.to_string());
    report(probe, &own)
}

/// How a row came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Level {
    Ok,
    Warn,
    Fail,
}

/// What doctor prints for the local daemon, and whether it passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DaemonReport {
    /// `daemon: …` plus its indented `build-hook` row, newline-terminated.
    pub text: String,
    pub level: Level,
}

/// A Nix version's first three numbers (`2.34.0pre…` → 2, 34, 0).
fn version_triple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = it.next()??;
    let minor = it.next()??;
    let patch = it.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Whether a daemon of this version replaces `build-hook` from nix.conf with its default.
pub(super) fn ignores_nix_conf_hook(version: &str) -> bool {
    version_triple(version).is_some_and(|v| ((2, 25, 0)..(2, 34, 0)).contains(&v))
}

/// Whether `build-hook` is one path on this version (Nix before 2.10 does not split it).
fn hook_is_one_path(version: Option<&str>) -> bool {
    version
        .and_then(version_triple)
        .is_some_and(|v| v < (2, 10, 0))
}

/// Whether the daemon's hook command runs nix-lazy-builder: its program is named so, or is the
/// very binary `own_exe` doctor runs from.
pub(super) fn is_ours(command: &str, version: Option<&str>, own_exe: &Path) -> bool {
    let program = if hook_is_one_path(version) {
        command.trim()
    } else {
        command.split_whitespace().next().unwrap_or("")
    };
    let program = Path::new(program);
    if program.file_name().is_some_and(|n| n == "nix-lazy-builder") {
        return true;
    }
    match (program.canonicalize(), own_exe.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The rows for a probe's outcome; `own_exe` is the binary to suggest.
pub(super) fn report(probe: Result<DaemonFacts, String>, own_exe: &Path) -> DaemonReport {
    let mut text = String::new();
    let facts = match probe {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(text, "daemon: cannot ask the local nix-daemon: {e}");
            row(
                &mut text,
                Level::Warn,
                "the build hook it runs is unchecked",
            );
            return DaemonReport {
                text,
                level: Level::Warn,
            };
        }
    };
    let version = facts.nix_version.as_deref();
    let _ = writeln!(
        text,
        "daemon: Nix {} at {} (worker protocol {} agreed)",
        version.unwrap_or("of unknown version"),
        facts.socket.display(),
        facts.protocol
    );
    let ours_line = if hook_is_one_path(version) {
        own_exe.display().to_string()
    } else {
        format!("{} hook", own_exe.display())
    };
    let named = version.map_or_else(|| "nix-daemon".to_owned(), |v| format!("nix-daemon {v}"));
    let (level, detail) = match facts.hook.as_deref() {
        Some(cmd) if is_ours(cmd, version, own_exe) => {
            (Level::Ok, format!("the daemon starts '{cmd}'"))
        }
        found => {
            let what = match found {
                Some(cmd) => format!("{named} starts '{cmd}', not nix-lazy-builder"),
                None => format!(
                    "{named} started no build hook for a build it cannot do itself (its build-hook is empty)"
                ),
            };
            let fix = if version.is_some_and(ignores_nix_conf_hook) {
                format!(
                    ": Nix 2.25.0 to 2.33.x replace build-hook from nix.conf with their default \
                     (NixOS/nix#15083, fixed in 2.34.0); set NIX_CONFIG=\"build-hook = {ours_line}\" \
                     in nix-daemon's environment (systemd: a nix-daemon.service.d/*.conf drop-in with \
                     [Service] Environment=\"NIX_CONFIG=build-hook = {ours_line}\"; the NixOS module \
                     does this) and restart nix-daemon"
                )
            } else {
                format!(
                    ": set build-hook = {ours_line} in nix.conf (or NIX_CONFIG=\"build-hook = \
                     {ours_line}\" in nix-daemon's environment) and restart nix-daemon"
                )
            };
            (Level::Fail, what + &fix)
        }
    };
    row(&mut text, level, &detail);
    DaemonReport { text, level }
}

fn row(text: &mut String, level: Level, detail: &str) {
    let tag = match level {
        Level::Ok => " ok ",
        Level::Warn => "WARN",
        Level::Fail => "FAIL",
    };
    let _ = writeln!(text, "  [{tag}] {:<10} {detail}", "build-hook");
}

#[cfg(test)]
mod tests {
    use hook_protocol::version::ProtocolVersion;

    use super::*;

    fn facts(version: &str, hook: Option<&str>) -> DaemonFacts {
        DaemonFacts {
            socket: PathBuf::from("/nix/var/nix/daemon-socket/socket"),
            protocol: ProtocolVersion::new(1, 38),
            nix_version: Some(version.to_owned()),
            hook: hook.map(str::to_owned),
        }
    }

    const OURS: &str = "/usr/bin/nix-lazy-builder";

    #[test]
    fn the_affected_versions_are_2_25_0_to_2_33_x() {
        for v in ["2.25.0", "2.26.3", "2.33.6", "2.30.0pre20250601_abc"] {
            assert!(ignores_nix_conf_hook(v), "{v}");
        }
        for v in [
            "2.8.0", "2.24.15", "2.34.0", "2.34.8", "2.35.1", "3.0", "junk", "",
        ] {
            assert!(!ignores_nix_conf_hook(v), "{v}");
        }
    }

    #[test]
    fn our_hook_is_recognised_by_name_or_by_being_this_binary() {
        let me = std::env::current_exe().expect("current_exe");
        let other = Path::new(OURS);
        assert!(is_ours(
            "/nix/store/abc-nix-lazy-builder-0.1/bin/nix-lazy-builder hook",
            Some("2.34.8"),
            other
        ));
        assert!(is_ours("nix-lazy-builder hook", Some("2.26.3"), other));
        assert!(is_ours(
            &format!("{} hook", me.display()),
            Some("2.34.8"),
            &me
        ));
        assert!(!is_ours(
            "/usr/bin/nix __build-remote",
            Some("2.26.3"),
            other
        ));
        assert!(!is_ours(
            "/usr/libexec/nix/build-remote",
            Some("2.8.0"),
            other
        ));
        // Nix 2.8 runs the whole setting as one path: `<ours> hook` is not ours there.
        assert!(!is_ours(&format!("{OURS} hook"), Some("2.8.0"), other));
        assert!(is_ours(OURS, Some("2.8.0"), other));
    }

    #[test]
    fn nix_2_26_with_its_own_hook_gets_the_nix_config_fix_in_one_line() {
        let r = report(
            Ok(facts("2.26.3", Some("/usr/bin/nix __build-remote"))),
            Path::new(OURS),
        );
        assert_eq!(r.level, Level::Fail);
        let lines: Vec<&str> = r.text.lines().collect();
        assert_eq!(lines.len(), 2, "{}", r.text);
        assert_eq!(
            lines[0],
            "daemon: Nix 2.26.3 at /nix/var/nix/daemon-socket/socket (worker protocol 1.38 agreed)"
        );
        let row = lines[1];
        for want in [
            "[FAIL] build-hook",
            "nix-daemon 2.26.3 starts '/usr/bin/nix __build-remote', not nix-lazy-builder",
            "2.25.0 to 2.33.x",
            "NixOS/nix#15083",
            "NIX_CONFIG=\"build-hook = /usr/bin/nix-lazy-builder hook\"",
            "Environment=\"NIX_CONFIG=build-hook = /usr/bin/nix-lazy-builder hook\"",
        ] {
            assert!(row.contains(want), "{want:?} not in {row}");
        }
    }

    #[test]
    fn other_versions_are_told_to_set_build_hook_in_nix_conf() {
        let r = report(
            Ok(facts("2.8.0", Some("/usr/libexec/nix/build-remote"))),
            Path::new(OURS),
        );
        assert_eq!(r.level, Level::Fail);
        assert!(
            r.text
                .contains("set build-hook = /usr/bin/nix-lazy-builder in nix.conf"),
            "{}",
            r.text
        );
        assert!(!r.text.contains("15083"), "{}", r.text);
        let r = report(Ok(facts("2.34.8", None)), Path::new(OURS));
        assert_eq!(r.level, Level::Fail);
        assert!(r.text.contains("started no build hook"), "{}", r.text);
        assert!(
            r.text
                .contains("set build-hook = /usr/bin/nix-lazy-builder hook in nix.conf"),
            "{}",
            r.text
        );
    }

    #[test]
    fn ours_passes_and_no_answer_only_warns() {
        let r = report(
            Ok(facts("2.26.3", Some(&format!("{OURS} hook")))),
            Path::new(OURS),
        );
        assert_eq!(r.level, Level::Ok, "{}", r.text);
        assert!(r.text.contains("[ ok ] build-hook"), "{}", r.text);
        let r = report(Err("connection refused".into()), Path::new(OURS));
        assert_eq!(r.level, Level::Warn);
        assert!(r.text.contains("connection refused"), "{}", r.text);
    }
}
