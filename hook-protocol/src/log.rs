//! The `@nix` JSON log lines a hook writes on stderr (docs/protocol.md §3.6): the message types,
//! their one-line encoding, a decoder for lines from a peer or a test, Nix's activity, result
//! and verbosity numbers, and a helper that strips ANSI escapes from remote text.
//!
//! Must never emit a line the 2.8 daemon could choke on: every number is a non-negative integer,
//! every field is an unsigned integer or a string, and no text can break the one-line framing
//! (JSON escapes newlines). Pure encoding and decoding; the caller writes the bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The prefix that marks a structured log line.
pub const PREFIX: &str = "@nix ";

/// Nix's verbosity levels (the `level` of `msg` and `start`, and the hook's argv verbosity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
#[repr(u8)]
pub enum Verbosity {
    Error = 0,
    Warn = 1,
    Notice = 2,
    Info = 3,
    Talkative = 4,
    Chatty = 5,
    Debug = 6,
    Vomit = 7,
}

impl Verbosity {
    pub const ALL: [Verbosity; 8] = [
        Verbosity::Error,
        Verbosity::Warn,
        Verbosity::Notice,
        Verbosity::Info,
        Verbosity::Talkative,
        Verbosity::Chatty,
        Verbosity::Debug,
        Verbosity::Vomit,
    ];

    /// The level for a number, clamping anything above 7 to [`Verbosity::Vomit`] (what a hook
    /// does with `-vvvvvvvv` in its argv).
    pub fn saturating_from(n: u64) -> Self {
        Self::ALL[n.min(7) as usize]
    }
}

impl From<Verbosity> for u64 {
    fn from(v: Verbosity) -> u64 {
        v as u64
    }
}

/// A verbosity number outside 0..=7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("verbosity level {0} is out of range (0..=7)")]
pub struct BadVerbosity(pub u64);

impl TryFrom<u64> for Verbosity {
    type Error = BadVerbosity;
    fn try_from(n: u64) -> Result<Self, BadVerbosity> {
        Self::ALL.get(n as usize).copied().ok_or(BadVerbosity(n))
    }
}

impl fmt::Display for Verbosity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verbosity::Error => "error",
            Verbosity::Warn => "warn",
            Verbosity::Notice => "notice",
            Verbosity::Info => "info",
            Verbosity::Talkative => "talkative",
            Verbosity::Chatty => "chatty",
            Verbosity::Debug => "debug",
            Verbosity::Vomit => "vomit",
        })
    }
}

/// Activity types (`type` of a `start` message).
pub mod activity {
    pub const UNKNOWN: u64 = 0;
    pub const COPY_PATH: u64 = 100;
    pub const FILE_TRANSFER: u64 = 101;
    pub const REALISE: u64 = 102;
    pub const COPY_PATHS: u64 = 103;
    pub const BUILDS: u64 = 104;
    pub const BUILD: u64 = 105;
    pub const OPTIMISE_STORE: u64 = 106;
    pub const VERIFY_PATHS: u64 = 107;
    pub const SUBSTITUTE: u64 = 108;
    pub const QUERY_PATH_INFO: u64 = 109;
    pub const POST_BUILD_HOOK: u64 = 110;
    pub const BUILD_WAITING: u64 = 111;
    /// Current Nix only.
    pub const FETCH_TREE: u64 = 112;
}

/// Result types (`type` of a `result` message).
pub mod result {
    pub const FILE_LINKED: u64 = 100;
    /// `[line]`; the daemon also appends `line + "\n"` to the build log file.
    pub const BUILD_LOG_LINE: u64 = 101;
    pub const UNTRUSTED_PATH: u64 = 102;
    pub const CORRUPTED_PATH: u64 = 103;
    pub const SET_PHASE: u64 = 104;
    /// `[done, expected, running, failed]`.
    pub const PROGRESS: u64 = 105;
    /// `[activityType, expected]`.
    pub const SET_EXPECTED: u64 = 106;
    pub const POST_BUILD_LOG_LINE: u64 = 107;
    /// Current Nix only.
    pub const FETCH_STATUS: u64 = 108;
}

/// One field of a `start` or `result` message: Nix accepts only these two kinds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Field {
    Int(u64),
    Str(String),
}

impl From<u64> for Field {
    fn from(n: u64) -> Self {
        Field::Int(n)
    }
}

impl From<&str> for Field {
    fn from(s: &str) -> Self {
        Field::Str(s.to_owned())
    }
}

impl From<String> for Field {
    fn from(s: String) -> Self {
        Field::Str(s)
    }
}

/// One `@nix` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Message {
    /// A plain log message; the client shows it if `level` ≤ its verbosity.
    Msg {
        level: Verbosity,
        msg: String,
    },
    /// Starts an activity (a progress-bar entry).
    Start {
        id: u64,
        level: Verbosity,
        #[serde(rename = "type")]
        kind: u64,
        text: String,
        #[serde(default)]
        fields: Vec<Field>,
        /// Ignored by the daemon (it parents the activity itself) but sent by Nix's own hook.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<u64>,
    },
    Stop {
        id: u64,
    },
    Result {
        id: u64,
        #[serde(rename = "type")]
        kind: u64,
        #[serde(default)]
        fields: Vec<Field>,
    },
    SetPhase {
        phase: String,
    },
}

/// Why a line is not a `@nix` message.
#[derive(Debug, thiserror::Error)]
pub enum LogDecodeError {
    #[error("log line does not start with '@nix '")]
    NoPrefix,
    #[error("log line is not UTF-8")]
    NotUtf8,
    #[error("bad @nix message: {0}")]
    Json(#[from] serde_json::Error),
}

impl Message {
    /// A `msg` at `level`.
    pub fn msg(level: Verbosity, text: impl Into<String>) -> Self {
        Message::Msg {
            level,
            msg: text.into(),
        }
    }

    /// An error message as the user should see it (level 0 always shows).
    pub fn error(text: impl Into<String>) -> Self {
        Self::msg(Verbosity::Error, text)
    }

    /// A build-log-line result for activity `id`.
    pub fn log_line(id: u64, line: impl Into<String>) -> Self {
        Message::Result {
            id,
            kind: result::BUILD_LOG_LINE,
            fields: vec![Field::Str(line.into())],
        }
    }

    /// Appends `@nix <json>\n`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(PREFIX.as_bytes());
        // Serialising these types cannot fail: every key is a string and every value a
        // string, an unsigned integer or a list of them.
        if serde_json::to_writer(&mut *out, self).is_err() {
            out.extend_from_slice(
                br#"{"action":"msg","level":0,"msg":"(unencodable log message)"}"#,
            );
        }
        out.push(b'\n');
    }

    /// The encoded line, `@nix <json>\n`.
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode(&mut out);
        out
    }

    /// Decodes one line, with or without its trailing `\n`. Unknown keys (Nix's own hook adds
    /// `raw_msg`, `line`, `column`, `file` to `msg`) are ignored.
    pub fn decode_line(line: &[u8]) -> Result<Self, LogDecodeError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let json = line
            .strip_prefix(PREFIX.as_bytes())
            .ok_or(LogDecodeError::NoPrefix)?;
        let json = std::str::from_utf8(json).map_err(|_| LogDecodeError::NotUtf8)?;
        Ok(serde_json::from_str(json)?)
    }
}

/// Removes ANSI escape sequences (CSI such as colours, OSC such as hyperlinks, and two-byte
/// escapes) from `text`, as remote error messages are coloured. Other text is kept unchanged.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // CSI: parameters and intermediates, then one final byte in 0x40..=0x7e.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            // OSC: up to BEL or ESC '\'.
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            // nF escapes (e.g. `ESC ( B`): intermediates 0x20..=0x2f, then one final character.
            Some(c) if (' '..='/').contains(&c) => {
                for c in chars.by_ref() {
                    if !(' '..='/').contains(&c) {
                        break;
                    }
                }
            }
            // Any other escape is two characters long.
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line(m: &Message) -> String {
        String::from_utf8(m.to_line()).expect("utf-8")
    }

    #[test]
    fn encodes_the_shapes_the_daemon_reads() {
        assert_eq!(
            line(&Message::error("boom")),
            "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"boom\"}\n"
        );
        let start = Message::Start {
            id: 7,
            level: Verbosity::Info,
            kind: activity::BUILD_WAITING,
            text: "booting builder aarch64".into(),
            fields: vec![Field::from("x"), Field::from(3)],
            parent: None,
        };
        assert_eq!(
            line(&start),
            "@nix {\"action\":\"start\",\"id\":7,\"level\":3,\"type\":111,\
             \"text\":\"booting builder aarch64\",\"fields\":[\"x\",3]}\n"
        );
        assert_eq!(
            line(&Message::Stop { id: 7 }),
            "@nix {\"action\":\"stop\",\"id\":7}\n"
        );
        assert_eq!(
            line(&Message::log_line(9, "hello")),
            "@nix {\"action\":\"result\",\"id\":9,\"type\":101,\"fields\":[\"hello\"]}\n"
        );
        assert_eq!(
            line(&Message::SetPhase {
                phase: "buildPhase".into()
            }),
            "@nix {\"action\":\"setPhase\",\"phase\":\"buildPhase\"}\n"
        );
    }

    #[test]
    fn text_never_breaks_the_line() {
        let m = Message::error("a\nb\r\nc\u{0}d\u{2028}\"\\");
        let l = m.to_line();
        assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(l.last(), Some(&b'\n'));
        assert!(!l.contains(&b'\r'));
        assert_eq!(Message::decode_line(&l).unwrap(), m);
    }

    #[test]
    fn decodes_nix_own_hook_lines_and_rejects_bad_types() {
        let nix = br#"@nix {"action":"msg","column":null,"file":null,"level":0,"line":null,"msg":"\u001b[31;1merror:\u001b[0m x","raw_msg":"x"}"#;
        match Message::decode_line(nix).unwrap() {
            Message::Msg { level, msg } => {
                assert_eq!(level, Verbosity::Error);
                assert_eq!(strip_ansi(&msg), "error: x");
            }
            other => panic!("{other:?}"),
        }
        let start = br#"@nix {"action":"start","id":1,"level":4,"type":0,"text":"t","parent":0}"#;
        assert!(matches!(
            Message::decode_line(start).unwrap(),
            Message::Start { fields, parent: Some(0), .. } if fields.is_empty()
        ));
        for bad in [
            &br#"@nix {"action":"msg","level":-1,"msg":"x"}"#[..],
            br#"@nix {"action":"msg","level":8,"msg":"x"}"#,
            br#"@nix {"action":"msg","level":1.5,"msg":"x"}"#,
            br#"@nix {"action":"result","id":1,"type":101,"fields":[-3]}"#,
            br#"@nix {"action":"result","id":1,"type":101,"fields":[null]}"#,
            br#"@nix {"action":"result","id":1,"type":101,"fields":[1.5]}"#,
            br#"@nix {"action":"stop","id":"1"}"#,
            br#"@nix {"action":"nope"}"#,
            br#"@nix {"action":"stop"}"#,
            br#"@nix not json"#,
        ] {
            assert!(
                matches!(Message::decode_line(bad), Err(LogDecodeError::Json(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            Message::decode_line(br#"{"action":"stop","id":1}"#),
            Err(LogDecodeError::NoPrefix)
        ));
        assert!(matches!(
            Message::decode_line(b"@nix \xff"),
            Err(LogDecodeError::NotUtf8)
        ));
    }

    #[test]
    fn verbosity_numbers_and_names() {
        for (n, v) in Verbosity::ALL.iter().enumerate() {
            assert_eq!(u64::from(*v), n as u64);
            assert_eq!(Verbosity::try_from(n as u64).unwrap(), *v);
        }
        assert_eq!(Verbosity::try_from(8), Err(BadVerbosity(8)));
        assert_eq!(Verbosity::saturating_from(99), Verbosity::Vomit);
        assert_eq!(Verbosity::Talkative.to_string(), "talkative");
        assert!(Verbosity::Error < Verbosity::Info);
    }

    #[test]
    fn strips_ansi() {
        let remote = "\u{1b}[0mbuilder for '\u{1b}[35;1m/nix/store/x.drv\u{1b}[0m' failed";
        assert_eq!(strip_ansi(remote), "builder for '/nix/store/x.drv' failed");
        assert_eq!(
            strip_ansi("a\u{1b}]8;;http://x\u{7}link\u{1b}]8;;\u{1b}\\b"),
            "alinkb"
        );
        assert_eq!(strip_ansi("x\u{1b}(By"), "xy");
        assert_eq!(strip_ansi("plain ü\ttext"), "plain ü\ttext");
        assert_eq!(strip_ansi("cut\u{1b}[3"), "cut");
        assert_eq!(strip_ansi("end\u{1b}"), "end");
    }

    fn verbosity() -> impl Strategy<Value = Verbosity> {
        (0u64..8).prop_map(Verbosity::saturating_from)
    }

    fn field() -> impl Strategy<Value = Field> {
        prop_oneof![
            any::<u64>().prop_map(Field::Int),
            ".{0,12}".prop_map(Field::Str)
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (verbosity(), any::<String>()).prop_map(|(level, msg)| Message::Msg { level, msg }),
            (
                any::<u64>(),
                verbosity(),
                any::<u64>(),
                any::<String>(),
                prop::collection::vec(field(), 0..5),
                any::<Option<u64>>()
            )
                .prop_map(|(id, level, kind, text, fields, parent)| Message::Start {
                    id,
                    level,
                    kind,
                    text,
                    fields,
                    parent
                }),
            any::<u64>().prop_map(|id| Message::Stop { id }),
            (
                any::<u64>(),
                any::<u64>(),
                prop::collection::vec(field(), 0..5)
            )
                .prop_map(|(id, kind, fields)| Message::Result { id, kind, fields }),
            any::<String>().prop_map(|phase| Message::SetPhase { phase }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip_on_one_line(m in message()) {
            let l = m.to_line();
            let starts = l.starts_with(b"@nix {");
            prop_assert!(starts);
            prop_assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(l.last(), Some(&b'\n'));
            prop_assert_eq!(Message::decode_line(&l).unwrap(), m);
        }

        #[test]
        fn strip_ansi_removes_every_escape(s in any::<String>()) {
            let out = strip_ansi(&s);
            prop_assert!(!out.contains('\u{1b}'), "escape left in {:?}", out);
            if !s.contains('\u{1b}') {
                prop_assert_eq!(out, s);
            }
        }

        #[test]
        fn decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..100)) {
            let mut l = b"@nix ".to_vec();
            l.extend_from_slice(&data);
            let _ = Message::decode_line(&l);
        }
    }
}
