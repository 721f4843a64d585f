//! Loading errors described in words: the key and what was expected, never
//! the value (the config and TOML crates quote values and lines).

use super::*;

/// A loading error in words that name the key and what was expected, never
/// the value: a token pasted into the wrong key must reach neither a
/// terminal nor the journal. The config crate's own messages quote the value
/// (`invalid type: string "…"`), TOML's quote the offending line.
pub(super) fn describe_load_error(e: &config::ConfigError, file: Option<&Path>) -> String {
    use config::ConfigError as E;
    let origin = |origin: &Option<String>| match origin {
        Some(origin) => format!(" (in {origin})"),
        None => String::new(),
    };
    match e {
        E::Type {
            origin: from,
            unexpected,
            expected,
            key,
        } => {
            // "string \"…\"", "64-bit integer `5`", "map": the kind only.
            let shown = unexpected.to_string();
            let kind = shown.split(['"', '`']).next().unwrap_or_default().trim();
            format!(
                "`{}` must be {}, not a {kind}{}",
                key.as_deref().unwrap_or("?"),
                expected_words(expected),
                origin(from)
            )
        }
        E::At {
            error,
            origin: from,
            key,
        } => {
            let inner = match &**error {
                E::Message(message) => without_values(message),
                other => describe_load_error(other, file),
            };
            match key {
                Some(key) => format!("`{key}`: {inner}{}", origin(from)),
                None => format!("{inner}{}", origin(from)),
            }
        }
        E::NotFound(key) => format!("`{key}` is missing"),
        E::FileParse { uri, cause } => {
            let place = uri
                .as_deref()
                .map(|u| format!(" in {u}"))
                .unwrap_or_default();
            format!("{}{place}", describe_toml_error(&cause.to_string(), file))
        }
        other => without_values(&other.to_string()),
    }
}

/// serde's name for a table is the Rust type (`struct RawAccount`).
pub(super) fn expected_words(expected: &str) -> &str {
    if expected.starts_with("struct ") || expected == "a map" {
        "a table of settings"
    } else {
        expected
    }
}

/// A serde message without the values it quotes: `string "…"` (Debug
/// quoting) and the variant in "unknown variant `…`". Field names, which are
/// keys, stay.
pub(super) fn without_values(message: &str) -> String {
    const UNKNOWN_VARIANT: &str = "unknown variant `";
    // The config crate's own wording, the value unquoted up to the end.
    const NO_VARIANT: &str = "does not have variant constructor ";
    let mut message = message.to_owned();
    if let Some(start) = message.find(NO_VARIANT) {
        // "enum LogFormat does not have variant constructor <value>"
        let start = message[..start].rfind("enum ").unwrap_or(start);
        message.truncate(start);
        message.push_str("not one of the accepted values (README, Configuration)");
    }
    let mut message = message.replace("expected a map", "expected a table of settings");
    // serde names a table by its Rust type: "expected struct RawAccount".
    const STRUCT: &str = "expected struct ";
    if let Some(start) = message.find(STRUCT) {
        let name = start + STRUCT.len();
        let end = message[name..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(message.len(), |e| name + e);
        message.replace_range(start..end, "expected a table of settings");
    }
    if let Some(start) = message.find(UNKNOWN_VARIANT) {
        let value = start + UNKNOWN_VARIANT.len();
        let end = message[value..]
            .find('`')
            .map_or(message.len(), |e| value + e + 1);
        message.replace_range(start..end, "unknown value (not shown)");
    }
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        // Skip to the closing quote, over escapes.
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
        out.push_str("(not shown)");
    }
    out
}

/// A TOML parse error without its snippet of the offending line (which may
/// hold a token, e.g. an unquoted one), naming the key of that line instead.
pub(super) fn describe_toml_error(text: &str, file: Option<&Path>) -> String {
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default().trim().to_owned();
    // The snippet: "  |", "2 | key = value", "  |   ^^^".
    let message: Vec<&str> = lines
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .trim_start()
                    .starts_with('|')
        })
        .collect();
    let line_number = head
        .split("line ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok());
    let text = file.and_then(|f| std::fs::read_to_string(f).ok());
    let mut key = None;
    let mut line_value = None;
    if let (Some(n), Some(text)) = (line_number, &text) {
        let mut section = String::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.starts_with('[') && !trimmed.contains('=') {
                section = trimmed.trim_matches(['[', ']', ' ']).to_owned();
            }
            if i + 1 == n {
                if let Some((k, v)) = trimmed.split_once('=') {
                    let k = k.trim().trim_matches(['"', '\'']);
                    key = Some(if section.is_empty() {
                        k.to_owned()
                    } else {
                        format!("{section}.{k}")
                    });
                    line_value = Some(v.trim().to_owned());
                }
                break;
            }
        }
    }
    let message = message.join("; ");
    // Should the message itself quote the line's value, that goes too.
    let message = match &line_value {
        Some(v) => secrets::redact(&message, &[v, v.trim_matches(['"', '\''])]),
        None => message,
    };
    match key {
        Some(key) => format!("{head} (key `{key}`): {message}"),
        None => format!("{head}: {message}"),
    }
}
