//! What a failed boot's logs say, in one line: the real cause found in the guest's console or
//! in QEMU's own output (a kernel panic and why, the guest's OOM killer, a NixOS stage 1
//! failure, an initrd that would not unpack, QEMU's own error) rather than the console's last
//! line (`Memory Limit: none`, `Kernel Offset: …`, the end of a stack dump); and the log a user
//! reads next (`console: …/console.log`), named in every boot failure ([`failure_line`]).
//!
//! Owns the patterns and their words. Must never read more than the tail of a log (a guest may
//! write without end), nor hide the message the backend gave: the diagnosis is added to it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{BootError, logs};
use crate::config::BootSpec;

/// How much of each log's end is searched. A kernel panic with its stack dump is 2–6 KiB; a
/// NixOS stage 1 failure prints a screen of text after the cause.
const TAIL_BYTES: u64 = 64 * 1024;

/// The log files a backend writes for `spec` in the state directory `dir`, the one a user
/// should read first (QEMU's serial console, a command's or darling's output) first.
pub fn log_files(spec: &BootSpec, dir: &Path) -> Vec<PathBuf> {
    match spec {
        BootSpec::Qemu(_) => vec![dir.join("console.log"), dir.join("qemu.log")],
        BootSpec::Darling(_) => vec![dir.join("darling.log")],
        BootSpec::Command(_) => vec![dir.join("command.log")],
    }
}

/// "console" for QEMU's serial console, "log" for the others: how a message names the file.
fn log_label(spec: &BootSpec) -> &'static str {
    match spec {
        BootSpec::Qemu(_) => "console",
        _ => "log",
    }
}

/// The one line that says why the boot failed, from `logs` (QEMU's own output and the console
/// in any order): QEMU's own error, else a known guest failure, else the last line of the
/// first log that has one.
pub(super) fn summary(logs: &[PathBuf]) -> Option<String> {
    let tails: Vec<(&PathBuf, String)> = logs.iter().filter_map(|p| Some((p, tail(p)?))).collect();
    // QEMU's own error (not a warning): what QEMU itself says went wrong.
    for (p, text) in &tails {
        if p.file_name().is_some_and(|n| n == "qemu.log")
            && let Some(l) = qemu_error(text)
        {
            return Some(l);
        }
    }
    for (_, text) in &tails {
        if let Some(cause) = guest_cause(text) {
            return Some(cause);
        }
    }
    // (Without the kernel's time stamp, which says nothing to a user.)
    logs::last_line_of_any(logs).map(|l| strip_stamp(&l).to_owned())
}

/// The whole failure message for a boot of `spec` that failed with `err`: the error, for a
/// readiness timeout what to raise and what the console showed last, and the log to read.
pub fn failure_line(
    err: &BootError,
    spec: &BootSpec,
    dir: &Path,
    boot_timeout: Duration,
) -> String {
    let files = log_files(spec, dir);
    let mut line = err.to_string();
    if err.is_timeout() {
        line.push_str(&timed_out_tail(&files, boot_timeout));
    }
    line.push_str(&log_note(spec, dir));
    line
}

/// `; console: …/console.log` (qemu) or `; log: …/command.log`: the log a user reads next.
pub fn log_note(spec: &BootSpec, dir: &Path) -> String {
    format!(
        "; {}: {}",
        log_label(spec),
        log_files(spec, dir)[0].display()
    )
}

/// For a boot that ran out of `boot-timeout` while its backend was still starting (a NixOS
/// runner that builds its store image first, QEMU that never opened QMP): what its logs said
/// last, what to raise, and the log to read.
pub fn start_timed_out(spec: &BootSpec, dir: &Path, boot_timeout: Duration) -> String {
    format!(
        "{}{}",
        timed_out_tail(&log_files(spec, dir), boot_timeout),
        log_note(spec, dir)
    )
}

fn timed_out_tail(files: &[PathBuf], boot_timeout: Duration) -> String {
    let said = match summary(files) {
        Some(l) => format!("; its last output: '{l}'"),
        None => "; its logs are empty".to_owned(),
    };
    format!(
        "{said}; raise boot-timeout (now {}) if it is only slow",
        humantime::format_duration(boot_timeout)
    )
}

fn tail(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// The lines of `text` with the kernel's `[    1.234567] ` stamp and escapes removed.
fn clean_lines(text: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    text.split(['\n', '\r']).filter_map(|l| {
        let l = logs::last_line_of(l.as_bytes())?;
        Some(strip_stamp(&l).to_owned())
    })
}

fn strip_stamp(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix('[')
        && let Some((stamp, after)) = rest.split_once(']')
        && stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        return after.trim_start();
    }
    line
}

/// QEMU's own last error in `qemu.log`: `qemu-system-x86_64: -drive …: Could not open …`
/// (warnings are not the cause).
fn qemu_error(text: &str) -> Option<String> {
    clean_lines(text).rev().find(|l| {
        let Some((prog, msg)) = l.split_once(": ") else {
            return false;
        };
        prog.starts_with("qemu-system-") && !msg.starts_with("warning:")
    })
}

/// What the guest's console says went wrong, if it is one of the failures we know.
fn guest_cause(text: &str) -> Option<String> {
    let lines: Vec<String> = clean_lines(text).collect();
    // The first panic: later lines repeat it ("---[ end Kernel panic - not syncing: … ]---").
    if let Some(why) = lines
        .iter()
        .find_map(|l| l.strip_prefix("Kernel panic - not syncing: "))
    {
        let why = why.trim();
        let hint = if why.starts_with("VFS: Unable to mount root fs") {
            " (it found no root file system: check initrd, disk and root= in append)"
        } else if why.starts_with("Attempted to kill init") {
            " (the guest's init exited)"
        } else if why.starts_with("No working init found") {
            " (no init in its initrd or root file system: check init=/rdinit= in append)"
        } else if why.contains("Out of memory") || why.contains("deadlocked on memory") {
            " (the guest ran out of memory: raise memory)"
        } else {
            ""
        };
        return Some(format!("the guest's kernel panicked: {why}{hint}"));
    }
    if let Some(oom) = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("Out of memory: Killed process"))
    {
        return Some(format!("the guest ran out of memory ({oom}): raise memory"));
    }
    if let Some(i) = lines
        .iter()
        .rposition(|l| l.contains("An error occurred in stage 1 of the boot process"))
    {
        // NixOS' stage 1 prints its cause just before this line.
        let cause = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| format!(": {l}"))
            .unwrap_or_default();
        return Some(format!("the guest's NixOS stage 1 failed{cause}"));
    }
    if let Some(l) = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("Initramfs unpacking failed"))
    {
        // "write error": the unpacked initrd did not fit in the guest's memory.
        let hint = if l.contains("write error") {
            " (it did not fit in the guest's memory: raise memory)"
        } else {
            ""
        };
        return Some(format!("the guest could not unpack its initrd: {l}{hint}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of a real x86_64 console (Debian's 6.1 cloud kernel under TCG, no initrd).
    const NO_ROOT: &str = "\
[    1.346999] /dev/root: Can't open blockdev\n\
[    1.348210] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n\
[    1.348609] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0-57-cloud-amd64 #1  Debian 6.1.192-3\n\
[    1.349295] Call Trace:\n\
[    1.349932]  <TASK>\n\
[    1.350178]  dump_stack_lvl+0x44/0x5c\n\
[    1.351138]  </TASK>\n\
[    1.351668] Kernel Offset: 0x1dc00000 from 0xffffffff81000000 (relocation range: 0xffffffff80000000-0xffffffffbfffffff)\n";

    /// The end of an aarch64 panic, whose last line says nothing.
    const ARM_INIT: &str = "\
[    3.114162] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000\r\n\
[    3.119357] CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0-57-cloud-arm64 #1  Debian 6.1.192-3\r\n\
[    3.124732] Kernel Offset: disabled\r\n\
[    3.124801] Memory Limit: none\r\n\
[    3.124902] ---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000 ]---\r\n";

    #[test]
    fn the_cause_not_the_last_line() {
        assert_eq!(
            guest_cause(NO_ROOT).as_deref(),
            Some(
                "the guest's kernel panicked: VFS: Unable to mount root fs on unknown-block(0,0) \
                 (it found no root file system: check initrd, disk and root= in append)"
            )
        );
        assert_eq!(
            guest_cause(ARM_INIT).as_deref(),
            Some(
                "the guest's kernel panicked: Attempted to kill init! exitcode=0x00000000 (the \
                 guest's init exited)"
            )
        );
        assert_eq!(
            guest_cause("[ 1.2] Kernel panic - not syncing: System is deadlocked on memory\n")
                .as_deref(),
            Some(
                "the guest's kernel panicked: System is deadlocked on memory (the guest ran out \
                 of memory: raise memory)"
            )
        );
        assert_eq!(
            guest_cause(
                "[ 9.1] Out of memory: Killed process 212 (nix-daemon) total-vm:1024kB\n[ 9.2] ok\n"
            )
            .as_deref(),
            Some(
                "the guest ran out of memory (Out of memory: Killed process 212 (nix-daemon) \
                 total-vm:1024kB): raise memory"
            )
        );
        assert_eq!(
            guest_cause(
                "waiting for device /dev/disk/by-label/nixos to appear.......\n\
                 Timed out waiting for device /dev/disk/by-label/nixos, trying to mount anyway.\n\
                 mount: mounting /dev/disk/by-label/nixos on /mnt-root/ failed: No such file or directory\n\n\
                 An error occurred in stage 1 of the boot process, which must mount the\n\
                 root filesystem on `/mnt-root' and then start stage 2.  Press one\n"
            )
            .as_deref(),
            Some(
                "the guest's NixOS stage 1 failed: mount: mounting /dev/disk/by-label/nixos on \
                 /mnt-root/ failed: No such file or directory"
            )
        );
        // The end of a real aarch64 console with `-m 160` and a 77 MB initrd.
        assert_eq!(
            guest_cause(
                "[    0.839691] Initramfs unpacking failed: write error\n\
                 /usr/bin/nix-daemon: error while loading shared libraries: libnixexpr.so: cannot \
                 open shared object file: No such file or directory\n\
                 can't run '/usr/sbin/dropbear': No such file or directory\n"
            )
            .as_deref(),
            Some(
                "the guest could not unpack its initrd: Initramfs unpacking failed: write error \
                 (it did not fit in the guest's memory: raise memory)"
            )
        );
        assert_eq!(guest_cause("Creating Nix store image...\n"), None);
        assert_eq!(guest_cause(""), None);
    }

    #[test]
    fn qemu_errors_beat_the_console_and_warnings_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let qemu = dir.path().join("qemu.log");
        std::fs::write(&console, NO_ROOT).unwrap();
        std::fs::write(
            &qemu,
            "qemu-system-x86_64: warning: host doesn't support requested feature\n",
        )
        .unwrap();
        let both = [qemu.clone(), console.clone()];
        assert!(
            summary(&both)
                .unwrap()
                .starts_with("the guest's kernel panicked: VFS")
        );
        std::fs::write(
            &qemu,
            "qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file or directory\n",
        )
        .unwrap();
        assert_eq!(
            summary(&both).as_deref(),
            Some(
                "qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file or directory"
            )
        );
        // Nothing known: the last line, without the kernel's stamp.
        std::fs::write(&qemu, "").unwrap();
        std::fs::write(&console, "[    3.060902] Memory Limit: none\n").unwrap();
        assert_eq!(summary(&both).as_deref(), Some("Memory Limit: none"));
        std::fs::write(&console, "Creating Nix store image...\n").unwrap();
        assert_eq!(
            summary(&both).as_deref(),
            Some("Creating Nix store image...")
        );
        // A huge console: only its tail is read, and the panic in it is found.
        let mut big = "filler\n".repeat(200_000);
        big.push_str(NO_ROOT);
        std::fs::write(&console, big).unwrap();
        assert!(summary(&both).unwrap().contains("Unable to mount root fs"));
    }

    #[test]
    fn every_failure_names_the_log() {
        let spec = crate::config::BootSpec::Command(crate::config::CommandBoot {
            command: vec!["/start".into()],
            stop_command: None,
            stop_signal: crate::config::StopSignal::Term,
            environment: Default::default(),
        });
        let dir = tempfile::tempdir().unwrap();
        let e = BootError::Config("builder 'b': the boot command is empty".into());
        assert_eq!(
            failure_line(&e, &spec, dir.path(), Duration::from_secs(30)),
            format!(
                "builder 'b': the boot command is empty; log: {}",
                dir.path().join("command.log").display()
            )
        );
        std::fs::write(dir.path().join("command.log"), "sshd: still thinking\n").unwrap();
        let e = BootError::NoBanner {
            addr: "127.0.0.1:2".into(),
            after: Duration::from_secs(30),
            last: "connection refused".into(),
            forwarded: false,
        };
        let line = failure_line(&e, &spec, dir.path(), Duration::from_secs(30));
        assert!(
            line.ends_with(&format!(
                "; its last output: 'sshd: still thinking'; raise boot-timeout (now 30s) if it \
                 is only slow; log: {}",
                dir.path().join("command.log").display()
            )),
            "{line}"
        );
    }
}
