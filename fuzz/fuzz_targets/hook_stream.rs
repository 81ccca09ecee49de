//! The hook's stdin as nix-daemon writes it (settings preamble, `try`, then the inputs and
//! wanted outputs after `# accept`), each message alone, and the daemon-side readers of the
//! hook's stderr (`# reply` lines and `@nix` JSON).
#![no_main]

use hook_protocol::hook::{AcceptedBuild, HookOutput, HookRequest, Reply, Settings};
use hook_protocol::log::Message;
use libfuzzer_sys::fuzz_target;
use nix_lazy_builder_fuzz::check;

fuzz_target!(|data: &[u8]| {
    check("hook stream", data, |r| {
        Settings::decode(r)?;
        if let HookRequest::Try(_) = HookRequest::decode(r)? {
            AcceptedBuild::decode(r)?;
        }
        Ok(())
    });
    check("settings", data, Settings::decode);
    check("request", data, HookRequest::decode);
    check("accepted", data, AcceptedBuild::decode);
    if let Ok((reply, n)) = Reply::decode(data) {
        assert!(n <= data.len());
        // What the daemon read back, the hook writes as the same lines.
        if let Reply::Accept { machine } = &reply {
            assert_eq!(
                Reply::accept(machine)
                    .to_bytes()
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count(),
                2
            );
        }
    }
    if let Ok((_, n)) = HookOutput::decode(data) {
        assert!(n <= data.len());
    }
    let _ = Message::decode_line(data);
});
