//! Parsing YAML into typed values with errors that point at file, line and column,
//! and "did you mean" hints for misspelt keys.

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Parse `text` (the contents of `file`) into `T`. An empty document is an empty map.
pub fn parse<T: DeserializeOwned>(file: &str, text: &str) -> Result<T> {
    let doc = if is_blank(text) { "{}" } else { text };
    serde_yaml_ng::from_str(doc).map_err(|e| error(file, text, &e))
}

/// True when the document holds nothing but blanks and comments.
pub fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---"
    })
}

/// Turn a serde_yaml error into a positioned error with a hint.
pub fn error(file: &str, text: &str, e: &serde_yaml_ng::Error) -> Error {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    let mut message = e.to_string();
    // serde_yaml appends the position; we show it ourselves.
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    let help = did_you_mean(&message);
    Error::config(file, text, line, column, message, help)
}

/// From "unknown field `x`, expected one of `a`, `b`", suggest the closest known key.
fn did_you_mean(message: &str) -> Option<String> {
    let kind = if message.contains("unknown field") {
        "unknown field `"
    } else if message.contains("unknown variant") {
        "unknown variant `"
    } else {
        return None;
    };
    let start = message.find(kind)? + kind.len();
    let rest = &message[start..];
    let found = &rest[..rest.find('`')?];
    let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
    let best = expected
        .iter()
        .map(|c| (levenshtein(found, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(found.len()) / 2).max(1))
        .min();
    match best {
        Some((_, c)) => Some(format!("did you mean `{c}`?")),
        None if expected.is_empty() => None,
        None => Some(format!("expected one of: {}", expected.join(", "))),
    }
}

/// Edit distance, for hints.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// 1-based line of the first occurrence of `needle` in `text`, for errors found
/// after parsing (values carry no positions).
pub fn line_of(text: &str, needle: &str) -> (usize, usize) {
    for (i, l) in text.lines().enumerate() {
        if let Some(c) = l.find(needle) {
            return (i + 1, c + 1);
        }
    }
    (1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        name: String,
        port: Option<u16>,
    }

    fn err(text: &str) -> String {
        match parse::<T>("f.yml", text) {
            Err(Error::Config(c)) => format!(
                "{}:{}: {} | {}",
                c.line,
                c.column,
                c.message,
                c.help.unwrap_or_default()
            ),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn unknown_key_hint() {
        assert_eq!(
            err("name: a\nprot: 1\n"),
            "2:1: unknown field `prot`, expected `name` or `port` | did you mean `port`?"
        );
        assert_eq!(
            err("name: a\nzzzzzzzz: 1\n"),
            "2:1: unknown field `zzzzzzzz`, expected `name` or `port` | expected one of: name, port"
        );
    }

    #[test]
    fn malformed() {
        let e = err("name: [a\n");
        assert!(e.starts_with("2:1:") || e.starts_with("1:"), "{e}");
        assert!(
            err("name: a\nport: x\n").starts_with("2:7: port: invalid type"),
            "{}",
            err("name: a\nport: x\n")
        );
    }

    #[test]
    fn blank_is_empty_map() {
        assert!(is_blank("# c\n\n---\n"));
        assert!(!is_blank("a: 1"));
    }

    #[test]
    fn distances() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "ab"), 2);
        assert_eq!(line_of("a\n  b: !secret x\n", "!secret x"), (2, 6));
    }
}
