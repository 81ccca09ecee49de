//! The TOML decoder's messages in a user's words: serde says `invalid type: string "4",
//! expected i64` or `unknown field`; a user wrote a value and a key, so the message says
//! `expected a whole number, not the string "4"` and `unknown key`.
//!
//! Owns only the rewording of serde's message shapes (`invalid type`, `invalid value`,
//! `unknown field`, `missing field`, `unknown variant`) and of the Rust type names in them.
//! Must never change what a message is about or drop a part of it: a message it does not
//! recognise is returned as it came.

/// `message` (one serde/toml decoding message) in a user's words.
pub(super) fn user_words(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((found, expected)) = rest.rsplit_once(", expected ")
        {
            return format!(
                "expected {}, not {}",
                expected_words(expected),
                found_words(found)
            );
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return match rest.split_once(", ") {
            Some((field, known)) => {
                let known = if let Some(list) = known.strip_prefix("expected one of ") {
                    format!("the keys allowed here are {}", list.replace('`', ""))
                } else if let Some(one) = known.strip_prefix("expected ") {
                    format!("the only key allowed here is {}", one.replace('`', ""))
                } else if known == "there are no fields" {
                    "no keys are allowed here".to_owned()
                } else {
                    known.to_owned()
                };
                format!("unknown key {field} ({known})")
            }
            None => format!("unknown key {rest}"),
        };
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("missing key {rest}");
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return match rest.split_once(", expected ") {
            Some((value, known)) => format!("unknown value {value} (expected {known})"),
            None => format!("unknown value {rest}"),
        };
    }
    message.to_owned()
}

/// serde's `expected …` (a Rust type name or a visitor's phrase) as a user says it.
fn expected_words(expected: &str) -> String {
    let text = match expected {
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "u64" | "u128" | "usize" => "a whole number of 0 or more",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" | "a borrowed string" | "a char" => "a string in quotes",
        "a sequence" => "a list, [ … ]",
        "a map" => "a table",
        s if s.starts_with("struct ") => "a table",
        s => return s.to_owned(),
    };
    text.to_owned()
}

/// serde's `Unexpected` (what the file had) as a user says it.
fn found_words(found: &str) -> String {
    // Numbers and booleans come as "integer `3`", "integer `3` as i128", "floating point `1.5`",
    // "boolean `true`".
    let quoted = |s: &str| {
        s.split_once('`')
            .and_then(|(_, r)| r.split_once('`'))
            .map(|(v, _)| v.to_owned())
    };
    if (found.starts_with("integer ") || found.starts_with("floating point "))
        && let Some(v) = quoted(found)
    {
        return format!("the number {v}");
    }
    if found.starts_with("boolean ")
        && let Some(v) = quoted(found)
    {
        return v;
    }
    if let Some(s) = found.strip_prefix("string ") {
        return format!("the string {s}");
    }
    if let Some(c) = found.strip_prefix("character ") {
        return format!("the character {c}");
    }
    match found {
        "sequence" => "a list".to_owned(),
        "map" => "a table".to_owned(),
        "string" => "a string".to_owned(),
        f => f.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::user_words;

    #[test]
    fn rust_words_become_user_words() {
        for (serde, user) in [
            (
                "invalid type: string \"4\", expected i64",
                "expected a whole number, not the string \"4\"",
            ),
            (
                "invalid type: floating point `1.5`, expected i64",
                "expected a whole number, not the number 1.5",
            ),
            (
                "invalid type: integer `99999999999999999999` as i128, expected i64",
                "expected a whole number, not the number 99999999999999999999",
            ),
            (
                "invalid type: string \"x\", expected f64",
                "expected a number, not the string \"x\"",
            ),
            (
                "invalid type: integer `1`, expected a boolean",
                "expected true or false, not the number 1",
            ),
            (
                "invalid type: boolean `true`, expected a string",
                "expected a string in quotes, not true",
            ),
            (
                "invalid type: string \"aarch64-linux\", expected a sequence",
                "expected a list, [ … ], not the string \"aarch64-linux\"",
            ),
            (
                "invalid type: integer `1`, expected struct RawBuilder",
                "expected a table, not the number 1",
            ),
            (
                "invalid type: sequence, expected a map",
                "expected a table, not a list",
            ),
            (
                "invalid value: integer `70000`, expected u16",
                "expected a whole number from 0 to 65535, not the number 70000",
            ),
            ("missing field `uri`", "missing key `uri`"),
            (
                "unknown field `foo`, expected one of `uri`, `systems`",
                "unknown key `foo` (the keys allowed here are uri, systems)",
            ),
            (
                "unknown field `foo`, expected `state-dir`",
                "unknown key `foo` (the only key allowed here is state-dir)",
            ),
            (
                "unknown field `foo`, there are no fields",
                "unknown key `foo` (no keys are allowed here)",
            ),
            // TOML's own syntax messages are already in a user's words.
            (
                "string values must be quoted, expected literal string",
                "string values must be quoted, expected literal string",
            ),
        ] {
            assert_eq!(user_words(serde), user, "{serde}");
            for rust in ["i64", "f64", "u16", "struct ", "sequence", "field"] {
                assert!(!user_words(serde).contains(rust) || serde.contains("quoted"));
            }
        }
    }
}
