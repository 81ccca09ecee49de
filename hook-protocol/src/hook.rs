//! The daemon↔hook conversation (docs/protocol.md §3): the settings preamble, `try` requests, the
//! `# accept|decline|decline-permanently|postpone` replies, and the input paths and missing
//! outputs the daemon sends after `# accept`. Both sides are here: the hook's decoders and
//! encoders, and the daemon's, so tests, fuzzers and benchmarks can play the daemon.
//!
//! Must never do I/O, and must never let a reply break the line framing the daemon reads
//! (a machine name is always one line). Decoders follow [`crate::wire`]'s discipline: a proper
//! prefix of a valid message is `Incomplete`, never `Invalid` and never a wrong value.

use std::collections::BTreeSet;

use crate::log::{self, Verbosity};
use crate::store_path::StorePath;
use crate::wire::{self, DecodeError, Invalid, Reader, WireWrite};

/// Marks one more `name, value` pair in the preamble.
const SETTING_MORE: u64 = 1;
/// Ends the preamble.
const SETTING_END: u64 = 0;

/// Nix's defaults for the settings a hook reads, used when the preamble lacks them (the daemon
/// always sends every setting, so these matter only to hand-made preambles).
pub mod defaults {
    pub const BUILDERS: &str = "@/etc/nix/machines";
    pub const STORE: &str = "auto";
    pub const BUILD_POLL_INTERVAL: u64 = 5;
}

/// A setting whose value does not have the type the hook needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting '{name}' from the daemon has the value '{value}', which is not {expected}")]
pub struct SettingError {
    pub name: String,
    pub value: String,
    pub expected: &'static str,
}

/// The `max-jobs` setting. The daemon sends a number, but nix.conf's `auto` is accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxJobs {
    Auto,
    Count(u64),
}

impl MaxJobs {
    /// Whether the local machine may build at all (`max-jobs` > 0).
    pub fn allows_local_builds(self) -> bool {
        self != MaxJobs::Count(0)
    }
}

/// The settings preamble: every global setting of the daemon (or client), by canonical name,
/// each value in its nix.conf string form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    pairs: Vec<(String, String)>,
}

impl Settings {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every pair in the order the daemon sent it.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The value of `name` (the last one, if the preamble repeats a name).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` (replacing an earlier value) — for tests and for playing the daemon.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.pairs.iter_mut().find(|(n, _)| *n == name) {
            Some(pair) => pair.1 = value,
            None => self.pairs.push((name, value)),
        }
    }

    /// Decodes the preamble: `u64 1, string name, string value` repeated, then `u64 0`. Names
    /// must be UTF-8; values that are not are decoded lossily (only a setting the hook ignores
    /// could hold such bytes). Any marker other than 0 or 1 is invalid.
    pub fn decode(r: &mut Reader<'_>) -> wire::Result<Self> {
        let mut pairs = Vec::new();
        loop {
            match r.u64()? {
                SETTING_END => return Ok(Settings { pairs }),
                SETTING_MORE => {
                    let name = r.string("setting name")?;
                    let value = r.text()?;
                    pairs.push((name, value));
                }
                other => {
                    return Err(Invalid::Unexpected {
                        expected: "settings marker 0 or 1".into(),
                        got: format!("{other}"),
                    }
                    .into());
                }
            }
        }
    }

    /// Appends the preamble as the daemon writes it.
    pub fn encode(&self, w: &mut Vec<u8>) {
        for (name, value) in &self.pairs {
            w.put_u64(SETTING_MORE);
            w.put_str(name);
            w.put_str(value);
        }
        w.put_u64(SETTING_END);
    }

    /// A space-separated list setting (empty if absent).
    pub fn list(&self, name: &str) -> Vec<&str> {
        self.get(name)
            .map(|v| v.split_whitespace().collect())
            .unwrap_or_default()
    }

    /// A decimal unsigned setting, or `default` if absent.
    pub fn u64_or(&self, name: &str, default: u64) -> Result<u64, SettingError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| SettingError {
                name: name.into(),
                value: v.into(),
                expected: "a non-negative decimal number",
            }),
        }
    }

    /// A boolean setting (`true`/`false`, and Nix's `yes`/`no`/`1`/`0`), or `default` if absent.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, SettingError> {
        match self.get(name).map(str::trim) {
            None => Ok(default),
            Some("true" | "yes" | "1") => Ok(true),
            Some("false" | "no" | "0") => Ok(false),
            Some(v) => Err(SettingError {
                name: name.into(),
                value: v.into(),
                expected: "'true' or 'false'",
            }),
        }
    }

    /// `builders`: the machine list (Nix's grammar, docs/protocol.md §6).
    pub fn builders(&self) -> &str {
        self.get("builders").unwrap_or(defaults::BUILDERS)
    }

    /// `system`: the local system type, e.g. `x86_64-linux`.
    pub fn system(&self) -> Option<&str> {
        self.get("system")
    }

    /// `extra-platforms`: further systems the local machine can build for.
    pub fn extra_platforms(&self) -> Vec<&str> {
        self.list("extra-platforms")
    }

    /// `system-features`: features local builds support.
    pub fn system_features(&self) -> Vec<&str> {
        self.list("system-features")
    }

    /// `max-jobs` (absent means Nix's default of 1).
    pub fn max_jobs(&self) -> Result<MaxJobs, SettingError> {
        match self.get("max-jobs").map(str::trim) {
            Some("auto") => Ok(MaxJobs::Auto),
            _ => self.u64_or("max-jobs", 1).map(MaxJobs::Count),
        }
    }

    /// `builders-use-substitutes`: let the remote substitute inputs itself.
    pub fn builders_use_substitutes(&self) -> Result<bool, SettingError> {
        self.bool_or("builders-use-substitutes", false)
    }

    /// `store`: which local store the daemon uses.
    pub fn store(&self) -> &str {
        self.get("store").unwrap_or(defaults::STORE)
    }

    /// `max-silent-time` in seconds (0 = no limit).
    pub fn max_silent_time(&self) -> Result<u64, SettingError> {
        self.u64_or("max-silent-time", 0)
    }

    /// `timeout` in seconds (0 = no limit).
    pub fn timeout(&self) -> Result<u64, SettingError> {
        self.u64_or("timeout", 0)
    }

    /// `max-build-log-size` in bytes (0 = no limit).
    pub fn max_build_log_size(&self) -> Result<u64, SettingError> {
        self.u64_or("max-build-log-size", 0)
    }

    /// `keep-failed`.
    pub fn keep_failed(&self) -> Result<bool, SettingError> {
        self.bool_or("keep-failed", false)
    }

    /// `build-poll-interval` in seconds: how soon the daemon asks again after `# postpone`.
    pub fn build_poll_interval(&self) -> Result<u64, SettingError> {
        self.u64_or("build-poll-interval", defaults::BUILD_POLL_INTERVAL)
    }

    /// `experimental-features`.
    pub fn experimental_features(&self) -> Vec<&str> {
        self.list("experimental-features")
    }

    pub fn has_experimental_feature(&self, feature: &str) -> bool {
        self.experimental_features().contains(&feature)
    }
}

/// The body of a `try` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRequest {
    /// The daemon could start a local build now (its running builds < max-jobs).
    pub am_willing: bool,
    /// The derivation's platform, e.g. `aarch64-linux`, or `builtin`.
    pub needed_system: String,
    pub drv_path: StorePath,
    /// `requiredSystemFeatures` (plus `ca-derivations` for floating outputs).
    pub required_features: BTreeSet<String>,
}

/// What the daemon asks of the hook after the preamble (docs/protocol.md §3.2): `try`, or
/// anything else, which means "stop".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookRequest {
    Try(TryRequest),
    /// Any other word: the hook should exit 0 (as it should on EOF).
    Other(String),
}

impl HookRequest {
    pub fn decode(r: &mut Reader<'_>) -> wire::Result<Self> {
        let word = r.bytes()?;
        if word != b"try" {
            return Ok(HookRequest::Other(
                String::from_utf8_lossy(word).into_owned(),
            ));
        }
        let am_willing = r.bool()?;
        let needed_system = r.string("needed system")?;
        let drv = r.str("derivation path")?;
        let drv_path = StorePath::parse(drv)
            .map_err(|e| DecodeError::malformed(format!("`try` request: {e}")))?;
        let required_features = r
            .strings("required features")?
            .into_iter()
            .collect::<BTreeSet<_>>();
        Ok(HookRequest::Try(TryRequest {
            am_willing,
            needed_system,
            drv_path,
            required_features,
        }))
    }

    pub fn encode(&self, w: &mut Vec<u8>) {
        match self {
            HookRequest::Try(t) => {
                w.put_str("try");
                w.put_bool(t.am_willing);
                w.put_str(&t.needed_system);
                w.put_str(t.drv_path.as_str());
                w.put_strings(&t.required_features);
            }
            HookRequest::Other(word) => w.put_str(word),
        }
    }
}

/// The hook's answer to a `try`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The hook takes the build; `machine` is shown as `building '<drv>' on '<machine>'`.
    Accept {
        machine: String,
    },
    Decline,
    DeclinePermanently,
    Postpone,
}

/// Makes `name` one line: every control character (newlines included) becomes a space.
pub fn sanitize_machine_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Reply {
    /// An accept whose machine name is already [sanitised](sanitize_machine_name).
    pub fn accept(machine: &str) -> Self {
        Reply::Accept {
            machine: sanitize_machine_name(machine),
        }
    }

    fn word(&self) -> &'static str {
        match self {
            Reply::Accept { .. } => "accept",
            Reply::Decline => "decline",
            Reply::DeclinePermanently => "decline-permanently",
            Reply::Postpone => "postpone",
        }
    }

    /// Appends the reply lines. The machine name is sanitised here too, so no value of `Reply`
    /// can break the daemon's line framing.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"# ");
        out.extend_from_slice(self.word().as_bytes());
        out.push(b'\n');
        if let Reply::Accept { machine } = self {
            out.extend_from_slice(sanitize_machine_name(machine).as_bytes());
            out.push(b'\n');
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Daemon side: decodes a reply starting at `buf[0]` (a `# ` line, plus the machine line
    /// after `# accept`), returning it with the bytes consumed. An unknown word is invalid, as
    /// it is to the daemon (`bad hook reply`).
    pub fn decode(buf: &[u8]) -> wire::Result<(Self, usize)> {
        let (line, mut used) = next_line(buf)?;
        let word = line.strip_prefix(b"# ").ok_or_else(|| {
            DecodeError::malformed(format!(
                "hook reply line does not start with '# ': {:?}",
                String::from_utf8_lossy(line)
            ))
        })?;
        let reply = match word {
            b"accept" => {
                let (machine, n) = next_line(&buf[used..])?;
                used += n;
                Reply::Accept {
                    machine: String::from_utf8_lossy(machine).into_owned(),
                }
            }
            b"decline" => Reply::Decline,
            b"decline-permanently" => Reply::DeclinePermanently,
            b"postpone" => Reply::Postpone,
            other => {
                return Err(DecodeError::malformed(format!(
                    "bad hook reply '{}'",
                    String::from_utf8_lossy(other)
                )));
            }
        };
        Ok((reply, used))
    }
}

/// One complete line (without its `\n`) and the bytes it used, or `Incomplete`.
fn next_line(buf: &[u8]) -> wire::Result<(&[u8], usize)> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => Ok((&buf[..i], i + 1)),
        None => Err(DecodeError::Incomplete { needed: 1 }),
    }
}

/// One unit of what the daemon reads from the hook's stderr (docs/protocol.md §3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutput {
    Reply(Reply),
    /// An `@nix` JSON line.
    Log(log::Message),
    /// Any other line: the daemon copies it to its own stderr (before accept) or drops it.
    Text(Vec<u8>),
}

impl HookOutput {
    /// Daemon side: decodes the next unit from the hook's stderr. A malformed `@nix` line is
    /// invalid (the 2.8 daemon would throw on it).
    pub fn decode(buf: &[u8]) -> wire::Result<(Self, usize)> {
        let (line, used) = next_line(buf)?;
        if line.starts_with(b"# ") {
            let (reply, used) = Reply::decode(buf)?;
            return Ok((HookOutput::Reply(reply), used));
        }
        if line.starts_with(log::PREFIX.as_bytes()) {
            let msg = log::Message::decode_line(line)
                .map_err(|e| DecodeError::malformed(e.to_string()))?;
            return Ok((HookOutput::Log(msg), used));
        }
        Ok((HookOutput::Text(line.to_vec()), used))
    }
}

/// What the daemon sends right after `# accept`, before it closes the hook's stdin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcceptedBuild {
    /// The input closure: `inputSrcs` plus the used outputs of the input derivations, closed
    /// under references (not the `.drv` itself).
    pub input_paths: BTreeSet<StorePath>,
    /// Output names not yet valid locally (all of them in `--check` mode).
    pub missing_outputs: BTreeSet<String>,
}

impl AcceptedBuild {
    pub fn decode(r: &mut Reader<'_>) -> wire::Result<Self> {
        let input_paths = r.list("input paths", |r| {
            let s = r.str("input path")?;
            StorePath::parse(s).map_err(|e| DecodeError::malformed(format!("input paths: {e}")))
        })?;
        let missing_outputs = r.strings("missing outputs")?;
        Ok(AcceptedBuild {
            input_paths: input_paths.into_iter().collect(),
            missing_outputs: missing_outputs.into_iter().collect(),
        })
    }

    pub fn encode(&self, w: &mut Vec<u8>) {
        w.put_strings(&self.input_paths);
        w.put_strings(&self.missing_outputs);
    }
}

/// The hook's verbosity from its argv: the last argument is the daemon's verbosity number
/// (docs/protocol.md §1.2); numbers above 7 mean 7. `None` if it is not a number.
pub fn verbosity_from_args<I, S>(args: I) -> Option<Verbosity>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let last = args.into_iter().last()?;
    last.as_ref()
        .trim()
        .parse::<u64>()
        .ok()
        .map(Verbosity::saturating_from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_with;
    use proptest::prelude::*;

    const DRV: &str = "/nix/store/00000000000000000000000000000000-hello.drv";

    /// Checks the round trip and that every proper prefix is merely incomplete.
    fn check_prefixes<T: PartialEq + std::fmt::Debug>(
        bytes: &[u8],
        want: &T,
        decode: impl Fn(&[u8]) -> wire::Result<(T, usize)>,
    ) -> Result<(), TestCaseError> {
        let (got, used) = decode(bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&got, want);
        prop_assert_eq!(used, bytes.len());
        for cut in 0..bytes.len() {
            match decode(&bytes[..cut]) {
                Err(e) if e.is_incomplete() => {}
                other => prop_assert!(false, "prefix of {} bytes gave {:?}", cut, other),
            }
        }
        Ok(())
    }

    #[test]
    fn preamble_matches_the_bytes_nix_sends() {
        // docs/protocol.md §2: the first bytes observed from a 2.8 daemon.
        let mut want = Vec::new();
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&19u64.to_le_bytes());
        want.extend_from_slice(b"accept-flake-config\0\0\0\0\0");
        want.extend_from_slice(&5u64.to_le_bytes());
        want.extend_from_slice(b"false\0\0\0");
        want.extend_from_slice(&0u64.to_le_bytes());
        let mut s = Settings::new();
        s.set("accept-flake-config", "false");
        let mut got = Vec::new();
        s.encode(&mut got);
        assert_eq!(got, want);
        assert_eq!(
            decode_with(&want, Settings::decode).unwrap(),
            (s, want.len())
        );
    }

    #[test]
    fn bad_marker_is_invalid() {
        let mut b = Vec::new();
        b.put_u64(2);
        assert!(matches!(
            decode_with(&b, Settings::decode),
            Err(DecodeError::Invalid(Invalid::Unexpected { .. }))
        ));
    }

    #[test]
    fn typed_settings() {
        let mut s = Settings::new();
        for (k, v) in [
            ("builders", "ssh://a x86_64-linux; @/etc/nix/more"),
            ("system", "x86_64-linux"),
            ("extra-platforms", "i686-linux  x86_64-v1-linux"),
            ("system-features", "benchmark big-parallel kvm nixos-test"),
            ("max-jobs", "0"),
            ("builders-use-substitutes", "true"),
            ("store", "daemon"),
            ("max-silent-time", "3600"),
            ("timeout", "0"),
            ("max-build-log-size", "1048576"),
            ("keep-failed", "false"),
            ("build-poll-interval", "2"),
            ("experimental-features", "nix-command ca-derivations"),
        ] {
            s.set(k, v);
        }
        assert_eq!(s.builders(), "ssh://a x86_64-linux; @/etc/nix/more");
        assert_eq!(s.system(), Some("x86_64-linux"));
        assert_eq!(s.extra_platforms(), ["i686-linux", "x86_64-v1-linux"]);
        assert_eq!(s.system_features().len(), 4);
        assert_eq!(s.max_jobs().unwrap(), MaxJobs::Count(0));
        assert!(!s.max_jobs().unwrap().allows_local_builds());
        assert!(s.builders_use_substitutes().unwrap());
        assert_eq!(s.store(), "daemon");
        assert_eq!(s.max_silent_time().unwrap(), 3600);
        assert_eq!(s.timeout().unwrap(), 0);
        assert_eq!(s.max_build_log_size().unwrap(), 1 << 20);
        assert!(!s.keep_failed().unwrap());
        assert_eq!(s.build_poll_interval().unwrap(), 2);
        assert!(s.has_experimental_feature("ca-derivations"));
        assert!(!s.has_experimental_feature("flakes"));

        s.set("max-jobs", "auto");
        assert_eq!(s.max_jobs().unwrap(), MaxJobs::Auto);
        assert!(s.max_jobs().unwrap().allows_local_builds());
        s.set("timeout", "ten");
        let e = s.timeout().unwrap_err();
        assert_eq!(e.name, "timeout");
        assert_eq!(
            e.to_string(),
            "setting 'timeout' from the daemon has the value 'ten', which is not a non-negative \
             decimal number"
        );
        s.set("keep-failed", "maybe");
        assert!(
            s.keep_failed()
                .unwrap_err()
                .to_string()
                .contains("keep-failed")
        );
        s.set("max-silent-time", "-1");
        assert!(s.max_silent_time().is_err());

        let empty = Settings::new();
        assert_eq!(empty.builders(), defaults::BUILDERS);
        assert_eq!(empty.store(), "auto");
        assert_eq!(empty.system(), None);
        assert_eq!(empty.max_jobs().unwrap(), MaxJobs::Count(1));
        assert_eq!(empty.build_poll_interval().unwrap(), 5);
        assert!(empty.extra_platforms().is_empty());
    }

    #[test]
    fn last_duplicate_wins_and_all_pairs_are_kept() {
        let mut b = Vec::new();
        for v in ["1", "2"] {
            b.put_u64(1);
            b.put_str("max-jobs");
            b.put_str(v);
        }
        b.put_u64(0);
        let (s, _) = decode_with(&b, Settings::decode).unwrap();
        assert_eq!(s.pairs().len(), 2);
        assert_eq!(s.max_jobs().unwrap(), MaxJobs::Count(2));
    }

    #[test]
    fn requests() {
        let mut b = Vec::new();
        b.put_str("try");
        b.put_u64(1);
        b.put_str("aarch64-linux");
        b.put_str(DRV);
        b.put_strings(["kvm", "big-parallel", "kvm"]);
        let (r, used) = decode_with(&b, HookRequest::decode).unwrap();
        assert_eq!(used, b.len());
        let HookRequest::Try(t) = r else {
            panic!("{r:?}")
        };
        assert!(t.am_willing);
        assert_eq!(t.needed_system, "aarch64-linux");
        assert_eq!(t.drv_path.as_str(), DRV);
        assert_eq!(
            t.required_features.iter().collect::<Vec<_>>(),
            ["big-parallel", "kvm"]
        );

        let mut b = Vec::new();
        b.put_str("exit");
        assert_eq!(
            decode_with(&b, HookRequest::decode).unwrap().0,
            HookRequest::Other("exit".into())
        );

        let mut b = Vec::new();
        b.put_str("try");
        b.put_u64(0);
        b.put_str("x86_64-linux");
        b.put_str("/not/a/store/path");
        b.put_strings(Vec::<String>::new());
        assert!(matches!(
            decode_with(&b, HookRequest::decode),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn replies_are_exact_lines() {
        assert_eq!(Reply::Decline.to_bytes(), b"# decline\n");
        assert_eq!(
            Reply::DeclinePermanently.to_bytes(),
            b"# decline-permanently\n"
        );
        assert_eq!(Reply::Postpone.to_bytes(), b"# postpone\n");
        assert_eq!(
            Reply::accept("ssh://builder").to_bytes(),
            b"# accept\nssh://builder\n"
        );
        // A machine name can never add a line.
        let evil = Reply::Accept {
            machine: "a\nb\r\n# decline".into(),
        };
        assert_eq!(evil.to_bytes(), b"# accept\na b  # decline\n");
        assert_eq!(
            Reply::accept("a\nb"),
            Reply::Accept {
                machine: "a b".into()
            }
        );
    }

    #[test]
    fn daemon_reads_hook_output() {
        let mut out = Vec::new();
        log::Message::error("no machine").encode(&mut out);
        out.extend_from_slice(b"plain text\n");
        Reply::accept("ssh://b").encode(&mut out);
        let (a, n1) = HookOutput::decode(&out).unwrap();
        assert_eq!(a, HookOutput::Log(log::Message::error("no machine")));
        let (b, n2) = HookOutput::decode(&out[n1..]).unwrap();
        assert_eq!(b, HookOutput::Text(b"plain text".to_vec()));
        let (c, n3) = HookOutput::decode(&out[n1 + n2..]).unwrap();
        assert_eq!(c, HookOutput::Reply(Reply::accept("ssh://b")));
        assert_eq!(n1 + n2 + n3, out.len());

        assert!(matches!(
            HookOutput::decode(b"# maybe\n"),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            HookOutput::decode(b"@nix {\"action\":\"msg\"}\n"),
            Err(DecodeError::Invalid(_))
        ));
        assert!(
            HookOutput::decode(b"# accept\nno newline yet")
                .unwrap_err()
                .is_incomplete()
        );
    }

    #[test]
    fn verbosity_is_the_last_argument() {
        assert_eq!(
            verbosity_from_args(["build-remote", "3"]),
            Some(Verbosity::Info)
        );
        assert_eq!(
            verbosity_from_args(["hook", "--config", "/x", "12"]),
            Some(Verbosity::Vomit)
        );
        assert_eq!(verbosity_from_args(["hook"]), None);
        assert_eq!(verbosity_from_args(Vec::<String>::new()), None);
    }

    fn store_path() -> impl Strategy<Value = StorePath> {
        (
            "[0-9a-df-np-sv-z]{32}",
            "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,20}",
        )
            .prop_map(|(h, n)| {
                StorePath::parse(&format!("/nix/store/{h}-{n}")).expect("generated store path")
            })
    }

    fn settings() -> impl Strategy<Value = Settings> {
        prop::collection::vec((".{0,20}", ".{0,40}"), 0..12).prop_map(|pairs| Settings { pairs })
    }

    fn request() -> impl Strategy<Value = HookRequest> {
        prop_oneof![
            (
                any::<bool>(),
                ".{0,16}",
                store_path(),
                prop::collection::btree_set(".{0,10}", 0..4)
            )
                .prop_map(
                    |(am_willing, needed_system, drv_path, required_features)| {
                        HookRequest::Try(TryRequest {
                            am_willing,
                            needed_system,
                            drv_path,
                            required_features,
                        })
                    }
                ),
            ".{0,10}"
                .prop_filter("not try", |s| s != "try")
                .prop_map(HookRequest::Other),
        ]
    }

    fn reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            "[^\\p{Cc}]{0,30}".prop_map(|machine| Reply::Accept { machine }),
            Just(Reply::Decline),
            Just(Reply::DeclinePermanently),
            Just(Reply::Postpone),
        ]
    }

    proptest! {
        #[test]
        fn settings_round_trip(s in settings()) {
            let mut b = Vec::new();
            s.encode(&mut b);
            check_prefixes(&b, &s, |b| decode_with(b, Settings::decode))?;
        }

        #[test]
        fn requests_round_trip(r in request()) {
            let mut b = Vec::new();
            r.encode(&mut b);
            check_prefixes(&b, &r, |b| decode_with(b, HookRequest::decode))?;
        }

        #[test]
        fn accepted_build_round_trips(
            a in (prop::collection::btree_set(store_path(), 0..6),
                  prop::collection::btree_set("[a-z]{1,8}", 0..4))
                .prop_map(|(input_paths, missing_outputs)| AcceptedBuild { input_paths, missing_outputs })
        ) {
            let mut b = Vec::new();
            a.encode(&mut b);
            check_prefixes(&b, &a, |b| decode_with(b, AcceptedBuild::decode))?;
        }

        #[test]
        fn replies_round_trip(r in reply()) {
            let b = r.to_bytes();
            check_prefixes(&b, &r, Reply::decode)?;
            check_prefixes(&b, &HookOutput::Reply(r.clone()), HookOutput::decode)?;
        }

        #[test]
        fn any_machine_name_stays_on_one_line(m in any::<String>()) {
            let b = Reply::Accept { machine: m }.to_bytes();
            prop_assert_eq!(b.iter().filter(|&&c| c == b'\n').count(), 2);
            let (r, used) = Reply::decode(&b).unwrap();
            prop_assert_eq!(used, b.len());
            let is_accept = matches!(r, Reply::Accept { .. });
            prop_assert!(is_accept);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_with(&data, Settings::decode);
            let _ = decode_with(&data, HookRequest::decode);
            let _ = decode_with(&data, AcceptedBuild::decode);
            let _ = Reply::decode(&data);
            let _ = HookOutput::decode(&data);
        }
    }
}
