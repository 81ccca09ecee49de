//! POSIX shell quoting for remote command lines: SSH runs a command *line* through the remote
//! user's shell, so every word we send is quoted to reach the program as exactly that word.
//!
//! It never builds a command from anything but words it quotes, and refuses a word it cannot
//! pass (one with a NUL byte) instead of mangling it.

/// A word that cannot be passed through a remote shell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{word:?} contains a NUL byte, which cannot be passed in a remote command line")]
pub struct ShellQuoteError {
    pub word: String,
}

/// Quotes one word for a POSIX shell (`sh`, `bash`, `dash`, `zsh`): words made only of
/// characters that no shell treats specially are left alone, everything else is wrapped in
/// single quotes, with each `'` written as `'\''`. The result always parses back to exactly
/// `word`, as one word, with no expansion of any kind.
pub fn shell_quote(word: &str) -> Result<String, ShellQuoteError> {
    if word.contains('\0') {
        return Err(ShellQuoteError {
            word: word.to_owned(),
        });
    }
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:,+@%".contains(&b));
    if plain {
        return Ok(word.to_owned());
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Ok(out)
}

/// Builds a remote command line from words, each quoted with [`shell_quote`]:
/// `shell_command(["nix-store", "--serve", "--write", "--store", x])`.
pub fn shell_command<I, S>(words: I) -> Result<String, ShellQuoteError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for w in words {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&shell_quote(w.as_ref())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a POSIX shell word the way `sh` would (single quotes, backslash outside quotes,
    /// double quotes with their escapes), refusing anything that would expand or split.
    fn sh_unquote(s: &str) -> Option<Vec<String>> {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut in_word = false;
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' => {
                    in_word = true;
                    loop {
                        match chars.next()? {
                            '\'' => break,
                            c => cur.push(c),
                        }
                    }
                }
                '\\' => {
                    in_word = true;
                    cur.push(chars.next()?);
                }
                ' ' => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                '$' | '`' | '"' | ';' | '&' | '|' | '<' | '>' | '(' | ')' | '*' | '?' | '['
                | '#' | '~' | '\n' | '\t' | '=' | '{' | '}' | '!' => return None,
                c => {
                    in_word = true;
                    cur.push(c);
                }
            }
        }
        if in_word {
            words.push(cur);
        }
        Some(words)
    }

    #[test]
    fn shell_quoting_hostile_values() {
        let hostile = [
            "",
            "plain",
            "/nix/store/abc-foo",
            "it's",
            "'",
            "''",
            "a b",
            "$(rm -rf /)",
            "`id`",
            "; reboot",
            "a\nb",
            "x' ; echo pwned; '",
            "\\'",
            "~root",
            "*",
            "FOO=bar",
            "-rf",
            "!event",
            "ünïcødé",
            "{a,b}",
            "#comment",
        ];
        for w in hostile {
            let q = shell_quote(w).unwrap();
            assert_eq!(sh_unquote(&q), Some(vec![w.to_owned()]), "{w:?} -> {q}");
        }
        assert_eq!(shell_quote("nix-store").unwrap(), "nix-store");
        assert_eq!(shell_quote("it's").unwrap(), "'it'\\''s'");
        assert!(shell_quote("a\0b").is_err());
        let cmd =
            shell_command(["nix-store", "--serve", "--write", "--store", "x'; id #"]).unwrap();
        assert_eq!(
            sh_unquote(&cmd).unwrap(),
            ["nix-store", "--serve", "--write", "--store", "x'; id #"]
        );
    }

    proptest::proptest! {
        #[test]
        fn shell_quote_round_trips(words in proptest::collection::vec("[^\\x00]{0,12}", 0..5)) {
            let cmd = shell_command(&words).unwrap();
            proptest::prop_assert_eq!(sh_unquote(&cmd).unwrap(), words);
        }
    }
}
