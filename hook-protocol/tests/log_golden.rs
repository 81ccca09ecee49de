//! Golden tests for the `@nix` log lines against real Nix 2.8 (`tests/data/hook/hook_capture.sh`).
//! The capture hook wrote `log_hook_before_accept.txt` and `log_hook_after_accept.txt` to the
//! daemon verbatim; `log_nix_2.8_build.jsonl` is what `nix-build -v --log-format internal-json`
//! printed, and `log_nix_2.8_nix_log.txt` what `nix log` printed afterwards.
//!
//! Owns only these checks: those hook lines are exactly what [`Message::encode`] writes; the
//! daemon took every one of them (it relayed them, and the build-log-line result reached the
//! log file); every line Nix itself printed decodes, and re-encodes to the same JSON values.
//! Must never run Nix.

mod golden;

use hook_protocol::log::{Field, Message, Verbosity, activity, result, strip_ansi};
use serde_json::Value;

fn text(name: &str) -> String {
    golden::read_text(&golden::data_dir("log").join(name))
}

fn before_accept() -> Vec<Message> {
    vec![
        Message::Start {
            id: 7,
            level: Verbosity::Info,
            kind: activity::BUILD_WAITING,
            text: "booting builder aarch64".into(),
            fields: vec![Field::from("x"), Field::from(3)],
            parent: None,
        },
        Message::error("remote said: \u{1b}[31mred\u{1b}[0m\nsecond line"),
        Message::Stop { id: 7 },
    ]
}

fn after_accept() -> Vec<Message> {
    vec![
        Message::Start {
            id: 9,
            level: Verbosity::Info,
            kind: activity::BUILD,
            text: "remote build".into(),
            fields: vec![],
            parent: None,
        },
        Message::log_line(9, "hello from result 101"),
        Message::SetPhase {
            phase: "buildPhase".into(),
        },
        Message::Result {
            id: 9,
            kind: result::PROGRESS,
            fields: vec![1.into(), 2.into(), 0.into(), 0.into()],
        },
        Message::Stop { id: 9 },
    ]
}

fn encode_all(msgs: &[Message]) -> String {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out);
    }
    String::from_utf8(out).expect("utf-8")
}

#[test]
fn the_lines_the_daemon_took_are_what_we_encode() {
    assert_eq!(
        encode_all(&before_accept()),
        text("log_hook_before_accept.txt")
    );
    assert_eq!(
        encode_all(&after_accept()),
        text("log_hook_after_accept.txt")
    );
}

/// The `@nix` lines Nix printed, decoded.
fn nix_lines() -> Vec<(String, Message)> {
    let all = text("log_nix_2.8_build.jsonl");
    let lines: Vec<_> = all.lines().filter(|l| l.starts_with("@nix ")).collect();
    assert!(lines.len() > 20, "the capture holds the whole build");
    lines
        .into_iter()
        .map(|l| {
            let m = Message::decode_line(l.as_bytes()).unwrap_or_else(|e| panic!("{l}: {e}"));
            (l.to_owned(), m)
        })
        .collect()
}

#[test]
fn the_daemon_relayed_every_hook_message() {
    let msgs: Vec<Message> = nix_lines().into_iter().map(|(_, m)| m).collect();
    // The daemon re-numbers activities, so compare everything but ids.
    let booting = msgs.iter().find_map(|m| match m {
        Message::Start {
            id,
            kind,
            text,
            fields,
            level,
            ..
        } if text == "booting builder aarch64" => {
            assert_eq!(*kind, activity::BUILD_WAITING);
            assert_eq!(*level, Verbosity::Info);
            assert_eq!(fields, &vec![Field::from("x"), Field::from(3)]);
            Some(*id)
        }
        _ => None,
    });
    let booting = booting.expect("the pre-accept start was relayed");
    assert!(msgs.contains(&Message::Stop { id: booting }));
    assert!(msgs.contains(&before_accept()[1]), "the pre-accept msg");

    let remote = msgs
        .iter()
        .find_map(|m| match m {
            Message::Start { id, text, .. } if text == "remote build" => Some(*id),
            _ => None,
        })
        .expect("the post-accept start was relayed");
    assert!(msgs.contains(&Message::log_line(remote, "hello from result 101")));
    assert!(msgs.contains(&Message::Result {
        id: remote,
        kind: result::PROGRESS,
        fields: vec![1.into(), 2.into(), 0.into(), 0.into()],
    }));
    assert!(msgs.contains(&Message::Stop { id: remote }));
    // setPhase comes back as a result of type 104 on the build's top activity.
    assert!(msgs.iter().any(|m| matches!(
        m,
        Message::Result { kind: result::SET_PHASE, fields, .. } if fields == &vec![Field::from("buildPhase")]
    )));
    // fd 4 lines become build-log-line results of the daemon's "building … on …" activity.
    let building = msgs
        .iter()
        .find_map(|m| match m {
            Message::Start {
                id, kind, fields, ..
            } if *kind == activity::BUILD && fields.len() == 4 => {
                assert_eq!(fields[1], Field::from("ssh://capture-machine"));
                Some(*id)
            }
            _ => None,
        })
        .expect("the daemon's build activity");
    assert!(msgs.contains(&Message::log_line(building, "plain line on fd 4")));

    // Both a result-101 line and an fd 4 line end up in the build log file.
    let log = text("log_nix_2.8_nix_log.txt");
    assert_eq!(log, "hello from result 101\nplain line on fd 4\n");
}

#[test]
fn nix_lines_decode_and_re_encode_to_the_same_values() {
    for (line, m) in nix_lines() {
        let theirs: Value = serde_json::from_str(&line["@nix ".len()..]).expect("json");
        let ours_line = m.to_line();
        let ours: Value =
            serde_json::from_slice(&ours_line["@nix ".len()..ours_line.len() - 1]).expect("json");
        let (Value::Object(theirs), Value::Object(ours)) = (theirs, ours) else {
            panic!("objects expected: {line}")
        };
        for (k, v) in &ours {
            match theirs.get(k) {
                Some(t) => assert_eq!(t, v, "{k} in {line}"),
                // Nix leaves out an empty `fields`.
                None => assert!(k == "fields" && v == &Value::Array(vec![]), "{k} in {line}"),
            }
        }
        for k in theirs.keys() {
            // Nix's error messages carry extra keys the daemon does not read.
            let extra = ["raw_msg", "line", "column", "file"].contains(&k.as_str());
            assert!(ours.contains_key(k) || extra, "{k} lost from {line}");
        }
    }
}

#[test]
fn nix_error_messages_read_cleanly_without_ansi() {
    let last = nix_lines()
        .into_iter()
        .rev()
        .find_map(|(_, m)| match m {
            Message::Msg {
                level: Verbosity::Error,
                msg,
            } if msg.contains("failed with exit code") => Some(msg),
            _ => None,
        })
        .expect("nix-build's final error");
    assert!(last.contains('\u{1b}'), "Nix colours it");
    let plain = strip_ansi(&last);
    assert!(
        plain.starts_with("error: builder for '/nix/store/"),
        "{plain}"
    );
    assert!(
        plain.ends_with("-captured.drv' failed with exit code 1"),
        "{plain}"
    );
}
