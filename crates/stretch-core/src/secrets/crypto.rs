//! The age side of secrets: identity files, recipients, armored encryption and
//! decryption of single messages (binary or armored).

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use age::armor::{ArmoredReader, ArmoredWriter, Format};
use age::secrecy::ExposeSecret;
use age::secrecy::zeroize::Zeroize;
use age::x25519;

use crate::{Error, Result};

const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

/// Identities loaded from an age identity file: comment lines and one or more
/// `AGE-SECRET-KEY-1…` lines, as written by `age-keygen` or `stretch keys generate`.
pub struct Identities {
    label: String,
    keys: Vec<x25519::Identity>,
    /// Unencrypted `ssh-ed25519` (or `ssh-rsa`) private keys, as age allows.
    ssh: Vec<age::ssh::Identity>,
}

// Hand-written so that no key material can ever reach a log through `{:?}`.
impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identities")
            .field("label", &self.label)
            .field("count", &(self.keys.len() + self.ssh.len()))
            .finish()
    }
}

impl Identities {
    /// Reads an identity file. Errors name the path (missing, unreadable, no identity).
    pub fn from_file(path: &Path) -> Result<Self> {
        let label = path.display().to_string();
        let mut text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::invalid_with_help(
                format!("identity file `{label}` does not exist"),
                "give an age identity with `--identity FILE` or `STRETCH_IDENTITY`; \
                 create one with `stretch keys generate -o FILE`",
            ),
            io::ErrorKind::InvalidData => {
                Error::invalid(format!("identity file `{label}` is not UTF-8 text"))
            }
            _ => Error::invalid(format!("cannot read identity file `{label}`: {e}")),
        })?;
        let parsed = Self::parse(&label, &text);
        text.zeroize();
        parsed
    }

    /// Parses the text of an identity file; `label` names it in errors. Errors give the
    /// line number, never the line itself.
    pub fn parse(label: &str, text: &str) -> Result<Self> {
        if text.contains("-----BEGIN OPENSSH PRIVATE KEY-----")
            || text.contains("-----BEGIN RSA PRIVATE KEY-----")
        {
            return Self::parse_ssh(label, text);
        }
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match x25519::Identity::from_str(line) {
                Ok(key) => keys.push(key),
                Err(_) => return Err(not_an_identity(label, i + 1, line)),
            }
        }
        if keys.is_empty() {
            return Err(Error::invalid_with_help(
                format!("identity file `{label}` holds no age identity"),
                "an identity line starts with `AGE-SECRET-KEY-1`; \
                 create one with `stretch keys generate -o FILE`",
            ));
        }
        Ok(Identities {
            label: label.to_string(),
            keys,
            ssh: Vec::new(),
        })
    }

    /// An OpenSSH private key file (as age accepts with `-i ~/.ssh/id_ed25519`).
    fn parse_ssh(label: &str, text: &str) -> Result<Self> {
        let key = age::ssh::Identity::from_buffer(
            io::BufReader::new(text.as_bytes()),
            Some(label.to_string()),
        )
        .map_err(|_| {
            Error::invalid(format!(
                "identity file `{label}` is not a valid OpenSSH private key"
            ))
        })?;
        match key {
            age::ssh::Identity::Unencrypted(_) => Ok(Identities {
                label: label.to_string(),
                keys: Vec::new(),
                ssh: vec![key],
            }),
            age::ssh::Identity::Encrypted(_) => Err(Error::invalid_with_help(
                format!("the SSH key `{label}` is protected by a passphrase"),
                "builds are not interactive: use an unencrypted deploy key or an age X25519 identity",
            )),
            age::ssh::Identity::Unsupported(_) => Err(Error::invalid(format!(
                "the SSH key `{label}` is of a type age does not support (use ssh-ed25519 or ssh-rsa)"
            ))),
        }
    }

    /// Where the identities came from (the path given to [`Identities::from_file`]).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The recipients (`age1…`) matching these identities, in file order.
    pub fn recipients(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.to_public().to_string())
            .collect()
    }

    fn as_age(&self) -> impl Iterator<Item = &dyn age::Identity> {
        let x = self.keys.iter().map(|k| k as &dyn age::Identity);
        x.chain(self.ssh.iter().map(|k| k as &dyn age::Identity))
    }
}

/// The error for a line of an identity file that is not an X25519 identity. The line
/// is not quoted: it may be key material.
fn not_an_identity(label: &str, line_no: usize, line: &str) -> Error {
    let (message, help) = if line.starts_with("-----BEGIN") {
        (
            "an SSH or PEM private key is not supported here",
            "use an age X25519 identity (`AGE-SECRET-KEY-1…`), e.g. from `stretch keys generate`",
        )
    } else if line.starts_with("age1") {
        (
            "this is a recipient (public key), not an identity",
            "the identity file needs the secret key line (`AGE-SECRET-KEY-1…`)",
        )
    } else if line.starts_with("AGE-PLUGIN-") {
        (
            "age plugin identities are not supported",
            "use an age X25519 identity (`AGE-SECRET-KEY-1…`)",
        )
    } else {
        (
            "not an age identity",
            "expected comment lines (`# …`) and `AGE-SECRET-KEY-1…` lines",
        )
    };
    // No source text: the file holds secret keys, which must not be echoed.
    Error::config(label, "", line_no, 1, message, Some(help.to_string()))
}

/// A new X25519 identity: the identity file's contents, exactly in `age-keygen`'s
/// format (`# created: …`, `# public key: age1…`, `AGE-SECRET-KEY-1…`), and its
/// recipient `age1…`.
pub fn generate() -> (String, String) {
    let key = x25519::Identity::generate();
    let recipient = key.to_public().to_string();
    let secret = key.to_string();
    let file = format!(
        "# created: {}\n# public key: {recipient}\n{}\n",
        rfc3339_utc(SystemTime::now()),
        secret.expose_secret()
    );
    (file, recipient)
}

/// Generates an identity and writes it to `path`, readable by its owner only (like
/// `age-keygen -o`). Refuses to overwrite an existing file. Returns the recipient.
pub fn write_new_identity(path: &Path) -> Result<String> {
    let (mut contents, recipient) = generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let label = path.display();
    let written = options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()));
    contents.zeroize();
    written.map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => Error::invalid_with_help(
            format!("`{label}` already exists"),
            "stretch never overwrites an identity; choose another path or remove the file",
        ),
        _ => Error::invalid(format!("cannot write identity file `{label}`: {e}")),
    })?;
    Ok(recipient)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as `age-keygen` writes it when the zone is UTC.
fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = crate::util::civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Whether `s` is (or at least starts like) an ASCII-armored age message. A damaged
/// armor still counts, so that it is reported as corrupt rather than encrypted again.
pub fn is_armored(s: &str) -> bool {
    s.trim_start().starts_with(ARMOR_BEGIN)
}

/// A recipient: an age X25519 key or an SSH public key.
pub(crate) enum AnyRecipient {
    X25519(x25519::Recipient),
    Ssh(age::ssh::Recipient),
}

impl AnyRecipient {
    fn as_dyn(&self) -> &dyn age::Recipient {
        match self {
            AnyRecipient::X25519(r) => r,
            AnyRecipient::Ssh(r) => r,
        }
    }
}

/// Parses recipients (`age1…`, or `ssh-ed25519 …`/`ssh-rsa …` public keys); a bad one
/// is an error naming it.
pub(crate) fn parse_recipients(recipients: &[String]) -> Result<Vec<AnyRecipient>> {
    if recipients.is_empty() {
        return Err(Error::invalid_with_help(
            "no recipient to encrypt to",
            "give at least one age recipient (`age1…`) with `-r`",
        ));
    }
    recipients
        .iter()
        .map(|r| {
            let r = r.trim();
            if r.starts_with("ssh-") {
                return age::ssh::Recipient::from_str(r).map(AnyRecipient::Ssh).map_err(|_| {
                    Error::invalid_with_help(
                        format!("`{r}` is not a valid SSH recipient"),
                        "give an `ssh-ed25519 AAAA…` or `ssh-rsa AAAA…` public key line",
                    )
                });
            }
            x25519::Recipient::from_str(r).map(AnyRecipient::X25519).map_err(|_| {
                let help = if r.starts_with("ssh-") {
                    "give an `ssh-ed25519 AAAA…` public key line"
                } else if r.starts_with("AGE-SECRET-KEY-") {
                    "that is a secret key: give its public key (`age1…`), printed by `stretch keys generate`"
                } else {
                    "an age recipient looks like `age1…` (the `# public key:` line of an identity file)"
                };
                // A pasted secret key must not end up in an error message.
                let shown = if r.starts_with("AGE-SECRET-KEY-") { "AGE-SECRET-KEY-1…" } else { r };
                Error::invalid_with_help(format!("`{shown}` is not a valid age recipient"), help)
            })
        })
        .collect()
}

/// Encrypts `plaintext` to every recipient (`age1…`) as an ASCII-armored age message,
/// the same as `age -a -r R…`. A bad recipient is an error naming it.
pub fn encrypt_armored(recipients: &[String], plaintext: &[u8]) -> Result<String> {
    encrypt_to(&parse_recipients(recipients)?, plaintext)
}

pub(crate) fn encrypt_to(recipients: &[AnyRecipient], plaintext: &[u8]) -> Result<String> {
    let fail = |e: &dyn fmt::Display| Error::failed("encrypt", e.to_string());
    let encryptor = age::Encryptor::with_recipients(recipients.iter().map(AnyRecipient::as_dyn))
        .map_err(|e| fail(&e))?;
    let mut out = Vec::new();
    let armor = ArmoredWriter::wrap_output(&mut out, Format::AsciiArmor).map_err(|e| fail(&e))?;
    let mut writer = encryptor.wrap_output(armor).map_err(|e| fail(&e))?;
    writer.write_all(plaintext).map_err(|e| fail(&e))?;
    writer
        .finish()
        .and_then(|armor| armor.finish())
        .map_err(|e| fail(&e))?;
    String::from_utf8(out).map_err(|e| fail(&e))
}

/// Why a message could not be decrypted. Never carries plaintext; turn it into an
/// [`Error`] naming the file (and key path) with [`DecryptError::in_file`] /
/// [`DecryptError::at_key`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecryptError {
    /// None of the identities is a recipient of the message.
    #[error("no identity matches (wrong key?)")]
    NoMatchingIdentity,
    /// The message is encrypted to a passphrase, which a build cannot ask for.
    #[error("it is encrypted with a passphrase; stretch needs a message encrypted to a recipient")]
    Passphrase,
    /// Not an age message, damaged armor, or tampered ciphertext.
    #[error("corrupt age data ({0})")]
    Corrupt(String),
    /// A `secrets.yml` value decrypted to bytes that are not UTF-8 text.
    #[error("the decrypted value is not UTF-8 text")]
    NotText,
}

impl DecryptError {
    fn help(&self, ids: &str) -> Option<String> {
        match self {
            DecryptError::NoMatchingIdentity => Some(format!(
                "the identity `{ids}` is not one of the recipients this was encrypted to"
            )),
            DecryptError::Corrupt(_) => Some(
                "the value must be the whole, unchanged output of `age -a` or `stretch secrets encrypt`"
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// `FILE: cannot decrypt: CAUSE` (for `*.age` files).
    pub fn in_file(self, file: &str, ids: &Identities) -> Error {
        let help = self.help(ids.label());
        Error::Invalid {
            message: format!("{file}: cannot decrypt: {self}"),
            help,
        }
    }

    /// `cannot decrypt `KEY`: CAUSE`, at a position in `file` when it is known.
    pub(crate) fn at_key(
        self,
        file: &str,
        key: &str,
        pos: Option<(usize, usize)>,
        ids: &Identities,
    ) -> Error {
        let help = self.help(ids.label());
        let message = format!("cannot decrypt `{key}`: {self}");
        match pos {
            // No source text: the file's values are secrets (see `document`).
            Some((line, col)) => Error::config(file, "", line, col, message, help),
            None => Error::Invalid {
                message: format!("{file}: {message}"),
                help,
            },
        }
    }
}

fn from_age(e: age::DecryptError) -> DecryptError {
    use age::DecryptError as E;
    match e {
        E::NoMatchingKeys => DecryptError::NoMatchingIdentity,
        E::ExcessiveWork { .. } | E::KeyDecryptionFailed => DecryptError::Passphrase,
        E::DecryptionFailed => DecryptError::Corrupt("authentication failed".into()),
        E::InvalidHeader => DecryptError::Corrupt("invalid header".into()),
        E::InvalidMac => DecryptError::Corrupt("header MAC mismatch".into()),
        E::UnknownFormat => DecryptError::Corrupt("unknown age format".into()),
        E::Io(e) => DecryptError::Corrupt(e.to_string()),
        #[allow(unreachable_patterns)]
        other => DecryptError::Corrupt(other.to_string()),
    }
}

/// Decrypts an age message, binary or ASCII-armored (surrounding whitespace allowed).
pub fn decrypt(ids: &Identities, data: &[u8]) -> Result<Vec<u8>, DecryptError> {
    let data = bare_armor(data);
    let decryptor =
        age::Decryptor::new_buffered(ArmoredReader::new(&data[..])).map_err(from_age)?;
    if decryptor.is_scrypt() {
        return Err(DecryptError::Passphrase);
    }
    let mut reader = decryptor.decrypt(ids.as_age()).map_err(from_age)?;
    let mut out = Vec::new();
    if let Err(e) = reader.read_to_end(&mut out) {
        // A truncated or altered payload fails part-way: drop what was read.
        out.zeroize();
        return Err(DecryptError::Corrupt(e.to_string()));
    }
    Ok(out)
}

/// Decrypts the contents of a `*.age` file; errors name `label`.
pub fn decrypt_file(ids: &Identities, label: &str, data: &[u8]) -> Result<Vec<u8>> {
    decrypt(ids, data).map_err(|e| e.in_file(label, ids))
}

/// Armored text may come indented or padded with blank lines (YAML, editors, mail);
/// age wants it bare. Binary age data is left alone.
fn bare_armor(data: &[u8]) -> Cow<'_, [u8]> {
    let start = data
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(data.len());
    if !data[start..].starts_with(ARMOR_BEGIN.as_bytes()) {
        return Cow::Borrowed(data);
    }
    let mut bare = Vec::with_capacity(data.len());
    for line in data[start..]
        .split(|b| *b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|l| !l.is_empty())
    {
        bare.extend_from_slice(line);
        bare.push(b'\n');
    }
    Cow::Owned(bare)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::civil_from_days;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_708_105);
        assert_eq!(rfc3339_utc(t), "2026-11-26T15:48:25Z");
    }
}
