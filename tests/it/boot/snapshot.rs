//! `snapshot = true` with real VMs (the aarch64 and x86_64 images of examples/vm/make-image,
//! TCG): the first boot is cold and makes the snapshot; the next boots restore it. Every
//! restore has the guest agent reseed the kernel's RNG and set the clock: two restores of one
//! snapshot read different bytes from /dev/urandom and get different SSH ephemeral keys (the
//! server's KEX reply, read on the client side with a bare-bones SSH client), and the guest's
//! clock is within 2 s of the host's. A damaged snapshot (truncated RAM, a device state
//! QEMU rejects) and a changed config (memory, kernel) boot cold at once and make a new one.
//!
//! VM tests take a lock (across test processes) so that only one of them runs at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::boot::*;
use crate::harness::toml_str;
use nix_lazy_builder::boot::{self, BootContext, BootKind, Instance, StopHow, snapshot};
use nix_lazy_builder::config::Builder;

const READY_WITHIN: Duration = Duration::from_secs(180);

fn console(ctx: &BootContext) -> String {
    std::fs::read_to_string(ctx.dir.join("console.log")).unwrap_or_default()
}

/// Starts `b` in `ctx` and waits until it is ready: the instance, its port and how long.
async fn up(b: &Builder, ctx: &BootContext) -> (Instance, u16, Duration) {
    // RUST_LOG=nix_lazy_builder=info shows the backend's own timings.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let t0 = Instant::now();
    let mut inst = start(b, ctx).await;
    let port = inst.ssh_port().expect("a forwarded port");
    boot::wait_ready(b, port, &mut inst, Instant::now() + READY_WITHIN)
        .await
        .unwrap_or_else(|e| panic!("not ready: {e}\n--- console.log ---\n{}", console(ctx)));
    (inst, port, t0.elapsed())
}

async fn down(b: &Builder, inst: Instance) {
    let report = inst.stop(StopHow::graceful(Some(b))).await;
    assert!(report.exit.is_some(), "{report}");
}

/// The guest's clock minus the host's, in seconds, and the uncertainty of that (half the
/// round trip).
async fn clock_skew(b: &Builder, port: u16) -> (f64, f64) {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    let out = run_over_ssh(b, port, "adjtimex").await;
    let after = now();
    let field = |name: &str| -> f64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in: {out}"))
    };
    let guest = field("time.tv_sec") + field("time.tv_usec") / 1e6;
    ((guest - (before + after) / 2.0), (after - before) / 2.0)
}

async fn urandom(b: &Builder, port: u16) -> String {
    let hex = run_over_ssh(
        b,
        port,
        "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
    )
    .await;
    assert_eq!(hex.len(), 64, "{hex}");
    hex
}

/// The server's side of one key exchange, read on the client side: the cookie of its KEXINIT
/// and its curve25519 ephemeral public key from the KEX_ECDH_REPLY (RFC 4253 §7, RFC 8731).
/// Only as much SSH as that takes; the connection is dropped before any key is used.
fn server_kex(port: u16) -> (Vec<u8>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"SSH-2.0-nlbtest\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "no banner");
        if line.starts_with("SSH-") {
            break;
        }
    }
    fn packet(r: &mut impl Read) -> Vec<u8> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        r.read_exact(&mut body).unwrap();
        let pad = body[0] as usize;
        body[1..body.len() - pad].to_vec()
    }
    fn send(w: &mut impl Write, payload: &[u8]) {
        let mut pad = 8 - (payload.len() + 5) % 8;
        if pad < 4 {
            pad += 8;
        }
        let mut p = ((payload.len() + pad + 1) as u32).to_be_bytes().to_vec();
        p.push(pad as u8);
        p.extend_from_slice(payload);
        p.extend(std::iter::repeat_n(0u8, pad));
        w.write_all(&p).unwrap();
    }
    fn string(v: &mut Vec<u8>, s: &[u8]) {
        v.extend_from_slice(&(s.len() as u32).to_be_bytes());
        v.extend_from_slice(s);
    }
    let kexinit = packet(&mut r);
    assert_eq!(kexinit[0], 20, "SSH_MSG_KEXINIT");
    let cookie = kexinit[1..17].to_vec();
    let mut ours = vec![20u8];
    ours.extend_from_slice(&[0x11; 16]);
    for list in [
        &b"curve25519-sha256"[..],
        b"ssh-ed25519",
        b"chacha20-poly1305@openssh.com",
        b"chacha20-poly1305@openssh.com",
        b"hmac-sha2-256",
        b"hmac-sha2-256",
        b"none",
        b"none",
        b"",
        b"",
    ] {
        string(&mut ours, list);
    }
    ours.extend_from_slice(&[0, 0, 0, 0, 0]);
    send(&mut s, &ours);
    let mut init = vec![30u8];
    let mut q_c = [0u8; 32];
    q_c[0] = 9;
    string(&mut init, &q_c);
    send(&mut s, &init);
    let reply = packet(&mut r);
    assert_eq!(reply[0], 31, "SSH_MSG_KEX_ECDH_REPLY");
    let k_s = u32::from_be_bytes(reply[1..5].try_into().unwrap()) as usize;
    let at = 5 + k_s;
    let q_s = u32::from_be_bytes(reply[at..at + 4].try_into().unwrap()) as usize;
    (cookie, reply[at + 4..at + 4 + q_s].to_vec())
}

/// Cold (makes the snapshot), then two restores, each after a stop: the right architecture,
/// fresh randomness, fresh SSH ephemeral keys, the host's time.
async fn cold_then_two_fresh_restores(arch: &str) {
    let (_one_vm, img) = vm_test(arch).await;
    let b = img.builder_with(|t| set_key(t, "snapshot", "true"));
    let (_state, ctx) = context(&b);

    let (inst, port, took) = up(&b, &ctx).await;
    assert_eq!(inst.boot_kind(), BootKind::Cold);
    assert_eq!(inst.snapshot_note(), Some("there is no snapshot yet"));
    eprintln!("{arch}: cold boot and snapshot in {took:?}");
    assert_eq!(run_over_ssh(&b, port, "uname -m").await, arch);
    let info = snapshot::info(&ctx.dir).expect("a snapshot was made");
    eprintln!(
        "{arch}: snapshot {} MiB of RAM data, {} bytes of device state, paused {} ms",
        info.meta.ram_data_bytes >> 20,
        info.meta.devices_bytes,
        info.meta.paused_ms
    );
    let files = snapshot::Layout::new(&ctx.dir).current();
    assert!(snapshot::dir_is_private(files.dir()));
    for f in [files.ram(), files.devices(), files.meta()] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    assert_eq!(info.meta.ram_bytes, 1 << 30);
    down(&b, inst).await;
    let spec = &b.lazy.as_ref().unwrap().boot;
    assert!(
        matches!(
            boot::next_boot(spec, &ctx).await,
            Ok(boot::NextBoot::Restore(_))
        ),
        "{:?}",
        boot::next_boot(spec, &ctx).await
    );

    let mut seen = Vec::new();
    for i in 0..2 {
        // Long enough a sleep for a clock that was not set to be off by more than 2 s.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (inst, port, took) = up(&b, &ctx).await;
        assert_eq!(inst.boot_kind(), BootKind::Restored, "restore {i}");
        eprintln!("{arch}: restore {i} ready in {took:?}");
        assert_eq!(run_over_ssh(&b, port, "uname -m").await, arch);
        let (skew, plus_minus) = clock_skew(&b, port).await;
        eprintln!("{arch}: restore {i}: guest clock {skew:+.3} s (± {plus_minus:.3} s)");
        assert!(skew.abs() < 2.0 + plus_minus, "guest clock off by {skew} s");
        let bytes = urandom(&b, port).await;
        let kex = server_kex(port);
        assert!(
            console(&ctx).contains("nlb-agent: refreshed: reseeded with 64 host bytes"),
            "{}",
            console(&ctx)
        );
        seen.push((bytes, kex));
        down(&b, inst).await;
    }
    assert_ne!(
        seen[0].0, seen[1].0,
        "two restores read the same /dev/urandom bytes"
    );
    assert_ne!(seen[0].1.0, seen[1].1.0, "the same KEXINIT cookie");
    assert_ne!(seen[0].1.1, seen[1].1.1, "the same SSH ephemeral key");
}

#[tokio::test]
async fn aarch64_cold_then_two_fresh_restores() {
    cold_then_two_fresh_restores("aarch64").await;
}

#[tokio::test]
async fn x86_64_cold_then_two_fresh_restores() {
    cold_then_two_fresh_restores("x86_64").await;
}

fn note(inst: &Instance) -> String {
    inst.snapshot_note().unwrap_or("(none)").to_owned()
}

/// A truncated RAM file, a device state QEMU rejects (with a matching checksum, so only
/// QEMU can tell), a changed memory size and a rebuilt kernel: each boots cold at once, the
/// builder works, and the next boot restores the new snapshot.
#[tokio::test]
async fn damaged_or_outdated_snapshots_are_remade() {
    let (_one_vm, img) = vm_test("aarch64").await;
    let b = img.builder_with(|t| set_key(t, "snapshot", "true"));
    let (_state, ctx) = context(&b);
    let files = snapshot::Layout::new(&ctx.dir).current();

    let (inst, _, _) = up(&b, &ctx).await;
    assert_eq!(inst.boot_kind(), BootKind::Cold);
    down(&b, inst).await;
    let first = snapshot::info(&ctx.dir).expect("snapshot");

    // Truncated guest RAM.
    std::fs::OpenOptions::new()
        .write(true)
        .open(files.ram())
        .unwrap()
        .set_len(4096)
        .unwrap();
    match boot::next_boot(&b.lazy.as_ref().unwrap().boot, &ctx).await {
        Ok(boot::NextBoot::MakeSnapshot { why }) => assert!(why.contains("damaged"), "{why}"),
        other => panic!("{other:?}"),
    }
    let (inst, port, _) = up(&b, &ctx).await;
    assert_eq!(inst.boot_kind(), BootKind::Cold);
    assert!(
        note(&inst).contains("damaged") && note(&inst).contains("4096 bytes long"),
        "{}",
        note(&inst)
    );
    assert_eq!(run_over_ssh(&b, port, "uname -m").await, "aarch64");
    down(&b, inst).await;
    let remade = snapshot::info(&ctx.dir).expect("remade");
    assert_eq!(remade.meta.ram_bytes, 1 << 30);
    assert_ne!(remade.meta.devices_sha256, "", "{remade:?}");
    let (inst, _, took) = up(&b, &ctx).await;
    assert_eq!(inst.boot_kind(), BootKind::Restored, "{}", note(&inst));
    eprintln!("restore of the remade snapshot: {took:?}");
    down(&b, inst).await;
    let _ = first;

    // A device state QEMU rejects, recorded as if it were the real one.
    let junk = vec![0x5au8; 4096];
    std::fs::write(files.devices(), &junk).unwrap();
    let meta_text = std::fs::read_to_string(files.meta()).unwrap();
    let mut meta: snapshot::Meta = serde_json::from_str(&meta_text).unwrap();
    meta.devices_bytes = junk.len() as u64;
    meta.devices_sha256 = snapshot::sha256_file(&files.devices()).unwrap();
    std::fs::write(files.meta(), serde_json::to_vec(&meta).unwrap()).unwrap();
    let t0 = Instant::now();
    let (inst, port, took) = up(&b, &ctx).await;
    assert_eq!(inst.boot_kind(), BootKind::Cold);
    assert!(
        note(&inst).starts_with("the restore failed: "),
        "{}",
        note(&inst)
    );
    eprintln!("failed restore + cold boot: {took:?} ({})", note(&inst));
    assert_eq!(run_over_ssh(&b, port, "uname -m").await, "aarch64");
    down(&b, inst).await;
    assert!(t0.elapsed() < READY_WITHIN);
    assert_ne!(
        snapshot::info(&ctx.dir).unwrap().meta.devices_sha256,
        meta.devices_sha256,
        "the rejected snapshot was replaced"
    );

    // A changed memory size.
    let b768 = img.builder_with(|t| set_key(set_key(t, "snapshot", "true"), "memory", "\"768M\""));
    let ctx768 = BootContext::new(&b768, ctx.dir.clone());
    let (inst, _, _) = up(&b768, &ctx768).await;
    assert_eq!(inst.boot_kind(), BootKind::Cold);
    assert_eq!(
        note(&inst),
        "the configuration changed (memory 1024 → 768 MiB)"
    );
    down(&b768, inst).await;
    assert_eq!(snapshot::info(&ctx.dir).unwrap().meta.ram_bytes, 768 << 20);

    // A rebuilt kernel (same path, new file).
    let kernel = img.dir.join("vmlinuz");
    let tmp = img.dir.join("vmlinuz.new");
    std::fs::copy(&kernel, &tmp).unwrap();
    std::fs::rename(&tmp, &kernel).unwrap();
    let (inst, _, _) = up(&b768, &ctx768).await;
    assert_eq!(inst.boot_kind(), BootKind::Cold);
    assert!(
        note(&inst).contains(&format!("kernel {} was rebuilt", kernel.display())),
        "{}",
        note(&inst)
    );
    down(&b768, inst).await;
    let (inst, _, _) = up(&b768, &ctx768).await;
    assert_eq!(inst.boot_kind(), BootKind::Restored, "{}", note(&inst));
    down(&b768, inst).await;
    let _ = Path::new("");
}

/// `snapshot = false` after a snapshot was made: a plain cold boot, and the old snapshot (its
/// RAM holds the guest's host key) is removed.
#[tokio::test]
async fn turning_snapshots_off_removes_the_snapshot() {
    let (_one_vm, img) = vm_test("x86_64").await;
    let b = img.builder_with(|t| set_key(t, "snapshot", "true"));
    let (_state, ctx) = context(&b);
    let (inst, _, _) = up(&b, &ctx).await;
    down(&b, inst).await;
    assert!(snapshot::info(&ctx.dir).is_some());
    let plain = img.builder();
    let ctx2 = BootContext::new(&plain, ctx.dir.clone());
    let (inst, _, _) = up(&plain, &ctx2).await;
    assert_eq!(inst.boot_kind(), BootKind::Cold);
    assert_eq!(inst.snapshot_note(), None);
    assert!(!ctx.dir.join("snapshot").exists());
    down(&plain, inst).await;
}

/// An ephemeral disk (a blank raw image the guest formats and mounts on /nix): the snapshot
/// keeps the disk as it was; each restore writes to a fresh overlay of it, so what one restore
/// wrote is gone in the next, and the guest's filesystem stays consistent.
#[tokio::test]
async fn ephemeral_disk_is_part_of_the_snapshot() {
    let (_one_vm, img) = vm_test("x86_64").await;
    let (_state, ctx0) = {
        let b = img.builder();
        context(&b)
    };
    let disk = ctx0.dir.join("blank.img");
    blank_disk(&disk);
    let b = img.builder_with(|t| {
        let t = set_key(t, "snapshot", "true");
        let t = set_key(t, "ephemeral", "true");
        set_key(t, "disk", &toml_str(&disk.to_string_lossy()))
    });
    let ctx = BootContext::new(&b, ctx0.dir.clone());
    let (inst, port, _) = up(&b, &ctx).await;
    assert_eq!(inst.boot_kind(), BootKind::Cold);
    assert!(
        run_over_ssh(&b, port, "grep ' /nix ' /proc/mounts")
            .await
            .starts_with("/dev/vda /nix"),
        "{}",
        console(&ctx)
    );
    run_over_ssh(&b, port, "echo after-snapshot > /nix/cold; sync").await;
    down(&b, inst).await;
    assert!(snapshot::info(&ctx.dir).unwrap().meta.disk);
    assert!(snapshot::Layout::new(&ctx.dir).current().disk().exists());
    let base = std::fs::read(&disk).unwrap();
    assert!(
        base.iter().all(|&b| b == 0),
        "the configured disk was written to"
    );

    for i in 0..2 {
        let (inst, port, _) = up(&b, &ctx).await;
        assert_eq!(inst.boot_kind(), BootKind::Restored, "{}", note(&inst));
        let seen = run_over_ssh(
            &b,
            port,
            "ls /nix; cat /nix/cold /nix/restored 2>/dev/null; echo restore-$0 > /nix/restored; sync; cat /nix/restored; dmesg | grep -ci 'ext.-fs error' || true",
        )
        .await;
        eprintln!("restore {i}: {seen:?}");
        assert!(seen.contains("store"), "{seen}");
        assert!(
            !seen.contains("after-snapshot"),
            "a write after the snapshot leaked: {seen}"
        );
        assert_eq!(seen.matches("restore-").count(), 1, "{seen}");
        assert!(seen.ends_with('0'), "filesystem errors: {seen}");
        down(&b, inst).await;
    }
}
