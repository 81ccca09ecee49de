//! The integration tests, one test crate (`cargo test --test it`): real nix-daemons, real sshd
//! remote stores, real QEMU VMs and the real `nix-lazy-builder` binary, driven through the one
//! harness in [`harness`]. Modules by area; a test's name is its module path
//! (`fault::hang::…`, `security::socket::…`), so `cargo test --test it -- fault::` runs one area.
//! The long-running soak is ignored by default:
//! `cargo test --release --test it -- --ignored fault::soak`.
//!
//! All tests share one process, so nothing here may change what is process-wide: the
//! environment, the working directory, the umask, signal dispositions. A test that needs such a
//! change runs itself again in a process of its own (`harness::run_one_test`, as `boot::darling`
//! does for PATH). The process's allocator is `bad_input::nar`'s counting one; it counts per
//! thread, so other tests do not disturb its measurements.
//!
//! Must never: hold a second copy of a harness helper in an area module, or touch the machine's
//! own `/nix` (see [`harness`] for the rules every test here follows).

mod harness;

mod bad_input {
    mod config;
    mod nar;
}
mod boot {
    mod command;
    mod darling;
    mod qemu;
    mod snapshot;
}
mod cli {
    mod doctor;
    mod status;
}
mod examples;
mod external {
    mod door;
    mod doors;
    mod limits;
    mod qemu;
    mod remote;
}
mod fault {
    mod hang;
    mod hook_kill;
    mod proxy;
    mod remote_kill;
    mod soak;
    mod supervisor;
    mod term_then_kill;
    mod vm;
    mod warm_hook_kill;
}
mod harness_smoke;
mod hook {
    mod daemon_hook;
    mod failures;
    mod routing;
    mod stdin;
}
mod lazy {
    mod command;
    mod darling;
    mod failures;
    mod progress;
    mod qemu;
    mod snapshot;
}
mod remote {
    mod build;
    mod ca;
    mod substitutes;
    mod untrusted;
}
mod security {
    mod host_keys;
    mod injection;
    mod secrets;
    mod socket;
}
mod ssh;
mod tidy;
mod supervisor {
    mod reload;
    mod runtime;
}
mod warm {
    mod as_today;
    mod fallback;
    mod pool;
    mod supervisor_kill;
}
