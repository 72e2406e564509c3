//! `stretch keys generate`, `stretch keys token`, and `stretch secrets encrypt|show`, and interop with the
//! `age` CLI in both directions.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use super::common::*;

fn age(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new("age")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run age")
}

#[test]
fn keys_and_secrets_interoperate_with_age() {
    let ctx = Ctx::new();
    // Our key: 0600, in age-keygen's format, usable by the age CLI.
    let out = ctx.run(&["keys", "generate", "-o", "ours.txt"]).ok();
    let ours = out
        .stderr
        .trim()
        .strip_prefix("Public key: ")
        .unwrap()
        .to_string();
    assert!(ours.starts_with("age1"));
    let key = std::fs::read_to_string(ctx.path().join("ours.txt")).unwrap();
    assert!(
        key.starts_with("# created: ")
            && key.contains(&format!("# public key: {ours}\nAGE-SECRET-KEY-1"))
    );
    assert_eq!(
        std::fs::metadata(ctx.path().join("ours.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Refuses to overwrite a key.
    ctx.run(&["keys", "generate", "-o", "ours.txt"])
        .fails(2, &["ours.txt"]);
    // Without -o: the identity on stdout.
    let printed = ctx.run(&["keys", "generate"]).ok();
    assert!(printed.stdout.contains("AGE-SECRET-KEY-1"));

    // age-keygen's key works with stretch.
    let made = Command::new("age-keygen")
        .arg("-o")
        .arg(ctx.path().join("theirs.txt"))
        .output()
        .unwrap();
    let theirs = String::from_utf8_lossy(&made.stderr)
        .trim()
        .strip_prefix("Public key: ")
        .unwrap()
        .to_string();

    ctx.write(
        "secrets.yml",
        "# database\ndb:\n  password: hunter2\n  port: 5432\nlist:\n  - a\n  - b\n",
    );
    ctx.run(&[
        "secrets",
        "encrypt",
        "secrets.yml",
        "-r",
        &ours,
        "-r",
        &theirs,
    ])
    .ok();
    let encrypted = std::fs::read_to_string(ctx.path().join("secrets.yml")).unwrap();
    assert!(!encrypted.contains("hunter2"));
    assert!(
        encrypted.contains("db:") && encrypted.contains("password:"),
        "keys stay in clear:\n{encrypted}"
    );
    // Encrypting again leaves encrypted leaves untouched.
    ctx.write("extra.yml", &encrypted);
    ctx.run(&["secrets", "encrypt", "extra.yml", "-r", &ours])
        .ok();
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("extra.yml")).unwrap(),
        encrypted
    );

    for key in ["ours.txt", "theirs.txt"] {
        let shown = ctx
            .run(&["secrets", "show", "secrets.yml", "-i", key, "--json"])
            .ok()
            .json();
        assert_eq!(
            shown,
            serde_json::json!({"db": {"password": "hunter2", "port": "5432"}, "list": ["a", "b"]})
        );
    }
    let shown = ctx
        .run(&["secrets", "show", "secrets.yml", "-i", "ours.txt"])
        .ok();
    assert!(shown.stdout.contains("password: hunter2"), "{shown}");

    // A leaf our encrypt wrote (the first one: db.password) decrypts with the age CLI.
    let mut armored = String::new();
    for line in encrypted
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.contains("BEGIN AGE ENCRYPTED FILE"))
    {
        let line = line.trim_start_matches("password: ").trim_matches('"');
        armored.push_str(line);
        armored.push('\n');
        if line.contains("END AGE ENCRYPTED FILE") {
            break;
        }
    }
    ctx.write("leaf.age", &armored);
    let dec = age(&["-d", "-i", "theirs.txt", "leaf.age"], ctx.path());
    assert!(
        dec.status.success(),
        "{}",
        String::from_utf8_lossy(&dec.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&dec.stdout), "hunter2");

    // A leaf the age CLI wrote decrypts with stretch.
    ctx.write("plain.txt", "from-age-cli");
    let enc = age(&["-a", "-r", &ours, "plain.txt"], ctx.path());
    assert!(enc.status.success());
    let armored = String::from_utf8_lossy(&enc.stdout).into_owned();
    let indented: String = armored.lines().map(|l| format!("  {l}\n")).collect();
    ctx.write("cli.yml", format!("token: |\n{indented}"));
    let shown = ctx
        .run(&["secrets", "show", "cli.yml", "-i", "ours.txt", "--json"])
        .ok()
        .json();
    assert_eq!(shown, serde_json::json!({"token": "from-age-cli"}));

    // Wrong key: a clear error naming the file and the key path, exit 2.
    let made = Command::new("age-keygen")
        .arg("-o")
        .arg(ctx.path().join("stranger.txt"))
        .output()
        .unwrap();
    assert!(made.status.success());
    ctx.run(&["secrets", "show", "cli.yml", "-i", "stranger.txt"])
        .fails(2, &["cli.yml", "token"]);
}

#[test]
fn ssh_keys_work_as_age_allows() {
    let ctx = Ctx::new();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "deploy", "-f"])
        .arg(ctx.path().join("id_ed25519"))
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(ctx.path().join("id_ed25519.pub")).unwrap();
    ctx.write("secrets.yml", "db:\n  password: hunter2\n");
    ctx.run(&["secrets", "encrypt", "secrets.yml", "-r", public.trim()])
        .ok();
    let shown = ctx
        .run(&[
            "secrets",
            "show",
            "secrets.yml",
            "-i",
            "id_ed25519",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(shown, serde_json::json!({"db": {"password": "hunter2"}}));
    // The age CLI decrypts with the same SSH key what stretch encrypted to it…
    let text = std::fs::read_to_string(ctx.path().join("secrets.yml")).unwrap();
    let armored: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.contains("BEGIN AGE"))
        .take_while(|l| !l.is_empty() && !l.ends_with(':'))
        .map(|l| format!("{}\n", l.trim_start_matches("password: ").trim_matches('"')))
        .collect();
    ctx.write("leaf.age", armored);
    let dec = age(&["-d", "-i", "id_ed25519", "leaf.age"], ctx.path());
    assert!(
        dec.status.success(),
        "{}",
        String::from_utf8_lossy(&dec.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&dec.stdout), "hunter2");
    // …and stretch decrypts an `*.age`-style file the age CLI encrypted to it.
    ctx.write("plain.txt", "from-age");
    let enc = age(&["-a", "-R", "id_ed25519.pub", "plain.txt"], ctx.path());
    assert!(enc.status.success());
    let indented: String = String::from_utf8_lossy(&enc.stdout)
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    ctx.write("cli.yml", format!("token: |\n{indented}"));
    let shown = ctx
        .run(&["secrets", "show", "cli.yml", "-i", "id_ed25519", "--json"])
        .ok()
        .json();
    assert_eq!(shown, serde_json::json!({"token": "from-age"}));
    // A passphrase-protected key is refused clearly.
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "secret-pass", "-f"])
        .arg(ctx.path().join("locked"))
        .status()
        .unwrap();
    assert!(st.success());
    ctx.run(&["secrets", "show", "cli.yml", "-i", "locked"])
        .fails(2, &["protected by a passphrase"]);
}

#[test]
fn keys_token_prints_fresh_256_bit_tokens() {
    let ctx = Ctx::new();
    let a = ctx.run(&["keys", "token"]).ok().stdout;
    let b = ctx.run(&["keys", "token"]).ok().stdout;
    for t in [&a, &b] {
        let t = t.strip_suffix('\n').unwrap();
        assert_eq!(t.len(), 64, "{t}");
        assert!(
            t.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
            "{t}"
        );
    }
    assert_ne!(a, b);
    let json = ctx.run(&["keys", "token", "--json"]).ok().json();
    assert_eq!(json["token"].as_str().unwrap().len(), 64);
}
