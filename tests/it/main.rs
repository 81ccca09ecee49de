//! The integration tests, one test crate (`cargo test --test it`): real nix-daemons, real sshd
//! remote stores, real QEMU VMs and the real `nix-lazy-builder` binary, driven through the one
//! harness in [`harness`]. Modules by area; a test's name is its module path
//! (`fault::hang::…`, `security::socket::…`), so `cargo test --test it -- fault::` runs one area.
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
}
mod examples;
mod fault {
    mod hang;
    mod hook_kill;
    mod proxy;
    mod remote_kill;
    mod soak;
    mod supervisor;
    mod vm;
}
mod harness_smoke;
mod hook {
    mod failures;
    mod routing;
    mod stdin;
}
mod lazy {
    mod command;
    mod darling;
    mod qemu;
}
mod remote {
    mod build;
    mod untrusted;
}
mod security {
    mod host_keys;
    mod injection;
    mod secrets;
    mod socket;
}
mod ssh;
mod supervisor {
    mod reload;
    mod runtime;
}
