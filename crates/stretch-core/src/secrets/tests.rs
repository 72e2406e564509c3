//! Round trips, error cases, and interop with the real `age` / `age-keygen` binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use std::io::Write as _;

use super::*;
use crate::Error;

fn new_key() -> (Identities, String) {
    let (file, recipient) = generate();
    (Identities::parse("test.key", &file).unwrap(), recipient)
}

/// `(file, line, column, message)` of a positioned error.
fn config_error(e: &Error) -> (String, usize, usize, String) {
    match e {
        Error::Config(c) => (c.file.clone(), c.line, c.column, c.message.clone()),
        other => panic!("expected a positioned error, got {other:?}"),
    }
}

fn indent(text: &str, by: usize) -> String {
    text.lines().map(|l| format!("{:by$}{l}\n", "")).collect()
}

#[test]
fn generated_key_has_age_keygen_format() {
    let (file, recipient) = generate();
    let lines: Vec<&str> = file.lines().collect();
    assert_eq!(lines.len(), 3, "{file}");
    let created = lines[0].strip_prefix("# created: ").unwrap();
    assert_eq!(created.len(), "2026-01-01T00:00:00Z".len());
    assert!(
        created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created}"
    );
    assert_eq!(lines[1], format!("# public key: {recipient}"));
    assert!(recipient.starts_with("age1"));
    assert!(lines[2].starts_with("AGE-SECRET-KEY-1"));
    assert!(file.ends_with('\n'));
    let ids = Identities::parse("k", &file).unwrap();
    assert_eq!(ids.recipients(), vec![recipient.clone()]);
    assert_ne!(generate().1, recipient, "keys must be random");
}

#[test]
fn identity_file_errors_name_the_file_and_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.key");
    let e = Identities::from_file(&missing).unwrap_err();
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );
    assert_eq!(e.exit_code(), 2);

    let e = Identities::parse("empty.key", "# only a comment\n\n").unwrap_err();
    assert!(
        e.to_string().contains("empty.key") && e.to_string().contains("no age identity"),
        "{e}"
    );

    let (file, recipient) = generate();
    let damaged = file.replace("AGE-SECRET-KEY-1", "AGE-SECRET-KEY-1QQ");
    let e = Identities::parse("bad.key", &damaged).unwrap_err();
    let (name, line, _, _) = config_error(&e);
    assert_eq!((name.as_str(), line), ("bad.key", 3));
    let key_line = damaged.lines().nth(2).unwrap();
    assert!(
        !format!("{e} {e:?}").contains(&key_line[20..]),
        "the key leaked: {e:?}"
    );

    let e = Identities::parse("pub.key", &format!("{recipient}\n")).unwrap_err();
    assert!(e.to_string().contains("recipient"), "{e}");
    assert_eq!(e.exit_code(), 2);

    let ids = Identities::parse("x", &file).unwrap();
    assert!(!format!("{ids:?}").contains("AGE-SECRET-KEY"));
}

#[test]
fn identity_file_with_two_keys_and_crlf() {
    let (a, ra) = generate();
    let (b, rb) = generate();
    let text = format!("{a}\n{b}").replace('\n', "\r\n");
    let ids = Identities::parse("two.key", &text).unwrap();
    assert_eq!(ids.recipients(), vec![ra, rb.clone()]);
    let armored = encrypt_armored(&[rb], b"x").unwrap();
    assert_eq!(decrypt(&ids, armored.as_bytes()).unwrap(), b"x");
}

#[test]
fn write_new_identity_is_private_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id.key");
    let recipient = write_new_identity(&path).unwrap();
    let ids = Identities::from_file(&path).unwrap();
    assert_eq!(ids.recipients(), vec![recipient]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let before = std::fs::read(&path).unwrap();
    let e = write_new_identity(&path).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn armored_round_trip_to_several_recipients() {
    let (a, ra) = new_key();
    let (b, rb) = new_key();
    let armored = encrypt_armored(&[ra, rb], "pässword\n".as_bytes()).unwrap();
    assert!(is_armored(&armored));
    assert!(
        armored
            .trim_end()
            .ends_with("-----END AGE ENCRYPTED FILE-----")
    );
    assert!(!armored.contains("pässword"));
    assert_eq!(
        decrypt(&a, armored.as_bytes()).unwrap(),
        "pässword\n".as_bytes()
    );
    assert_eq!(
        decrypt(&b, armored.as_bytes()).unwrap(),
        "pässword\n".as_bytes()
    );
    // Indented or padded armor (as it sits in YAML) still decrypts.
    let padded = format!("\n{}\n\n", indent(&armored, 4));
    assert_eq!(
        decrypt(&a, padded.as_bytes()).unwrap(),
        "pässword\n".as_bytes()
    );
}

#[test]
fn bad_recipients_are_named() {
    let e = encrypt_armored(&["age1nope".to_string()], b"x").unwrap_err();
    assert!(e.to_string().contains("`age1nope`"), "{e}");
    assert_eq!(e.exit_code(), 2);
    assert_eq!(encrypt_armored(&[], b"x").unwrap_err().exit_code(), 2);
    // A secret key pasted where a recipient goes is not echoed back.
    let (file, _) = generate();
    let secret = file.lines().nth(2).unwrap().to_string();
    let e = encrypt_armored(std::slice::from_ref(&secret), b"x").unwrap_err();
    assert!(!format!("{e} {e:?}").contains(&secret), "{e:?}");
}

#[test]
fn wrong_identity_is_reported() {
    let (_, recipient) = new_key();
    let (other, _) = new_key();
    let armored = encrypt_armored(&[recipient], b"s3cret").unwrap();
    let e = decrypt(&other, armored.as_bytes()).unwrap_err();
    assert!(matches!(e, DecryptError::NoMatchingIdentity), "{e:?}");
    let e = decrypt_file(&other, "files/app.key.age", armored.as_bytes()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "files/app.key.age: cannot decrypt: no identity matches (wrong key?)"
    );
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn corrupt_armor_is_reported() {
    let (ids, recipient) = new_key();
    let armored = encrypt_armored(&[recipient], b"s3cret").unwrap();
    let mut lines: Vec<String> = armored.lines().map(String::from).collect();
    // Flip one base64 character in the body.
    let body = &mut lines[1];
    let c = if body.as_bytes()[10] == b'A' {
        "B"
    } else {
        "A"
    };
    body.replace_range(10..11, c);
    let flipped = lines.join("\n") + "\n";
    let truncated: String = armored.lines().take(2).map(|l| format!("{l}\n")).collect();
    let no_end = armored.replace("-----END AGE ENCRYPTED FILE-----", "");
    for bad in [
        flipped,
        truncated,
        no_end,
        "-----BEGIN AGE ENCRYPTED FILE-----\n".into(),
    ] {
        match decrypt(&ids, bad.as_bytes()) {
            Err(DecryptError::Corrupt(why)) => assert!(!why.contains("s3cret")),
            other => panic!("expected corrupt data for {bad:?}, got {other:?}"),
        }
    }
    assert!(matches!(
        decrypt(&ids, b"not age at all"),
        Err(DecryptError::Corrupt(_))
    ));
}

#[test]
fn secret_debug_does_not_leak() {
    let s = Secret::new("hunter2".into());
    assert_eq!(format!("{s:?}"), "Secret(***)");
    assert_eq!(s.expose(), "hunter2");
    let tree = SecretTree::Map(vec![("p".into(), SecretTree::Value(s))]);
    assert!(!format!("{tree:?} {tree:#?}").contains("hunter2"));
}

const CLEAR: &str = "\
# Database credentials
db:
  user: shop   # the app user
  password: 'hunter2'
  port: 5432
tls:
  enabled: true
  key: |
    -----BEGIN KEY-----
    abc
    -----END KEY-----
hosts:
  - name: web-1
    token: \"t-1\"
  - t2
flow: {a: one, b: [two, 3]}
";

#[test]
fn secrets_file_round_trip() {
    let (ids, recipient) = new_key();
    let encrypted = encrypt_secrets_file("secrets.yml", CLEAR, &[recipient]).unwrap();
    // Look only outside the armored blocks: random base64 may contain "t2" by chance.
    let mut inside = false;
    let outside: String = encrypted
        .lines()
        .filter(|l| {
            let was = inside;
            if l.contains("-----BEGIN AGE ENCRYPTED FILE-----") {
                inside = true;
            } else if l.contains("-----END AGE ENCRYPTED FILE-----") {
                inside = false;
                return false;
            }
            !was && !inside
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for clear in [
        "shop", "hunter2", "5432", "abc", "web-1", "t-1", "t2", "one", "two",
    ] {
        assert!(
            !outside.contains(clear),
            "{clear} left in clear:\n{encrypted}"
        );
    }
    // Keys, comments and layout survive.
    for kept in [
        "# Database credentials",
        "db:\n  user: |   # the app user\n    -----BEGIN AGE",
        "  - name: |\n      -----BEGIN AGE",
        "flow: {a: \"-----BEGIN AGE",
    ] {
        assert!(
            encrypted.contains(kept),
            "missing {kept:?} in:\n{encrypted}"
        );
    }

    let tree = decrypt_secrets_file("secrets.yml", &encrypted, &ids).unwrap();
    let get = |p: &str| tree.secret(p).map(Secret::expose);
    assert_eq!(get("db.user"), Some("shop"));
    assert_eq!(get("db.password"), Some("hunter2"));
    assert_eq!(get("db.port"), Some("5432"));
    assert_eq!(get("tls.enabled"), Some("true"));
    assert_eq!(
        get("tls.key"),
        Some("-----BEGIN KEY-----\nabc\n-----END KEY-----\n")
    );
    assert_eq!(get("hosts.0.name"), Some("web-1"));
    assert_eq!(get("hosts.0.token"), Some("t-1"));
    assert_eq!(get("hosts.1"), Some("t2"));
    assert_eq!(get("flow.b.0"), Some("two"));
    assert_eq!(get("flow.b.1"), Some("3"));
    assert!(tree.contains("db") && tree.get("db").unwrap().as_secret().is_none());
    assert!(!tree.contains("db.nope") && !tree.contains("hosts.7") && !tree.contains("db.user.x"));
    assert!(!tree.is_empty());
    assert_eq!(tree.secrets().len(), 11);
    assert_eq!(tree.secrets()[1].0, "db.password");

    let json = tree.to_json();
    assert_eq!(json["db"]["password"], "hunter2");
    assert_eq!(json["hosts"][1], "t2");
    assert_eq!(json["flow"]["b"][1], "3");

    let shown = tree.to_yaml().unwrap();
    let back: serde_yaml_ng::Value = serde_yaml_ng::from_str(&shown).unwrap();
    assert_eq!(back["db"]["password"].as_str(), Some("hunter2"));
    assert_eq!(back["db"]["port"].as_str(), Some("5432"));
    assert!(shown.starts_with("db:\n"), "file order kept:\n{shown}");
}

#[test]
fn numbers_and_bools_are_encrypted_as_written() {
    let (ids, recipient) = new_key();
    let text = "a: 0x1F\nb: 1e3\nc: 1.50\nd: false\ne: -7\n";
    let encrypted = encrypt_secrets_file("s.yml", text, &[recipient]).unwrap();
    let tree = decrypt_secrets_file("s.yml", &encrypted, &ids).unwrap();
    let got: Vec<&str> = tree
        .secrets()
        .into_iter()
        .map(|(_, s)| s.expose())
        .collect();
    assert_eq!(got, ["0x1F", "1e3", "1.50", "false", "-7"]);
}

#[test]
fn encrypt_leaves_encrypted_values_untouched() {
    let (ids, recipient) = new_key();
    let once = encrypt_secrets_file(
        "s.yml",
        "a: one\nb: two\n",
        std::slice::from_ref(&recipient),
    )
    .unwrap();
    // Encrypting again changes nothing: every leaf is armored already.
    assert_eq!(
        encrypt_secrets_file("s.yml", &once, std::slice::from_ref(&recipient)).unwrap(),
        once
    );
    // A new clear leaf is encrypted; the armored ones keep their exact text.
    let added = format!("{once}c: three\n");
    let twice = encrypt_secrets_file("s.yml", &added, &[recipient]).unwrap();
    assert!(
        twice.starts_with(&once),
        "old leaves changed:\n{once}\n---\n{twice}"
    );
    assert!(!twice.contains("three"));
    let tree = decrypt_secrets_file("s.yml", &twice, &ids).unwrap();
    assert_eq!(tree.secret("c").unwrap().expose(), "three");
    assert_eq!(tree.secret("a").unwrap().expose(), "one");
}

#[test]
fn encrypt_falls_back_to_rewriting_when_editing_in_place_is_unsafe() {
    let (ids, recipient) = new_key();
    // An alias shares its anchor's text: rewriting one place would change both.
    let text = "a: &x shared\nb: *x\nc: !!str tagged\n";
    let encrypted = encrypt_secrets_file("s.yml", text, &[recipient]).unwrap();
    assert!(!encrypted.contains("shared"));
    let tree = decrypt_secrets_file("s.yml", &encrypted, &ids).unwrap();
    assert_eq!(tree.secret("a").unwrap().expose(), "shared");
    assert_eq!(tree.secret("b").unwrap().expose(), "shared");
}

#[test]
fn file_without_trailing_newline_or_with_block_scalars() {
    let (ids, recipient) = new_key();
    let text = "a:\n  b: |\n    line one\n    line two\n  c: last";
    let encrypted = encrypt_secrets_file("s.yml", text, &[recipient]).unwrap();
    assert!(
        encrypted.starts_with("a:\n  b: |\n    -----BEGIN AGE"),
        "{encrypted}"
    );
    let tree = decrypt_secrets_file("s.yml", &encrypted, &ids).unwrap();
    assert_eq!(tree.secret("a.b").unwrap().expose(), "line one\nline two\n");
    assert_eq!(tree.secret("a.c").unwrap().expose(), "last");
}

#[test]
fn clear_leaf_is_rejected_at_its_line_without_its_value() {
    let (ids, recipient) = new_key();
    let armored = encrypt_armored(&[recipient], b"x").unwrap();
    let text = format!(
        "db:\n  user: |\n{}  password: hunter2\n",
        indent(&armored, 4)
    );
    let e = decrypt_secrets_file("app/secrets.yml", &text, &ids).unwrap_err();
    let (file, line, column, message) = config_error(&e);
    let password_line = text.lines().position(|l| l.contains("password")).unwrap() + 1;
    assert_eq!(
        (file.as_str(), line, column),
        ("app/secrets.yml", password_line, 13)
    );
    assert!(
        message.contains("`db.password` is not encrypted"),
        "{message}"
    );
    assert_eq!(e.exit_code(), 2);
    let all = format!("{e} {e:?}");
    assert!(!all.contains("hunter2"), "plaintext leaked: {all}");

    // In a list too, with the index in the path.
    let e = decrypt_secrets_file("s.yml", "l:\n  - 5\n", &ids).unwrap_err();
    assert_eq!(config_error(&e).3, "`l.0` is not encrypted");
}

#[test]
fn wrong_identity_in_secrets_file_names_the_key_path() {
    let (_, recipient) = new_key();
    let (other, _) = new_key();
    let text = encrypt_secrets_file("secrets.yml", "db:\n  password: x\n", &[recipient]).unwrap();
    let e = decrypt_secrets_file("secrets.yml", &text, &other).unwrap_err();
    assert_eq!(
        e.to_string(),
        "secrets.yml:2:13: cannot decrypt `db.password`: no identity matches (wrong key?)"
    );
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn corrupt_leaf_names_the_key_path() {
    let (ids, recipient) = new_key();
    let text = encrypt_secrets_file("s.yml", "a:\n  b: x\n", &[recipient]).unwrap();
    let broken = text.replacen("-----END AGE ENCRYPTED FILE-----", "", 1);
    let e = decrypt_secrets_file("s.yml", &broken, &ids).unwrap_err();
    let (_, line, _, message) = config_error(&e);
    assert_eq!(line, 2);
    assert!(
        message.starts_with("cannot decrypt `a.b`: corrupt age data"),
        "{message}"
    );
    // A damaged armor is not mistaken for a clear value and encrypted again.
    assert_eq!(
        encrypt_secrets_file("s.yml", &broken, &ids.recipients()).unwrap(),
        broken
    );
}

#[test]
fn empty_documents_are_empty_trees() {
    let (ids, recipient) = new_key();
    for text in ["", "# nothing yet\n", "---\n", "a: {}\nb: []\n"] {
        let tree = decrypt_secrets_file("s.yml", text, &ids).unwrap();
        assert!(tree.is_empty(), "{text:?}");
        assert!(tree.secrets().is_empty());
        assert_eq!(
            encrypt_secrets_file("s.yml", text, std::slice::from_ref(&recipient)).unwrap(),
            text
        );
    }
}

#[test]
fn invalid_documents() {
    let (ids, recipient) = new_key();
    let r = [recipient];
    let e = decrypt_secrets_file("s.yml", "a: b\n  c: [\n", &ids).unwrap_err();
    let (file, line, _, message) = config_error(&e);
    assert_eq!((file.as_str(), line), ("s.yml", 2));
    assert!(message.starts_with("invalid YAML"), "{message}");
    assert_eq!(
        config_error(&encrypt_secrets_file("s.yml", "a: [\n", &r).unwrap_err()).0,
        "s.yml"
    );

    let e = encrypt_secrets_file("s.yml", "a:\n  b:\n", &r).unwrap_err();
    assert_eq!(config_error(&e).3, "`a.b` has no value");
    let e = encrypt_secrets_file("s.yml", "a.b: x\n", &r).unwrap_err();
    assert!(e.to_string().contains("`a.b`"), "{e}");
    let e = encrypt_secrets_file("s.yml", "- x\n", &r).unwrap_err();
    assert!(e.to_string().contains("top level must be a mapping"), "{e}");
    let e = decrypt_secrets_file("s.yml", "a: !custom x\n", &ids).unwrap_err();
    assert!(e.to_string().contains("`a` has a YAML tag"), "{e}");
    assert_eq!(e.exit_code(), 2);
}

// ---------------------------------------------------------------------------------
// Interop with the `age` command-line tools (Debian package `age`).

fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        Path::new(&path).exists(),
        "{path} is needed for the interop tests (apt-get install age)"
    );
    path
}

fn run(program: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool(program))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An identity made by `age-keygen`: (its file, its recipient).
fn age_keygen(dir: &Path) -> (std::path::PathBuf, String) {
    let path = dir.join("keygen.key");
    run("age-keygen", &["-o", path.to_str().unwrap()], b"");
    let recipient =
        String::from_utf8(run("age-keygen", &["-y", path.to_str().unwrap()], b"")).unwrap();
    (path, recipient.trim().to_string())
}

#[test]
fn age_keygen_key_decrypts_age_cli_and_our_output() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = age_keygen(dir.path());
    let ids = Identities::from_file(&key).unwrap();
    assert_eq!(ids.recipients(), vec![recipient.clone()]);

    // `age -a -r` output: as a message, and as a secrets.yml leaf.
    let armored =
        String::from_utf8(run("age", &["-a", "-r", &recipient], b"from the cli")).unwrap();
    assert_eq!(decrypt(&ids, armored.as_bytes()).unwrap(), b"from the cli");
    let doc = format!("api:\n  token: |\n{}", indent(&armored, 4));
    let tree = decrypt_secrets_file("secrets.yml", &doc, &ids).unwrap();
    assert_eq!(tree.secret("api.token").unwrap().expose(), "from the cli");

    // Binary (non-armored) `age` output, as in a `*.age` file.
    let binary = run("age", &["-r", &recipient], b"\x00binary\xff");
    assert!(binary.starts_with(b"age-encryption.org/v1"));
    assert_eq!(
        decrypt_file(&ids, "x.age", &binary).unwrap(),
        b"\x00binary\xff"
    );

    // Ours, decrypted with the age-keygen identity by us and by `age -d`.
    let ours = encrypt_armored(std::slice::from_ref(&recipient), b"from stretch").unwrap();
    assert_eq!(decrypt(&ids, ours.as_bytes()).unwrap(), b"from stretch");
    let key_arg = key.to_str().unwrap();
    assert_eq!(
        run("age", &["-d", "-i", key_arg], ours.as_bytes()),
        b"from stretch"
    );
    let file = encrypt_secrets_file("s.yml", "a: from a file\n", &[recipient]).unwrap();
    let tree = decrypt_secrets_file("s.yml", &file, &ids).unwrap();
    assert_eq!(tree.secret("a").unwrap().expose(), "from a file");
}

#[test]
fn age_cli_uses_keys_from_generate() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("stretch.key");
    let (contents, recipient) = generate();
    std::fs::write(&key, &contents).unwrap();
    let key_arg = key.to_str().unwrap();
    // age-keygen reads our file and derives the same recipient.
    assert_eq!(
        String::from_utf8(run("age-keygen", &["-y", key_arg], b""))
            .unwrap()
            .trim(),
        recipient
    );

    let ours = encrypt_armored(std::slice::from_ref(&recipient), "ünïcode\n".as_bytes()).unwrap();
    assert_eq!(
        run("age", &["-d", "-i", key_arg], ours.as_bytes()),
        "ünïcode\n".as_bytes()
    );

    // A leaf written by `stretch secrets encrypt`, decrypted by `age -d`.
    let file = encrypt_secrets_file(
        "s.yml",
        "db:\n  password: pw\n",
        std::slice::from_ref(&recipient),
    )
    .unwrap();
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&file).unwrap();
    let leaf = value["db"]["password"].as_str().unwrap();
    assert_eq!(run("age", &["-d", "-i", key_arg], leaf.as_bytes()), b"pw");

    // And the other way round: `age -r` to our recipient.
    let ids = Identities::from_file(&key).unwrap();
    let binary = run("age", &["-r", &recipient], b"back");
    assert_eq!(decrypt(&ids, &binary).unwrap(), b"back");
}
