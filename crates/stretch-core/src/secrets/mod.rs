//! Secrets: age identities, `secrets.yml` files whose leaves are armored age messages,
//! and `*.age` files (SPEC §4).
//!
//! # API
//!
//! * Keys — [`Identities::from_file`] / [`Identities::parse`] read an identity file as
//!   written by `age-keygen` or [`generate`] (comments + `AGE-SECRET-KEY-1…` lines);
//!   [`write_new_identity`] writes a fresh one with mode `0600` (`stretch keys
//!   generate`).
//! * Single messages — [`encrypt_armored`] (= `age -a -r R…`), [`decrypt`] (binary or
//!   armored; fails with a [`DecryptError`]), [`decrypt_file`] (for `*.age` files: the
//!   error names the file), [`is_armored`].
//! * `secrets.yml` — [`decrypt_secrets_file`] gives a [`SecretTree`] (the build);
//!   [`encrypt_secrets_file`] encrypts clear leaves in place (`stretch secrets
//!   encrypt`); [`SecretTree::to_yaml`] prints it back (`stretch secrets show`);
//!   [`SecretTree::get`] / [`SecretTree::secret`] resolve `!secret dotted.path`;
//!   [`SecretTree::to_json`] is what goes into the release configuration.
//!
//! # Rules
//!
//! * A decrypted value is a [`Secret`]: it has no `Display`, its `Debug` prints
//!   `Secret(***)`, its memory is zeroed on drop; [`Secret::expose`] is the one way in.
//!   Error messages never hold plaintext nor key material, and errors about
//!   `secrets.yml` or identity files carry no source excerpt (it would show values).
//! * `secrets.yml` is a mapping; maps and lists nest freely and a list index is a path
//!   segment (`hosts.0.password`). Map keys are clear, may not be empty nor contain
//!   `.` (the path separator). Every leaf must be an armored age message; a clear
//!   leaf, a null or a tagged value is an error at its line and column. An empty file
//!   (or one with no leaves) is an empty tree.
//! * Encrypting a clear leaf encrypts its text as written (`5432`, `true`, `0x1F` stay
//!   those characters) and rewrites only that value in the file, as a `|` block (or a
//!   double-quoted string inside a flow collection), so comments and layout survive;
//!   armored leaves are left byte for byte. Should the in-place edit not re-read as
//!   intended (anchors, unusual layouts), the whole document is re-serialized instead.
//! * Wrong identity and corrupt armor are bad input (`Error::Invalid` / `Error::Config`,
//!   exit 2), naming the file and the key path.
//! * Only X25519 keys are supported: the `age` crate is built without its `ssh`
//!   feature, so SSH identities/recipients get a clear error.

mod crypto;
mod document;

#[cfg(test)]
mod tests;

use std::fmt;

use age::secrecy::{ExposeSecret, SecretString};

pub(crate) use crypto::parse_recipients;
pub use crypto::{
    DecryptError, Identities, decrypt, decrypt_file, encrypt_armored, generate, is_armored,
    write_new_identity,
};
pub use document::{decrypt_secrets_file, encrypt_secrets_file};

use crate::{Error, Result};

/// A decrypted value. It does not implement `Display`, its `Debug` prints
/// `Secret(***)`, and its memory is zeroed when dropped; [`Secret::expose`] gives the text.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(text: String) -> Self {
        Secret(SecretString::from(text))
    }

    /// The clear text. Callers must keep it out of logs and messages.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The decrypted contents of a `secrets.yml`: maps (in file order), lists and values.
#[derive(Clone, Debug)]
pub enum SecretTree {
    Value(Secret),
    Map(Vec<(String, SecretTree)>),
    List(Vec<SecretTree>),
}

impl Default for SecretTree {
    fn default() -> Self {
        SecretTree::Map(Vec::new())
    }
}

impl SecretTree {
    /// The value or subtree at a dotted path (`db.password`, `hosts.0.key`).
    pub fn get(&self, dotted: &str) -> Option<&SecretTree> {
        if dotted.is_empty() {
            return None;
        }
        dotted
            .split('.')
            .try_fold(self, |node, segment| match node {
                SecretTree::Map(entries) => {
                    entries.iter().find(|(k, _)| k == segment).map(|(_, v)| v)
                }
                SecretTree::List(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                SecretTree::Value(_) => None,
            })
    }

    /// The value at a dotted path, if that path is a value (not a map or list).
    pub fn secret(&self, dotted: &str) -> Option<&Secret> {
        self.get(dotted).and_then(SecretTree::as_secret)
    }

    pub fn as_secret(&self) -> Option<&Secret> {
        match self {
            SecretTree::Value(s) => Some(s),
            _ => None,
        }
    }

    pub fn contains(&self, dotted: &str) -> bool {
        self.get(dotted).is_some()
    }

    /// True when the tree holds no value at all (empty maps and lists don't count).
    pub fn is_empty(&self) -> bool {
        match self {
            SecretTree::Value(_) => false,
            SecretTree::Map(entries) => entries.iter().all(|(_, v)| v.is_empty()),
            SecretTree::List(items) => items.iter().all(SecretTree::is_empty),
        }
    }

    /// Every value with its dotted path, in file order (e.g. to mask them in logs).
    pub fn secrets(&self) -> Vec<(String, &Secret)> {
        fn walk<'a>(node: &'a SecretTree, path: &str, out: &mut Vec<(String, &'a Secret)>) {
            let join = |seg: &str| {
                if path.is_empty() {
                    seg.to_string()
                } else {
                    format!("{path}.{seg}")
                }
            };
            match node {
                SecretTree::Value(s) => out.push((path.to_string(), s)),
                SecretTree::Map(entries) => {
                    entries.iter().for_each(|(k, v)| walk(v, &join(k), out))
                }
                SecretTree::List(items) => items
                    .iter()
                    .enumerate()
                    .for_each(|(i, v)| walk(v, &join(&i.to_string()), out)),
            }
        }
        let mut out = Vec::new();
        walk(self, "", &mut out);
        out
    }

    /// The clear values as JSON (strings, objects, arrays), for the release
    /// configuration. The result holds plaintext.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            SecretTree::Value(s) => serde_json::Value::String(s.expose().to_string()),
            SecretTree::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
            SecretTree::List(items) => {
                serde_json::Value::Array(items.iter().map(SecretTree::to_json).collect())
            }
        }
    }

    /// The decrypted document as YAML text (`stretch secrets show`). Holds plaintext.
    pub fn to_yaml(&self) -> Result<String> {
        fn value(node: &SecretTree) -> serde_yaml_ng::Value {
            use serde_yaml_ng::Value as V;
            match node {
                SecretTree::Value(s) => V::String(s.expose().to_string()),
                SecretTree::Map(entries) => V::Mapping(
                    entries
                        .iter()
                        .map(|(k, v)| (V::String(k.clone()), value(v)))
                        .collect(),
                ),
                SecretTree::List(items) => V::Sequence(items.iter().map(value).collect()),
            }
        }
        serde_yaml_ng::to_string(&value(self))
            .map_err(|e| Error::failed("secrets show", format!("cannot render YAML: {e}")))
    }
}
