//! `NIX_SSHOPTS`: the ssh options Nix's hook passes to ssh, of which we honour what changes
//! where and as whom we connect (`-p`, `-i`, `-o Port=`, `-o IdentityFile=`), and list the rest
//! as ignored.
//!
//! It parses the value it is given; it never reads the environment (`main` does, and passes
//! the value in).

use std::path::PathBuf;

use super::uri::parse_port;

/// What we take from `NIX_SSHOPTS`: the defaults Nix's hook would hand to ssh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SshOpts {
    /// From `-p PORT`, `-pPORT`, `-o Port=PORT`.
    pub port: Option<u16>,
    /// From `-i KEY`, `-iKEY`, `-o IdentityFile=KEY`.
    pub identity: Option<PathBuf>,
    /// Options we do not honour, as written (reported at debug level).
    pub ignored: Vec<String>,
}

// ssh(1) options that take no argument, and those that take one.
const SSH_FLAGS_NO_ARG: &str = "46AaCfGgKkMNnqsTtVvXxYy";
const SSH_FLAGS_WITH_ARG: &str = "BbcDEeFIiJLlmOoPpQRSWw";

impl SshOpts {
    /// Parse a `NIX_SSHOPTS` value (shell-style word splitting, as current Nix does; plain
    /// whitespace-separated values, as Nix 2.8 splits them, come out the same). Like ssh, the
    /// first `-p` / `-i` wins.
    pub fn parse(value: &str) -> SshOpts {
        let mut opts = SshOpts::default();
        let args = shell_split(value);
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
                opts.ignored.push(arg.clone());
                continue;
            };
            for (pos, c) in flags.char_indices() {
                if SSH_FLAGS_NO_ARG.contains(c) {
                    continue;
                }
                if !SSH_FLAGS_WITH_ARG.contains(c) {
                    opts.ignored.push(arg.clone());
                    break;
                }
                let rest = &flags[pos + c.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest.to_owned()
                } else if let Some(next) = args.get(i) {
                    i += 1;
                    next.clone()
                } else {
                    opts.ignored.push(format!("{arg} (no value)"));
                    break;
                };
                opts.take_option(c, &value);
                break;
            }
            // Flags without arguments in a cluster other than the value-taking one (e.g. -v,
            // -C) change nothing we model; note them once.
            if flags.chars().all(|c| SSH_FLAGS_NO_ARG.contains(c)) {
                opts.ignored.push(arg.clone());
            }
        }
        opts
    }

    fn take_option(&mut self, flag: char, value: &str) {
        match flag {
            'p' => self.take_port(value, &format!("-p {value}")),
            'i' => self.take_identity(value),
            'o' => {
                let (key, val) = match value.split_once('=') {
                    Some((k, v)) => (k.trim(), v.trim()),
                    None => match value.trim().split_once([' ', '\t']) {
                        Some((k, v)) => (k.trim(), v.trim()),
                        None => (value.trim(), ""),
                    },
                };
                if key.eq_ignore_ascii_case("port") {
                    self.take_port(val, &format!("-o {value}"));
                } else if key.eq_ignore_ascii_case("identityfile") {
                    self.take_identity(val);
                } else {
                    self.ignored.push(format!("-o {value}"));
                }
            }
            other => self.ignored.push(format!("-{other} {value}")),
        }
    }

    fn take_port(&mut self, value: &str, written: &str) {
        match parse_port(value.trim()) {
            Some(p) if self.port.is_none() => self.port = Some(p),
            Some(_) => {}
            None => self.ignored.push(format!("{written} (not a port number)")),
        }
    }

    fn take_identity(&mut self, value: &str) {
        if self.identity.is_none() && !value.is_empty() {
            self.identity = Some(PathBuf::from(value));
        }
    }
}

/// Split like a POSIX shell would (quotes and backslashes; no expansions).
fn shell_split(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.peek() {
                            Some(&n) if matches!(n, '"' | '\\' | '$' | '`') => {
                                cur.push(n);
                                chars.next();
                            }
                            _ => cur.push('\\'),
                        },
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn sshopts_port_and_identity() {
        for (v, port, key) in [
            ("-p 2222", Some(2222), None),
            ("-p2222 -i /k", Some(2222), Some("/k")),
            ("-oPort=2200 -i/k2", Some(2200), Some("/k2")),
            ("-o Port=2201", Some(2201), None),
            (
                "-o 'Port 2202' -o IdentityFile=/k3",
                Some(2202),
                Some("/k3"),
            ),
            ("-vp 2203", Some(2203), None),
            ("-p 1 -p 2 -i /a -i /b", Some(1), Some("/a")),
            ("-C -o StrictHostKeyChecking=no -F /cfg", None, None),
            ("-i \"/with space/k\"", None, Some("/with space/k")),
            ("", None, None),
        ] {
            let o = SshOpts::parse(v);
            assert_eq!(o.port, port, "{v}");
            assert_eq!(o.identity.as_deref(), key.map(Path::new), "{v}");
        }
        let o = SshOpts::parse("-C -o StrictHostKeyChecking=no -F /cfg -p nope -l");
        assert_eq!(
            o.ignored,
            [
                "-C",
                "-o StrictHostKeyChecking=no",
                "-F /cfg",
                "-p nope (not a port number)",
                "-l (no value)"
            ]
        );
        assert_eq!(o.port, None);
    }

    #[test]
    fn shell_split_quotes() {
        assert_eq!(
            shell_split(r#" a 'b c' "d \"e\"" f\ g "" "#),
            ["a", "b c", "d \"e\"", "f g", ""]
        );
    }
}
