//! The hook's voice towards nix-daemon: reply lines and `@nix` log messages on stderr, and a
//! `tracing` layer that turns events into `@nix` `msg` lines so they reach the user's terminal.
//!
//! stdout and stderr are the same pipe (docs/protocol.md §1.3), and the daemon reads it line by line,
//! so every write here is one whole line under one lock: a reply word and the machine name that
//! follows it can never be split by a log line. Nothing is written while the daemon is not
//! reading (between `try`s) except in answer to a request. Build logs do not go through here;
//! they go to fd 4 (see `transfer`). The copy activities ([`CopyPaths`], [`CopyPath`]) are
//! Nix's own: the same types, texts, fields and results its `copyPaths` sends, so `nix build`
//! shows our copies as it shows its own hook's (docs/protocol.md §3.6).

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hook_protocol::hook::Reply;
use hook_protocol::log::{Field, Message, Verbosity, activity, result};
use tracing::field::{Field as TracingField, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

static STDERR: Mutex<()> = Mutex::new(());
/// Plain text instead of `@nix` lines (the external builder's helper, whose stderr is the
/// build log), and the highest verbosity shown then.
static PLAIN: AtomicU64 = AtomicU64::new(u64::MAX);
static NEXT_ACTIVITY: AtomicU64 = AtomicU64::new(1);

fn write_line(bytes: &[u8]) {
    let _guard = STDERR.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = std::io::stderr().lock();
    // If the daemon has gone away there is nobody left to tell.
    let _ = err.write_all(bytes);
    let _ = err.flush();
}

/// Sends a reply (`# accept` + machine, `# decline`, …) to the daemon.
pub fn reply(r: &Reply) {
    write_line(&r.to_bytes());
}

/// Sends one `@nix` message (in plain mode: its text, if it has any worth a line).
pub fn send(msg: &Message) {
    let plain = PLAIN.load(Ordering::Relaxed);
    if plain == u64::MAX {
        write_line(&msg.to_line());
        return;
    }
    let shown = |level: &Verbosity| (*level as u64) <= plain;
    match msg {
        Message::Msg { level, msg: text } if shown(level) => {
            write_line(format!("{text}\n").as_bytes())
        }
        Message::Start { level, text, .. } if shown(level) && !text.is_empty() => {
            write_line(format!("{text}\n").as_bytes())
        }
        _ => {}
    }
}

/// Sends an error the user always sees, formatted as Nix formats its own (`error: …`).
pub fn error(text: &str) {
    send(&Message::error(format!("error: {text}")));
}

/// A progress-bar activity; stopped when dropped.
pub struct Activity {
    id: u64,
}

impl Activity {
    /// Starts an activity of `kind` (see `hook_protocol::log::activity`).
    pub fn start(level: Verbosity, kind: u64, text: impl Into<String>, fields: Vec<Field>) -> Self {
        // Nix's ids are (pid << 32) + counter; ours follow suit so they never collide with
        // the daemon's own activities.
        let id =
            ((std::process::id() as u64) << 32) | NEXT_ACTIVITY.fetch_add(1, Ordering::Relaxed);
        send(&Message::Start {
            id,
            level,
            kind,
            text: text.into(),
            fields,
            parent: None,
        });
        Activity { id }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn result(&self, kind: u64, fields: Vec<Field>) {
        send(&Message::Result {
            id: self.id,
            kind,
            fields,
        });
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        send(&Message::Stop { id: self.id });
    }
}

/// How often a path's byte count is sent at most while it is copied (its last count always is).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// One "copying N paths" activity, as Nix's `copyPaths` shows a copy between two stores: the
/// NAR bytes of all paths expected up front, then how many paths are done and running as each
/// one goes ([`CopyPaths::path`]). Stopped when dropped.
pub struct CopyPaths {
    act: Activity,
    paths: u64,
    done: u64,
}

impl CopyPaths {
    /// Starts it for `paths` paths of `bytes` NAR bytes in all (Nix starts it also for none).
    pub fn start(paths: usize, bytes: u64) -> Self {
        let act = Activity::start(
            Verbosity::Info,
            activity::COPY_PATHS,
            format!("copying {paths} paths"),
            vec![],
        );
        act.result(
            result::SET_EXPECTED,
            vec![Field::Int(activity::COPY_PATH), Field::Int(bytes)],
        );
        CopyPaths {
            act,
            paths: paths as u64,
            done: 0,
        }
    }

    fn counts(&self, running: u64) {
        self.act.result(
            result::PROGRESS,
            vec![
                Field::Int(self.done),
                Field::Int(self.paths),
                Field::Int(running),
                Field::Int(0),
            ],
        );
    }

    /// Starts copying one path of `nar_size` bytes: "copying path 'P' to 'URI'" for an upload,
    /// "… from 'URI'" otherwise, with Nix's fields `[path, from, to]` (the local store is
    /// `local`).
    pub fn path(&mut self, path: &str, uri: &str, upload: bool, nar_size: u64) -> CopyPath {
        self.counts(1);
        let (text, from, to) = if upload {
            (format!("copying path '{path}' to '{uri}'"), "local", uri)
        } else {
            (format!("copying path '{path}' from '{uri}'"), uri, "local")
        };
        let act = Activity::start(
            Verbosity::Info,
            activity::COPY_PATH,
            text,
            vec![path.into(), from.into(), to.into()],
        );
        CopyPath {
            act,
            expected: nar_size,
            done: 0,
            last: None,
        }
    }

    /// Ends a path started with [`CopyPaths::path`].
    pub fn finished(&mut self, path: CopyPath) {
        path.flush();
        drop(path);
        self.done += 1;
        self.counts(0);
    }
}

/// The activity of one path being copied (see [`CopyPaths::path`]): its bytes so far against
/// its NAR size, sent at most every [`PROGRESS_EVERY`] and once more at the end. Stopped when
/// dropped.
pub struct CopyPath {
    act: Activity,
    expected: u64,
    done: u64,
    last: Option<Instant>,
}

impl CopyPath {
    /// `n` more bytes went through.
    pub fn advance(&mut self, n: u64) {
        self.done += n;
        let now = Instant::now();
        if self.done >= self.expected || self.last.is_none_or(|t| now - t >= PROGRESS_EVERY) {
            self.last = Some(now);
            self.send();
        }
    }

    fn send(&self) {
        self.act.result(
            result::PROGRESS,
            vec![
                Field::Int(self.done),
                Field::Int(self.expected),
                Field::Int(0),
                Field::Int(0),
            ],
        );
    }

    /// Sends the count unless the last one sent was it.
    fn flush(&self) {
        if self.done < self.expected {
            self.send();
        }
    }
}

/// Maps a tracing level to Nix's verbosity.
pub fn nix_level(level: &Level) -> Verbosity {
    match *level {
        Level::ERROR => Verbosity::Error,
        Level::WARN => Verbosity::Warn,
        Level::INFO => Verbosity::Info,
        Level::DEBUG => Verbosity::Chatty,
        Level::TRACE => Verbosity::Vomit,
    }
}

/// A `tracing` layer that writes events at or below `verbosity` as `@nix` msg lines.
pub struct NixLogLayer {
    pub verbosity: Verbosity,
}

struct MessageVisitor {
    message: String,
    fields: String,
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &TracingField, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.fields
                .push_str(&format!(" {}={}", field.name(), value));
        }
    }

    fn record_debug(&mut self, field: &TracingField, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message.push_str(&format!("{value:?}"));
        } else {
            self.fields
                .push_str(&format!(" {}={:?}", field.name(), value));
        }
    }
}

/// Renders an event's message and fields as one line of text.
pub fn render(event: &Event<'_>) -> String {
    let mut v = MessageVisitor {
        message: String::new(),
        fields: String::new(),
    };
    event.record(&mut v);
    v.message.push_str(&v.fields);
    v.message
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for NixLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = nix_level(event.metadata().level());
        if level > self.verbosity {
            return;
        }
        let text = render(event);
        let text = match level {
            Verbosity::Error => format!("error: {text}"),
            Verbosity::Warn => format!("warning: {text}"),
            _ => text,
        };
        send(&Message::msg(level, text));
    }
}

/// Plain-text mode: messages at or below `verbosity` as text lines on stderr, for a process
/// whose stderr is a build log rather than nix-daemon's hook pipe.
pub fn init_plain(verbosity: Verbosity) {
    PLAIN.store(verbosity as u64, Ordering::Relaxed);
    init_hook(verbosity);
}

/// Installs the `@nix` layer as the global subscriber for hook mode.
pub fn init_hook(verbosity: Verbosity) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::filter::LevelFilter::from_level(match verbosity {
        Verbosity::Error => Level::ERROR,
        Verbosity::Warn => Level::WARN,
        Verbosity::Notice | Verbosity::Info | Verbosity::Talkative => Level::INFO,
        Verbosity::Chatty | Verbosity::Debug => Level::DEBUG,
        Verbosity::Vomit => Level::TRACE,
    });
    let _ = tracing_subscriber::registry()
        .with(NixLogLayer { verbosity }.with_filter(filter))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_nix() {
        assert_eq!(nix_level(&Level::ERROR), Verbosity::Error);
        assert_eq!(nix_level(&Level::WARN), Verbosity::Warn);
        assert!(nix_level(&Level::DEBUG) > Verbosity::Info);
    }
}
