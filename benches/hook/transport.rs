//! `cargo bench --bench hook -- TRANSPORT`: the local leg of a warm session on its own — how
//! fast bytes go from the supervisor's relay to the hook through what the supervisor hands
//! over — for the choices there are: a unix socket pair (what it hands over; default buffers,
//! and 1 MiB buffers) and a pipe (64 KiB, the default, and 1 MiB). 1 GiB written in 32 KiB
//! pieces (one SSH packet each, as the relay writes them) and read in 256 KiB reads (as the
//! hook's reader asks), writer and reader on two threads; wall time and CPU of each side.
//!
//! Owns only this measurement; it prints, and writes nothing into BENCHMARKS.md (its figures
//! are quoted by hand in the text there). Must never be taken for the whole transfer: P2 and
//! P3 measure that.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

const TOTAL: usize = 1 << 30;
const WRITE: usize = 32 * 1024;
const READ: usize = 256 * 1024;

/// CPU seconds of the calling thread so far.
fn thread_cpu() -> f64 {
    // SAFETY: getrusage(2) with RUSAGE_THREAD fills the struct it is given.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut r);
        r.ru_utime.tv_sec as f64
            + r.ru_utime.tv_usec as f64 / 1e6
            + r.ru_stime.tv_sec as f64
            + r.ru_stime.tv_usec as f64 / 1e6
    }
}

/// MB/s, writer CPU, reader CPU for 1 GiB from `w` to `r`.
fn measure(w: OwnedFd, r: OwnedFd) -> (f64, f64, f64) {
    let reader = std::thread::spawn(move || {
        let c0 = thread_cpu();
        let mut f = std::fs::File::from(r);
        let mut buf = vec![0u8; READ];
        let mut n = 0;
        loop {
            let k = f.read(&mut buf).unwrap_or_else(|e| panic!("read: {e}"));
            if k == 0 {
                break;
            }
            n += k;
        }
        assert_eq!(n, TOTAL);
        thread_cpu() - c0
    });
    let t = Instant::now();
    let c0 = thread_cpu();
    let mut f = std::fs::File::from(w);
    let data = vec![7u8; WRITE];
    let mut sent = 0;
    while sent < TOTAL {
        f.write_all(&data).unwrap_or_else(|e| panic!("write: {e}"));
        sent += WRITE;
    }
    drop(f);
    let wcpu = thread_cpu() - c0;
    let rcpu = reader
        .join()
        .unwrap_or_else(|_| panic!("the reader panicked"));
    (TOTAL as f64 / t.elapsed().as_secs_f64() / 1e6, wcpu, rcpu)
}

fn socketpair(buf: Option<i32>) -> (OwnedFd, OwnedFd) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    if let Some(size) = buf {
        for s in [&a, &b] {
            for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
                // SAFETY: setsockopt(2) on a socket we own, with a c_int value.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        (&size as *const i32).cast(),
                        std::mem::size_of::<i32>() as libc::socklen_t,
                    )
                };
            }
        }
    }
    (a.into(), b.into())
}

fn pipe(size: Option<i32>) -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills two descriptors, which become ours.
    let (r, w) = unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    if let Some(s) = size {
        // SAFETY: fcntl(2) F_SETPIPE_SZ on our pipe.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, s) };
    }
    (w, r)
}

pub fn run(runs: usize) {
    type Make = fn() -> (OwnedFd, OwnedFd);
    let choices: [(&str, Make); 4] = [
        ("socket pair, default buffers (handed over)", || {
            socketpair(None)
        }),
        ("socket pair, 1 MiB buffers", || socketpair(Some(1 << 20))),
        ("pipe, 64 KiB (default)", || pipe(None)),
        ("pipe, 1 MiB", || pipe(Some(1 << 20))),
    ];
    let mut results: Vec<Vec<(f64, f64, f64)>> = choices.iter().map(|_| Vec::new()).collect();
    for i in 0..runs.max(3) {
        // Rotated, like the other rows.
        for k in 0..choices.len() {
            let c = (i + k) % choices.len();
            let (w, r) = (choices[c].1)();
            results[c].push(measure(w, r));
        }
    }
    eprintln!(
        "[bench] TRANSPORT: 1 GiB in 32 KiB writes, 256 KiB reads, medians of {}",
        runs.max(3)
    );
    for (c, (name, _)) in choices.iter().enumerate() {
        let med = |f: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = results[c].iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        eprintln!(
            "[bench] TRANSPORT {name}: {:.0} MB/s, writer CPU {:.2} s, reader CPU {:.2} s per GiB",
            med(|r| r.0),
            med(|r| r.1),
            med(|r| r.2)
        );
    }
}
