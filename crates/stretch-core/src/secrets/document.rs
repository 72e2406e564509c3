//! `secrets.yml` documents: decrypting every leaf into a [`SecretTree`], and encrypting
//! clear leaves in place for `stretch secrets encrypt`.
//!
//! `serde_yaml_ng::Value` has no positions, so [`locate`] walks the document a second
//! time with a serde visitor that fails on purpose at every scalar: the parser stamps
//! each failure with the scalar's line and column, which the visitor reads back and
//! swallows. Those positions point errors at their line and let `encrypt` rewrite a
//! value without touching the rest of the text.

use std::cell::OnceCell;
use std::fmt;

use age::secrecy::zeroize::Zeroize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_yaml_ng::Value;

use super::crypto::{self, Identities};
use super::{DecryptError, Secret, SecretTree, is_armored};
use crate::{Error, Result};

/// One step of a key path: a map key or a list index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl fmt::Display for Seg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seg::Key(k) => f.write_str(k),
            Seg::Index(i) => write!(f, "{i}"),
        }
    }
}

fn dotted(path: &[Seg]) -> String {
    path.iter()
        .map(Seg::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// Something wrong at a key path; becomes an [`Error`] once its position is looked up.
struct Problem {
    path: Vec<Seg>,
    message: String,
    help: Option<String>,
}

/// The shape of a valid secrets document, borrowing its leaves.
enum Node<'a> {
    Leaf(Vec<Seg>, Leaf<'a>),
    Map(Vec<(String, Node<'a>)>),
    List(Vec<Node<'a>>),
}

enum Leaf<'a> {
    Armored(&'a str),
    /// A string, number or bool still in clear.
    Clear(&'a Value),
}

/// A `secrets.yml` being read: its name and text, and the scalar positions, found
/// only when an error or an in-place edit needs them.
struct Doc<'t> {
    label: &'t str,
    text: &'t str,
    located: OnceCell<Option<Vec<Located>>>,
}

impl<'t> Doc<'t> {
    fn new(label: &'t str, text: &'t str) -> Self {
        Doc {
            label,
            text,
            located: OnceCell::new(),
        }
    }

    fn located(&self) -> Option<&[Located]> {
        self.located.get_or_init(|| locate(self.text)).as_deref()
    }

    /// Line and column of the scalar at `path`, or of the first scalar under it.
    fn position(&self, path: &[Seg]) -> Option<(usize, usize)> {
        let located = self.located()?;
        located
            .iter()
            .find(|l| l.path == path)
            .or_else(|| located.iter().find(|l| l.path.starts_with(path)))
            .map(|l| (l.line, l.column))
    }

    fn report(&self, p: Problem) -> Error {
        match self.position(&p.path) {
            // No source excerpt: the lines of a secrets file may hold clear values.
            Some((line, column)) => Error::config(self.label, "", line, column, p.message, p.help),
            None => Error::Invalid {
                message: format!("{}: {}", self.label, p.message),
                help: p.help,
            },
        }
    }

    fn parse(&self) -> Result<Value> {
        serde_yaml_ng::from_str::<Value>(self.text).map_err(|e| {
            let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            Error::config(
                self.label,
                "",
                line,
                column,
                format!("invalid YAML: {e}"),
                None,
            )
        })
    }

    /// The top level must be a mapping; `None` for an empty document.
    fn check_root(&self, doc: &Value) -> Result<bool> {
        match doc {
            Value::Null => Ok(false),
            Value::Mapping(_) => Ok(true),
            _ => Err(Error::invalid_with_help(
                format!(
                    "{}: the top level must be a mapping of names to encrypted values",
                    self.label
                ),
                "e.g. `db: {password: <output of age -a>}`",
            )),
        }
    }
}

/// A map key as a path segment; `None` for keys that are not scalars.
fn key_segment(key: &Value) -> Option<String> {
    match key {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn problem(path: &[Seg], message: String, help: &str) -> Problem {
    Problem {
        path: path.to_vec(),
        message,
        help: Some(help.to_string()),
    }
}

fn shape<'a>(value: &'a Value, path: &mut Vec<Seg>) -> Result<Node<'a>, Problem> {
    match value {
        Value::Mapping(map) => {
            let mut entries: Vec<(String, Node<'a>)> = Vec::with_capacity(map.len());
            for (key, child) in map {
                let Some(name) = key_segment(key) else {
                    return Err(problem(
                        path,
                        format!("a key under `{}` is not text", dotted(path)),
                        "map keys must be plain names",
                    ));
                };
                path.push(Seg::Key(name.clone()));
                if name.is_empty() || name.contains('.') {
                    return Err(problem(
                        path,
                        format!("key `{name}` is empty or contains `.`"),
                        "`.` separates the parts of a `!secret` path; use nested maps instead",
                    ));
                }
                if entries.iter().any(|(k, _)| *k == name) {
                    return Err(problem(
                        path,
                        format!("duplicate key `{}`", dotted(path)),
                        "remove one",
                    ));
                }
                let node = shape(child, path)?;
                path.pop();
                entries.push((name, node));
            }
            Ok(Node::Map(entries))
        }
        Value::Sequence(items) => {
            let mut nodes = Vec::with_capacity(items.len());
            for (i, child) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                nodes.push(shape(child, path)?);
                path.pop();
            }
            Ok(Node::List(nodes))
        }
        Value::String(s) if is_armored(s) => Ok(Node::Leaf(path.clone(), Leaf::Armored(s))),
        Value::String(_) | Value::Number(_) | Value::Bool(_) => {
            Ok(Node::Leaf(path.clone(), Leaf::Clear(value)))
        }
        Value::Null => Err(problem(
            path,
            format!("`{}` has no value", dotted(path)),
            "give it a value (`''` for an empty one) or remove the key",
        )),
        Value::Tagged(tagged) => Err(problem(
            path,
            format!("`{}` has a YAML tag (`{}`)", dotted(path), tagged.tag),
            "a secrets file holds plain values only",
        )),
    }
}

/// Leaves in document order.
fn leaves<'n, 'a>(node: &'n Node<'a>, out: &mut Vec<(&'n [Seg], &'n Leaf<'a>)>) {
    match node {
        Node::Leaf(path, leaf) => out.push((path, leaf)),
        Node::Map(entries) => entries.iter().for_each(|(_, n)| leaves(n, out)),
        Node::List(items) => items.iter().for_each(|n| leaves(n, out)),
    }
}

/// Decrypts every leaf of a `secrets.yml` (`label` names it in errors). Every leaf must
/// be an armored age message: a clear one is an error at its key path, line and
/// column, and nothing is decrypted. An empty document is an empty tree.
pub fn decrypt_secrets_file(label: &str, text: &str, ids: &Identities) -> Result<SecretTree> {
    let doc = Doc::new(label, text);
    let value = doc.parse()?;
    if !doc.check_root(&value)? {
        return Ok(SecretTree::default());
    }
    let node = shape(&value, &mut Vec::new()).map_err(|p| doc.report(p))?;
    let mut all = Vec::new();
    leaves(&node, &mut all);
    if let Some((path, _)) = all.iter().find(|(_, leaf)| matches!(leaf, Leaf::Clear(_))) {
        return Err(doc.report(Problem {
            path: path.to_vec(),
            message: format!("`{}` is not encrypted", dotted(path)),
            help: Some(format!(
                "every value in a secrets file must be an age-armored message; \
                 run `stretch secrets encrypt {label} -r RECIPIENT`"
            )),
        }));
    }
    open(&node, &doc, ids)
}

fn open(node: &Node<'_>, doc: &Doc<'_>, ids: &Identities) -> Result<SecretTree> {
    Ok(match node {
        Node::Leaf(path, Leaf::Armored(armor)) => {
            let text = crypto::decrypt(ids, armor.as_bytes()).and_then(|bytes| {
                String::from_utf8(bytes).map_err(|e| {
                    e.into_bytes().zeroize();
                    DecryptError::NotText
                })
            });
            match text {
                Ok(text) => SecretTree::Value(Secret::new(text)),
                Err(e) => return Err(e.at_key(doc.label, &dotted(path), doc.position(path), ids)),
            }
        }
        Node::Leaf(path, Leaf::Clear(_)) => {
            // Ruled out by the caller; kept as an error rather than a panic.
            return Err(doc.report(Problem {
                path: path.clone(),
                message: format!("`{}` is not encrypted", dotted(path)),
                help: None,
            }));
        }
        Node::Map(entries) => SecretTree::Map(
            entries
                .iter()
                .map(|(k, n)| Ok((k.clone(), open(n, doc, ids)?)))
                .collect::<Result<_>>()?,
        ),
        Node::List(items) => SecretTree::List(
            items
                .iter()
                .map(|n| open(n, doc, ids))
                .collect::<Result<_>>()?,
        ),
    })
}

/// `stretch secrets encrypt`: encrypts every clear leaf (strings; numbers and bools as
/// the text written) to `recipients`, leaves armored leaves untouched, and returns the
/// new YAML text. Keys stay clear; comments and layout are kept where possible.
pub fn encrypt_secrets_file(label: &str, text: &str, recipients: &[String]) -> Result<String> {
    let recipients = crypto::parse_recipients(recipients)?;
    let doc = Doc::new(label, text);
    let value = doc.parse()?;
    if !doc.check_root(&value)? {
        return Ok(text.to_string());
    }
    let node = shape(&value, &mut Vec::new()).map_err(|p| doc.report(p))?;
    let mut all = Vec::new();
    leaves(&node, &mut all);
    let clear: Vec<(&[Seg], &Value)> = all
        .iter()
        .filter_map(|(path, leaf)| match leaf {
            Leaf::Clear(v) => Some((*path, *v)),
            Leaf::Armored(_) => None,
        })
        .collect();
    if clear.is_empty() {
        return Ok(text.to_string());
    }

    let mut expected = value.clone();
    let mut edits = Some(Vec::new());
    for (path, leaf) in clear {
        let span = doc
            .located()
            .and_then(|l| l.iter().find(|l| l.path == path))
            .and_then(|l| offset(text, l.line, l.column))
            .and_then(|start| scalar_span(text, start));
        let mut plain = clear_text(leaf, span.as_ref().map(|s| &text[s.start..s.end]));
        let encrypted = crypto::encrypt_to(&recipients, plain.as_bytes());
        plain.zeroize();
        // One final newline, so that a `|` block holds exactly this text.
        let cipher = format!("{}\n", encrypted?.trim_end());
        edits = match (edits, span) {
            (Some(mut list), Some(span)) => {
                list.extend(span.edits(&cipher, text.len()));
                Some(list)
            }
            _ => None,
        };
        if let Some(slot) = value_at_mut(&mut expected, path) {
            *slot = Value::String(cipher);
        }
    }

    if let Some(edited) = edits.and_then(|e| apply(text, e)) {
        // Keep the edit only if it reads back as exactly the intended document.
        if serde_yaml_ng::from_str::<Value>(&edited).is_ok_and(|v| v == expected) {
            return Ok(edited);
        }
    }
    serde_yaml_ng::to_string(&expected).map_err(|e| {
        Error::failed(
            "secrets encrypt",
            format!("{label}: cannot write YAML: {e}"),
        )
    })
}

/// The text to encrypt for a clear leaf: strings as they are; numbers and bools as
/// written in the file (`0x1F`, `1e3`) when that text reads back as the same value.
fn clear_text(value: &Value, source: Option<&str>) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(_) | Value::Bool(_) => {
            let written = source
                .map(str::trim)
                .filter(|s| serde_yaml_ng::from_str::<Value>(s).ok().as_ref() == Some(value));
            match (written, value) {
                (Some(s), _) => s.to_string(),
                (None, Value::Number(n)) => n.to_string(),
                (None, Value::Bool(b)) => b.to_string(),
                (None, _) => String::new(),
            }
        }
        _ => String::new(),
    }
}

fn value_at_mut<'v>(value: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    path.iter().try_fold(value, |node, seg| match (node, seg) {
        (Value::Mapping(map), Seg::Key(k)) => map
            .iter_mut()
            .find(|(key, _)| key_segment(key).as_deref() == Some(k.as_str()))
            .map(|(_, v)| v),
        (Value::Sequence(items), Seg::Index(i)) => items.get_mut(*i),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------
// Positions

/// Where the scalar at `path` starts (1-based line, 1-based column in characters).
#[derive(Debug, PartialEq, Eq)]
struct Located {
    path: Vec<Seg>,
    line: usize,
    column: usize,
}

/// The message of the deliberate failures; chosen so no real error contains it.
const MARK: &str = "\u{1}stretch-scalar\u{1}";

/// Positions of every scalar leaf, in document order; `None` if the document cannot
/// be walked that way (it then gets errors without a line and a re-serialized edit).
fn locate(text: &str) -> Option<Vec<Located>> {
    let mut out = Vec::new();
    let seed = Locator {
        path: Vec::new(),
        out: &mut out,
    };
    match seed.deserialize(serde_yaml_ng::Deserializer::from_str(text)) {
        Ok(()) => Some(out),
        // A document that is a single scalar: not a valid secrets file anyway.
        Err(_) => None,
    }
}

struct Locator<'o> {
    path: Vec<Seg>,
    out: &'o mut Vec<Located>,
}

/// Reads the position back from the failure's message: `[PATH: ]MARK[ at line L column C]`
/// (serde_yaml_ng leaves the position out at line 1, column 1).
fn position_in(message: &str) -> Option<(usize, usize)> {
    let rest = &message[message.find(MARK)? + MARK.len()..];
    if rest.is_empty() {
        return Some((1, 1));
    }
    let (line, column) = rest.strip_prefix(" at line ")?.split_once(" column ")?;
    Some((line.parse().ok()?, column.trim().parse().ok()?))
}

impl Locator<'_> {
    /// Walks one child; a scalar child "fails" with its position, which is recorded.
    fn child<E: de::Error>(
        out: &mut Vec<Located>,
        path: Vec<Seg>,
        walk: impl FnOnce(Locator<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let seed = Locator {
            path: path.clone(),
            out: &mut *out,
        };
        match walk(seed) {
            Ok(()) => Ok(()),
            Err(e) => match position_in(&e.to_string()) {
                Some((line, column)) => {
                    out.push(Located { path, line, column });
                    Ok(())
                }
                None => Err(e),
            },
        }
    }
}

impl<'de> DeserializeSeed<'de> for Locator<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

macro_rules! scalar_fails {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name<E: de::Error>(self, _: $ty) -> Result<(), E> {
            Err(E::custom(MARK))
        }
    )*};
}

impl<'de> Visitor<'de> for Locator<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML node")
    }

    scalar_fails!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128,
        visit_u128: u128, visit_f64: f64, visit_str: &str);

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(MARK))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Locator { path: parent, out } = self;
        while let Some(key) = map.next_key::<Value>()? {
            let mut path = parent.clone();
            path.push(Seg::Key(key_segment(&key).unwrap_or_default()));
            Self::child(out, path, |seed| map.next_value_seed(seed))?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Locator { path: parent, out } = self;
        let mut i = 0;
        loop {
            let mut path = parent.clone();
            path.push(Seg::Index(i));
            let mut more = true;
            Self::child(out, path, |seed| {
                seq.next_element_seed(seed).map(|v| more = v.is_some())
            })?;
            if !more {
                // The walk found the end of the list: there was no element `i`.
                return Ok(());
            }
            i += 1;
        }
    }
}

/// Byte offset of a 1-based line and 1-based character column.
fn offset(text: &str, line: usize, column: usize) -> Option<usize> {
    let line_start = match line.checked_sub(2) {
        None => 0,
        Some(n) => text.match_indices('\n').nth(n)?.0 + 1,
    };
    let line_text = &text[line_start..];
    line_text
        .char_indices()
        .nth(column.checked_sub(1)?)
        .map(|(i, _)| line_start + i)
}

// ---------------------------------------------------------------------------------
// In-place edits

/// A scalar's text and how it can be replaced.
#[derive(Debug, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
    /// End of the line the scalar ends on (where a new `|` block's lines go).
    eol: usize,
    /// Indentation for the lines of a `|` block, when one may replace the scalar.
    block_indent: Option<usize>,
    /// The scalar is already a `|`/`>` block, running to `end`.
    is_block: bool,
}

struct Edit {
    start: usize,
    end: usize,
    with: String,
}

impl Span {
    fn edits(&self, cipher: &str, text_len: usize) -> Vec<Edit> {
        let Some(indent) = self.block_indent else {
            return vec![Edit {
                start: self.start,
                end: self.end,
                with: double_quoted(cipher),
            }];
        };
        let mut body: String = cipher
            .lines()
            .map(|l| format!("\n{:indent$}{l}", ""))
            .collect();
        let body_end = if self.is_block { self.end } else { self.eol };
        // Without a line break after it, a `|` block would lose its final newline.
        if body_end == text_len {
            body.push('\n');
        }
        if self.is_block {
            vec![Edit {
                start: self.start,
                end: self.end,
                with: format!("|{body}"),
            }]
        } else {
            vec![
                Edit {
                    start: self.start,
                    end: self.end,
                    with: "|".into(),
                },
                Edit {
                    start: self.eol,
                    end: self.eol,
                    with: body,
                },
            ]
        }
    }
}

fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn line_end(text: &str, from: usize) -> usize {
    text[from..].find('\n').map_or(text.len(), |i| from + i)
}

/// The column that a block's lines must be indented past: the key's column, or the
/// last `- ` marker's when the value follows the marker directly.
fn parent_column(prefix: &str) -> Option<usize> {
    let b = prefix.as_bytes();
    let (mut i, mut last_dash) = (0, None);
    loop {
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        if b.get(i) == Some(&b'-') && matches!(b.get(i + 1), None | Some(b' ')) {
            last_dash = Some(i);
            i += 1;
        } else {
            break;
        }
    }
    if i < b.len() { Some(i) } else { last_dash }
}

/// The extent of the scalar that starts at byte `start`, or `None` for forms this does
/// not rewrite (anchors, aliases, tags): those documents are re-serialized instead.
fn scalar_span(text: &str, start: usize) -> Option<Span> {
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let first_eol = line_end(text, start);
    let prefix = &text[line_start..start];
    let parent = parent_column(prefix);
    let bytes = text.as_bytes();
    let (end, is_block) = match bytes.get(start)? {
        b'"' => (quoted_end(bytes, start, b'"')?, false),
        b'\'' => (quoted_end(bytes, start, b'\'')?, false),
        b'|' | b'>' => (block_end(text, first_eol, parent?), true),
        b'&' | b'*' | b'!' | b'[' | b'{' | b'#' => return None,
        _ => {
            let in_flow = prefix.contains(['[', '{']);
            (plain_end(&text[start..first_eol], in_flow) + start, false)
        }
    };
    let eol = if is_block { end } else { line_end(text, end) };
    let rest = text[end..eol].trim();
    let after_key_or_dash = prefix.trim_end().ends_with([':', '-']);
    let block_ok = is_block || (after_key_or_dash && (rest.is_empty() || rest.starts_with('#')));
    let block_indent = if block_ok {
        parent.map(|p| p + 2)
    } else {
        None
    };
    if is_block && block_indent.is_none() {
        return None;
    }
    Some(Span {
        start,
        end,
        eol,
        block_indent,
        is_block,
    })
}

/// End (exclusive) of a quoted scalar opening at `start`.
fn quoted_end(bytes: &[u8], start: usize, quote: u8) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quote == b'"' => i += 2,
            q if q == quote => {
                // In single quotes, `''` is an escaped quote.
                if quote == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// End of a `|`/`>` block whose header line ends at `header_eol`: the last non-blank
/// line indented past `parent`.
fn block_end(text: &str, header_eol: usize, parent: usize) -> usize {
    let (mut end, mut pos) = (header_eol, header_eol);
    while pos < text.len() {
        let from = pos + 1;
        let eol = line_end(text, from);
        let line = &text[from..eol];
        pos = eol;
        if line.trim().is_empty() {
            continue;
        }
        if line.len() - line.trim_start_matches(' ').len() <= parent {
            break;
        }
        end = eol;
    }
    end
}

/// Length of a plain scalar on its line: up to a ` #` comment (or a flow indicator
/// inside `[…]`/`{…}`), without trailing blanks.
fn plain_end(line: &str, in_flow: bool) -> usize {
    let mut end = line.len();
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        if (c == '#' && (prev == ' ' || prev == '\t') && i > 0)
            || (in_flow && matches!(c, ',' | ']' | '}'))
        {
            end = i;
            break;
        }
        prev = c;
    }
    line[..end].trim_end().len()
}

/// Applies non-overlapping edits; `None` if two touch the same text (e.g. an alias
/// and its anchor).
fn apply(text: &str, mut edits: Vec<Edit>) -> Option<String> {
    edits.sort_by_key(|e| (e.start, e.end));
    let mut out =
        String::with_capacity(text.len() + edits.iter().map(|e| e.with.len()).sum::<usize>());
    let mut at = 0;
    let mut last_start = None;
    for e in edits {
        if e.start < at || last_start == Some(e.start) {
            return None;
        }
        out.push_str(&text[at..e.start]);
        out.push_str(&e.with);
        at = e.end;
        last_start = Some(e.start);
    }
    out.push_str(&text[at..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn path(s: &str) -> Vec<Seg> {
        s.split('.')
            .map(|p| {
                p.parse()
                    .map_or_else(|_| Seg::Key(p.to_string()), Seg::Index)
            })
            .collect()
    }

    #[test]
    fn locates_scalars() {
        let text = "# c\na:\n  b: x\n  c: [1, 'two']\nd: |\n  x\ne:\n  - f: 1\n    g: ~\n";
        let got: Vec<(String, usize, usize)> = locate(text)
            .unwrap()
            .into_iter()
            .map(|l| (dotted(&l.path), l.line, l.column))
            .collect();
        let want = [
            ("a.b", 3, 6),
            ("a.c.0", 4, 7),
            ("a.c.1", 4, 10),
            ("d", 5, 4),
            ("e.0.f", 8, 8),
            ("e.0.g", 9, 8),
        ];
        let want: Vec<(String, usize, usize)> = want
            .iter()
            .map(|(p, l, c)| (p.to_string(), *l, *c))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            path("e.0.f"),
            vec![Seg::Key("e".into()), Seg::Index(0), Seg::Key("f".into())]
        );
    }

    #[test]
    fn first_scalar_at_line_one() {
        let located = locate("[x]").unwrap();
        assert_eq!((located[0].line, located[0].column), (1, 2));
        assert_eq!(position_in(&format!("x: {MARK}")), Some((1, 1)));
        assert_eq!(
            position_in(&format!("{MARK} at line 3 column 14")),
            Some((3, 14))
        );
        assert_eq!(position_in("other"), None);
    }

    #[test]
    fn offsets() {
        assert_eq!(offset("ab\ncé: d\n", 2, 5), Some(8));
        assert_eq!(offset("a", 3, 1), None);
    }

    #[test]
    fn spans() {
        let text = "a: hello # c\nb: 'it''s'\n- - v\nk: {x: y, z: w}\n";
        let s = scalar_span(text, 3).unwrap();
        assert_eq!((&text[s.start..s.end], s.block_indent), ("hello", Some(2)));
        let s = scalar_span(text, 16).unwrap();
        assert_eq!(&text[s.start..s.end], "'it''s'");
        let s = scalar_span(text, 28).unwrap();
        assert_eq!((&text[s.start..s.end], s.block_indent), ("v", Some(4)));
        let at = text.find("y,").unwrap();
        let s = scalar_span(text, at).unwrap();
        assert_eq!((&text[s.start..s.end], s.block_indent), ("y", None));
        assert!(scalar_span("a: &x v", 3).is_none());
    }

    #[test]
    fn block_spans() {
        let text = "- k: |\n    one\n\n    two\n  j: x\n";
        let s = scalar_span(text, 5).unwrap();
        assert!(s.is_block);
        assert_eq!(&text[s.start..s.end], "|\n    one\n\n    two");
        assert_eq!(s.block_indent, Some(4));
    }
}
