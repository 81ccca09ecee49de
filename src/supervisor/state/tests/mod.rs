//! The state machine's tests, one file per rule (requests, lifecycle, reconfigure, status,
//! timers, boots) and the invariants over random event sequences; this file is their harness: a
//! machine, a clock that only moves when a test says so, and helpers to read actions.

mod boots;
mod invariants;
mod lifecycle;
mod reconfigure;
mod requests;
mod status;
mod timers;
mod warm;

use super::*;
use crate::supervisor::proto::BuilderStatus;
use std::time::SystemTime;

const S: Duration = Duration::from_secs(1);

fn cfg(name: &str, max_jobs: u32, idle: Option<u64>) -> BuilderConfig {
    BuilderConfig {
        name: name.to_owned(),
        max_jobs,
        idle_timeout: idle.map(Duration::from_secs),
        boot_timeout: Duration::from_secs(120),
        boot_fingerprint: 0,
        snapshot: false,
    }
}

/// `cfg` with other boot settings.
fn rebooted(mut c: BuilderConfig) -> BuilderConfig {
    c.boot_fingerprint += 1;
    c
}

fn names(t: &T) -> Vec<String> {
    t.m.status(t.now).into_iter().map(|s| s.name).collect()
}

struct T {
    m: Machine,
    now: Instant,
}

impl T {
    fn new(builders: Vec<BuilderConfig>, linger: Option<u64>) -> T {
        Self::with_history(builders, linger, &BootHistory::default())
    }

    fn with_history(builders: Vec<BuilderConfig>, linger: Option<u64>, h: &BootHistory) -> T {
        let settings = Settings {
            exit_after_idle: linger.map(Duration::from_secs),
            reloads: false,
            config_file: None,
        };
        Self::with_settings(builders, settings, h)
    }

    /// A machine with a configuration file to read again.
    fn reloading(builders: Vec<BuilderConfig>) -> T {
        let settings = Settings {
            exit_after_idle: None,
            reloads: true,
            config_file: Some("/etc/nix/lazy-builder.toml".into()),
        };
        Self::with_settings(builders, settings, &BootHistory::default())
    }

    fn with_settings(builders: Vec<BuilderConfig>, settings: Settings, h: &BootHistory) -> T {
        // The tests' one clock reading: a starting instant, moved only by `advance`.
        let now = Instant::now();
        T {
            m: Machine::new(builders, settings, h, now, SystemTime::now()),
            now,
        }
    }

    fn ev(&mut self, e: Event) -> Vec<Action> {
        let out = self.m.handle(e, self.now);
        assert!(
            self.m.has_exited() || matches!(out.last(), Some(Action::SetTimer(_))),
            "every handle ends with SetTimer: {out:?}"
        );
        out
    }

    fn req(&mut self, conn: ConnId, r: Request) -> Vec<Action> {
        self.ev(Event::Request(conn, r))
    }

    /// The single reply to `conn` among `actions`.
    fn reply(actions: &[Action], conn: ConnId) -> Response {
        let r: Vec<&Response> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Reply { conn: c, response } if *c == conn => Some(response),
                _ => None,
            })
            .collect();
        assert_eq!(r.len(), 1, "one reply to {conn}: {actions:?}");
        r[0].clone()
    }

    fn ask(&mut self, conn: ConnId, r: Request) -> Response {
        let out = self.req(conn, r);
        Self::reply(&out, conn)
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.ev(Event::Tick)
    }

    fn status(&self, name: &str) -> BuilderStatus {
        self.m
            .status(self.now)
            .into_iter()
            .find(|s| s.name == name)
            .unwrap()
    }

    fn generation(&self, name: &str) -> Generation {
        self.m
            .slot_index(name)
            .map_or(0, |i| self.m.slots[i].generation)
    }

    fn reconfigure(&mut self, builders: Vec<BuilderConfig>) -> Vec<Action> {
        self.ev(Event::Reconfigure(builders))
    }

    fn boot(&mut self, conn: ConnId, name: &str) -> Vec<Action> {
        self.boot_with(conn, name, false)
    }

    fn boot_with(&mut self, conn: ConnId, name: &str, force: bool) -> Vec<Action> {
        self.req(
            conn,
            Request::Boot {
                builder: name.into(),
                force,
            },
        )
    }

    /// The single reply to a boot request.
    fn ask_boot(&mut self, conn: ConnId, name: &str, force: bool) -> Response {
        let out = self.boot_with(conn, name, force);
        Self::reply(&out, conn)
    }

    fn down(&mut self, conn: ConnId, name: &str) -> Vec<Action> {
        self.req(
            conn,
            Request::Down {
                builder: name.into(),
            },
        )
    }

    /// A cold boot of the current instance succeeds after `took` seconds.
    fn succeed(&mut self, name: &str, took: u64) -> Vec<Action> {
        let generation = self.generation(name);
        self.boot_succeeded(
            name,
            generation,
            Duration::from_secs(took),
            BootKind::Cold,
            false,
            None,
        )
    }

    /// Instance `generation` of `name` reports its boot done (the current one or a stale one).
    fn boot_succeeded(
        &mut self,
        name: &str,
        generation: Generation,
        took: Duration,
        kind: BootKind,
        restorable: bool,
        note: Option<&str>,
    ) -> Vec<Action> {
        self.ev(Event::BootSucceeded {
            builder: name.into(),
            generation,
            port: 2222,
            nix_version: "nix-store (Nix) 2.8.0".into(),
            took,
            kind,
            restorable,
            note: note.map(str::to_owned),
            warm: None,
        })
    }

    fn fail(&mut self, name: &str, cause: &str) -> Vec<Action> {
        let generation = self.generation(name);
        self.ev(Event::BootFailed {
            builder: name.into(),
            generation,
            cause: cause.into(),
        })
    }

    /// The current instance of `name` ends on its own.
    fn exited(&mut self, name: &str, report: &str) -> Vec<Action> {
        let generation = self.generation(name);
        self.ev(Event::InstanceExited {
            builder: name.into(),
            generation,
            report: report.into(),
        })
    }

    fn stopped(&mut self, name: &str) -> Vec<Action> {
        let generation = self.generation(name);
        self.ev(Event::StopFinished {
            builder: name.into(),
            generation,
            report: "exited with status 0".into(),
        })
    }

    fn bring_up(&mut self, name: &str) {
        self.ev(Event::ClientConnected(99));
        let out = self.boot(99, name);
        assert!(has_start(&out, name), "{out:?}");
        self.succeed(name, 5);
        self.ev(Event::ClientGone(99));
        assert_eq!(self.status(name).state, State::Up);
    }

    fn lease(&mut self, conn: ConnId, name: &str) -> Response {
        self.ask(
            conn,
            Request::Lease {
                builder: name.into(),
            },
        )
    }

    fn release(&mut self, conn: ConnId, name: &str) -> Vec<Action> {
        self.req(
            conn,
            Request::Release {
                builder: name.into(),
            },
        )
    }
}

fn has_start(out: &[Action], name: &str) -> bool {
    out.iter()
        .any(|a| matches!(a, Action::StartBoot { builder, .. } if builder == name))
}

fn has_stop(out: &[Action], name: &str) -> bool {
    out.iter()
        .any(|a| matches!(a, Action::Stop { builder, .. } if builder == name))
}

fn has_reply(out: &[Action]) -> bool {
    out.iter().any(|a| matches!(a, Action::Reply { .. }))
}

fn has_exit(out: &[Action]) -> bool {
    out.contains(&Action::Exit)
}

fn timer(out: &[Action]) -> Option<Instant> {
    match out.last() {
        Some(Action::SetTimer(t)) => *t,
        _ => None,
    }
}

fn refused(r: &Response) -> &str {
    match r {
        Response::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}
