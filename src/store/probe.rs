//! Asking the running local nix-daemon what it is and which build hook it really runs, for
//! `doctor`: the version from the worker handshake, and the hook from the daemon's own words.
//!
//! No operation tells a client the daemon's settings (`nix config show` prints the client's
//! view), and nix.conf is no proof: Nix 2.25.0–2.33.x replace a `build-hook` set there with their
//! default (NixOS/nix#15083). So the probe makes the daemon start its hook and say so: on a fresh
//! connection it asks for the daemon's debug messages (SetOptions, verbosity 6) and builds a
//! derivation nothing can build, system `nix-lazy-builder-probe` (every matching builder table
//! declines it, ours included, and no local machine has that system). A daemon starts the hook
//! for such a build and logs `starting build hook '<command>'` first (Nix 2.8 through 2.35);
//! the build then fails, harmlessly. A daemon with an empty `build-hook` starts none and says
//! nothing.
//!
//! The probe's `.drv` (a few hundred bytes, always the same path) is added to the store once if
//! it is missing, through the daemon; the only store change the probe makes. It never builds
//! anything (`max-jobs` 0 and no substitutes for the connection) and never reads a setting from
//! a file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hook_protocol::StorePath;
use hook_protocol::derivation::{BasicDerivation, Derivation, DerivationOutput};
use hook_protocol::path_info::{DerivedPath, OutputsSpec, PathInfo};
use hook_protocol::store_path::{Sha256, nix32_encode};
use hook_protocol::version::ProtocolVersion;
use hook_protocol::wire::WireWrite;
use hook_protocol::worker::ClientOptions;
use tokio::net::UnixStream;

use super::RemoteError;
use super::nar::{NarSink, NarSource};
use super::worker::WorkerClient;

/// The probe derivation's name and system.
pub const PROBE_SYSTEM: &str = "nix-lazy-builder-probe";
/// What a daemon logs (at debug level) when it starts its build hook, up to the command.
const HOOK_STARTED: &str = "starting build hook '";
/// Nix's `lvlDebug`: the level of [`HOOK_STARTED`].
const DEBUG_VERBOSITY: u64 = 6;
const PEER: &str = "the local nix-daemon";

/// What the daemon said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonFacts {
    pub socket: PathBuf,
    /// The worker protocol both sides agreed on.
    pub protocol: ProtocolVersion,
    /// Its Nix version, e.g. `2.26.3` (sent from protocol 1.33, Nix 2.8, on).
    pub nix_version: Option<String>,
    /// The hook it started for the probe, as it printed the command; `None` when it started
    /// none before the probe ended.
    pub hook: Option<String>,
}

/// Connects to the daemon at `socket` (no `nix-daemon --stdio` fallback: the running daemon's
/// answer is the point) and probes it; gives up on the build after `wait` and answers with what
/// it saw by then.
pub async fn probe_daemon(socket: &Path, wait: Duration) -> Result<DaemonFacts, RemoteError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| RemoteError::Protocol {
            peer: format!("{PEER} at {}", socket.display()),
            message: format!("cannot connect: {e}"),
        })?;
    let (r, w) = stream.into_split();
    let mut client = WorkerClient::handshake(r, w, PEER).await?;
    let protocol = client.negotiated().version;
    let nix_version = client.server_info().nix_version.clone();
    client
        .set_options(&ClientOptions {
            verbosity: DEBUG_VERBOSITY,
            max_build_jobs: 0,
            use_substitutes: false,
            ..Default::default()
        })
        .await?;
    let (drv_path, aterm) = probe_derivation();
    if client
        .query_valid_paths(std::slice::from_ref(&drv_path), false)
        .await?
        .is_empty()
    {
        let mut nar = Nar(regular_file_nar(&aterm));
        let info = PathInfo {
            ca: Some(format!("text:sha256:{}", Sha256::digest(&aterm).to_nix32())),
            ..PathInfo::new(drv_path.clone(), Sha256::digest(&nar.0), nar.0.len() as u64)
        };
        client.add_paths(&[info], &mut nar).await?;
    }
    let wanted = DerivedPath::Built {
        drv_path,
        outputs: OutputsSpec::Names(BTreeSet::from(["out".to_owned()])),
    };
    let mut messages = Vec::new();
    let build = client.build_paths_keeping_messages(std::slice::from_ref(&wanted), &mut messages);
    // The build fails (that is the point) or outlives `wait`; either way the messages are in.
    let _ = tokio::time::timeout(wait, build).await;
    Ok(DaemonFacts {
        socket: socket.to_owned(),
        protocol,
        nix_version,
        hook: hook_in(&messages),
    })
}

/// The command in the daemon's first `starting build hook '<command>'` message.
pub fn hook_in(messages: &[String]) -> Option<String> {
    messages.iter().find_map(|m| {
        let rest = m.trim_end().split_once(HOOK_STARTED)?.1;
        Some(rest.strip_suffix('\'').unwrap_or(rest).to_owned())
    })
}

/// The probe's `.drv` path and text: `derivation { name = system = "nix-lazy-builder-probe";
/// builder = "/bin/sh"; args = [ "-c" "exit 1" ]; }`, with the output path Nix gives it.
pub fn probe_derivation() -> (StorePath, Vec<u8>) {
    let mut basic = BasicDerivation {
        outputs: BTreeMap::from([("out".to_owned(), DerivationOutput::default())]),
        input_srcs: BTreeSet::new(),
        platform: PROBE_SYSTEM.to_owned(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), b"exit 1".to_vec()],
        env: BTreeMap::from([
            (b"builder".to_vec(), b"/bin/sh".to_vec()),
            (b"name".to_vec(), PROBE_SYSTEM.as_bytes().to_vec()),
            (b"out".to_vec(), Vec::new()),
            (b"system".to_vec(), PROBE_SYSTEM.as_bytes().to_vec()),
        ]),
    };
    // An input-addressed output's path: the hash of the derivation with its output paths
    // blanked, as `output:out` (no input derivations, so nothing to replace by their hashes).
    let masked = Derivation {
        basic: basic.clone(),
        input_drvs: BTreeMap::new(),
    }
    .to_aterm();
    let out = make_store_path("output:out", &Sha256::digest(&masked), PROBE_SYSTEM);
    if let Some(o) = basic.outputs.get_mut("out") {
        o.path = out.clone();
    }
    basic.env.insert(b"out".to_vec(), out.into_bytes());
    let aterm = Derivation {
        basic,
        input_drvs: BTreeMap::new(),
    }
    .to_aterm();
    // A text file with no references: type `text`.
    let drv = make_store_path(
        "text",
        &Sha256::digest(&aterm),
        &format!("{PROBE_SYSTEM}.drv"),
    );
    let drv = StorePath::parse(&drv).expect("the probe's .drv path is a valid store path");
    (drv, aterm)
}

/// Nix's `makeStorePath(type, hash, name)` in `/nix/store`: the fingerprint
/// `<type>:sha256:<hex>:/nix/store:<name>`, hashed, folded to 20 bytes, in nix32.
fn make_store_path(kind: &str, hash: &Sha256, name: &str) -> String {
    let fingerprint = format!("{kind}:sha256:{}:/nix/store:{name}", hash.to_base16());
    let full = Sha256::digest(fingerprint.as_bytes());
    let mut folded = [0u8; 20];
    for (i, b) in full.0.iter().enumerate() {
        folded[i % 20] ^= b;
    }
    format!("/nix/store/{}-{name}", nix32_encode(&folded))
}

/// The NAR of one regular, non-executable file.
fn regular_file_nar(contents: &[u8]) -> Vec<u8> {
    let mut w = Vec::new();
    for s in ["nix-archive-1", "(", "type", "regular", "contents"] {
        w.put_str(s);
    }
    w.put_bytes(contents);
    w.put_str(")");
    w
}

/// A NAR held in memory (the probe's one small file).
struct Nar(Vec<u8>);

impl NarSource for Nar {
    async fn copy_nar<W: NarSink>(
        &mut self,
        _info: &PathInfo,
        sink: &mut W,
    ) -> Result<(), RemoteError> {
        sink.write(&self.0).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What real Nix (2.8's `nix-instantiate`) makes of the same expression.
    #[test]
    fn probe_paths_are_the_ones_nix_computes() {
        let (drv, aterm) = probe_derivation();
        assert_eq!(
            drv.as_str(),
            "/nix/store/ghywsxp2lmv2v193vhjr1n81ndmb4xph-nix-lazy-builder-probe.drv"
        );
        let text = String::from_utf8(aterm).expect("utf-8");
        assert_eq!(
            text,
            "Derive([(\"out\",\"/nix/store/xnd8js9y2b9x6p7k2c1l13fbgjaqrn9d-nix-lazy-builder-probe\",\"\",\"\")],[],[],\"nix-lazy-builder-probe\",\"/bin/sh\",[\"-c\",\"exit 1\"],[(\"builder\",\"/bin/sh\"),(\"name\",\"nix-lazy-builder-probe\"),(\"out\",\"/nix/store/xnd8js9y2b9x6p7k2c1l13fbgjaqrn9d-nix-lazy-builder-probe\"),(\"system\",\"nix-lazy-builder-probe\")])"
        );
    }

    #[test]
    fn the_hook_command_is_read_from_the_first_start_message() {
        let m = |s: &str| s.to_owned();
        assert_eq!(hook_in(&[m("acquiring write lock\n")]), None);
        assert_eq!(
            hook_in(&[
                m("locking paths\n"),
                m("starting build hook '/usr/bin/nix __build-remote'\n"),
                m("starting build hook 'other'\n"),
            ])
            .as_deref(),
            Some("/usr/bin/nix __build-remote")
        );
        // Nix 2.8 prints its one path; a quote inside the command stays.
        assert_eq!(
            hook_in(&[m("starting build hook '/opt/it's here/nix-lazy-builder'")]).as_deref(),
            Some("/opt/it's here/nix-lazy-builder")
        );
    }

    /// The NAR hash, size and content address real Nix 2.8 registered for the probe's `.drv`.
    #[test]
    fn the_probe_nar_is_the_one_nix_registers() {
        let (_, aterm) = probe_derivation();
        let nar = regular_file_nar(&aterm);
        assert_eq!(nar.len(), 432);
        assert_eq!(
            Sha256::digest(&nar).to_prefixed_nix32(),
            "sha256:0dd0kgjy6nvvk1x7v4diykvm9p2lp893f9q96rn18lici5f8413x"
        );
        assert_eq!(
            Sha256::digest(&aterm).to_nix32(),
            "0kyqc5xmyy75pq6kwfiwg7gx22gy6vjcj72rpqzq2ihp0na2jlys"
        );
    }
}
