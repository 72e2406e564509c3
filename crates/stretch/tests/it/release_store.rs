//! Releases that outlive the home that built them: the registry as release store,
//! configurations sealed to the release key, leases on the agents, and the hosts as
//! the truth for homes that never deployed. Three homes on one machine, real agents,
//! a real registry.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::common::*;
use super::deploy::World;

const DB_PASSWORD: &str = "db-pass-8812-clear";
const API_KEY: &str = "api-key-5521-clear";

/// Give the world's app a `secrets.yml` leaf used by its configuration and a `.age`
/// file in its container folder, both for a build key; returns the key file.
fn add_secrets(w: &World) -> PathBuf {
    let (key, recipient) = stretch_core::secrets::generate();
    let key_file = w.ctx.write("build.key", key);
    w.ctx.write(
        "app/secrets.yml",
        format!("db: {{password: {DB_PASSWORD}}}\n"),
    );
    w.ctx
        .run(&["secrets", "encrypt", "app/secrets.yml", "-r", &recipient])
        .ok();
    w.ctx.write(
        "app/config.yml",
        "greeting: \"{{ services.greeting }}\"\ndb: {password: !secret db.password}\n",
    );
    let sealed = stretch_core::secrets::encrypt_armored(&[recipient], API_KEY.as_bytes()).unwrap();
    w.ctx.write("app/certs/api.key.age", sealed);
    key_file
}

fn build(w: &World, key: &Path) -> String {
    let key = key.display().to_string();
    w.ctx
        .run(&["build", "--identity", &key, "--json"])
        .ok()
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn at(home: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--home".to_string(), home.display().to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    all
}

fn run_at(w: &World, home: &Path, args: &[&str]) -> Out {
    let args = at(home, args);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    w.ctx.run(&refs)
}

/// No file under `dir` holds a clear secret.
#[track_caller]
fn no_clear_secret_under(dir: &Path) {
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if !entry.file_type().is_file() {
            continue;
        }
        let data = std::fs::read(entry.path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&data);
        for secret in [DB_PASSWORD, API_KEY] {
            assert!(
                !text.contains(secret),
                "{secret} in {}",
                entry.path().display()
            );
        }
    }
}

#[test]
fn a_release_built_in_one_home_is_deployed_and_rolled_back_from_others() {
    let w = World::new("store", 2, true);
    let registry = w.registry().unwrap().addr.clone();
    let key = add_secrets(&w);
    let (home_b, home_c) = (w.ctx.path().join("home-b"), w.ctx.path().join("home-c"));

    // Home A (the default one) builds; it deploys nothing.
    let r1 = build(&w, &key);

    // Without the release identity, home B cannot open the release: nothing changes,
    // nothing is kept.
    let args = at(&home_b, &["deploy", "production", &r1]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w
        .ctx
        .command(&refs)
        .env_remove("STRETCH_RELEASE_IDENTITY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for needle in [
        "pull release",
        "no release identity",
        "STRETCH_RELEASE_IDENTITY",
    ] {
        assert!(stderr.contains(needle), "{needle}:\n{stderr}");
    }
    assert!(AgentProc::containers(&w.system).is_empty());
    let kept: Vec<_> = std::fs::read_dir(home_b.join("releases"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "{kept:?}");

    // Home B, with only the release identity, pulls the release from the registry.
    let out = run_at(&w, &home_b, &["deploy", "production", &r1]).ok();
    assert!(out.stderr.contains("pulled release"), "{out}");
    assert!(
        out.stderr
            .contains(&format!("{registry}/{}/release:{r1}", w.system)),
        "{out}"
    );
    w.assert_serving(&r1);
    // The `.age` file reached the instances in clear, read-only, under /stretch/secrets.
    for c in AgentProc::containers(&w.system) {
        let got = stretch_test::docker(&["exec", &c, "cat", "/stretch/secrets/certs/api.key"]);
        assert_eq!(got.trim(), API_KEY);
        let config = stretch_test::docker(&["exec", &c, "cat", "/stretch/config.json"]);
        assert!(config.contains(DB_PASSWORD), "{config}");
    }

    // Home A deploys the next release: the hosts say what it replaces.
    w.ctx.write("app/www/version.txt", "2\n");
    let out = w
        .ctx
        .run(&["build", "--identity", &key.display().to_string(), "--json"])
        .ok();
    let r2 = out.json()["id"].as_str().unwrap().to_string();
    // Only the chunk holding the changed file travels; the registry has the rest.
    let pushed = out
        .stderr
        .lines()
        .find(|l| l.contains("release pushed"))
        .unwrap_or_default();
    assert!(pushed.contains(" 1 of "), "{out}");
    let out = w.ctx.run(&["deploy", "production", &r2]).ok();
    assert!(out.stderr.contains("replacing"), "{out}");
    w.assert_serving(&r2);

    // A fresh home C rolls back (to what the hosts say came before), then says where
    // the environment stands.
    let out = run_at(&w, &home_c, &["rollback", "production"]).ok();
    assert!(out.stdout.contains(&r1), "{out}");
    w.assert_serving(&r1);
    let status = run_at(&w, &home_c, &["status", "production", "--json"])
        .ok()
        .json();
    assert_eq!(status["release"]["id"], r1.as_str(), "{status}");
    assert!(status["release"]["name"].is_string(), "{status}");
    // Another fresh home applies: the agents' specs say every host is up to date.
    let home_d = w.ctx.path().join("home-d");
    let applied = run_at(&w, &home_d, &["apply", "production", "--json"])
        .ok()
        .json();
    assert_eq!(applied["plan"]["release"], r1.as_str(), "{applied}");
    assert_eq!(
        applied["plan"]["actions"],
        serde_json::json!([]),
        "{applied}"
    );
    w.assert_serving(&r1);
    let remote = run_at(&w, &home_c, &["releases", "--remote", "--json"])
        .ok()
        .json();
    let ids: Vec<&str> = remote
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&r1.as_str()) && ids.contains(&r2.as_str()),
        "{remote}"
    );

    // Plaintext nowhere at rest on the controller side or in the registry …
    for dir in [
        w.ctx.home(),
        home_b,
        home_c,
        w.registry().unwrap().data_dir(),
    ] {
        no_clear_secret_under(&dir);
    }
    // … nor in any image layer.
    let image = format!("{registry}/{}/web:{r1}", w.system);
    let saved = std::process::Command::new("docker")
        .args(["save", &image])
        .output()
        .unwrap();
    assert!(saved.status.success());
    let text = String::from_utf8_lossy(&saved.stdout);
    assert!(!text.contains(API_KEY) && !text.contains(DB_PASSWORD));
}

/// Start `stretch ARGS` and read its stderr until a line holds `needle`; the rest of
/// stderr is collected by a thread.
fn spawn_until(
    w: &World,
    args: &[String],
    needle: &str,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = w
        .ctx
        .command(&refs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            break;
        }
    }
    assert!(seen.contains(needle), "{needle} never came:\n{seen}");
    let rest = std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    (child, rest)
}

#[test]
fn two_homes_take_turns_and_a_killed_deploys_lease_expires() {
    let w = World::new("lease", 1, true);
    let registry = w.registry().unwrap().addr.clone();
    w.write_system(&registry, "batch: 1", "    lease_ttl: 3s\n");
    let home_b = w.ctx.path().join("home-b");
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    // The next release takes 4 s to come up: long enough to meet it mid-deploy.
    w.ctx.write("app/www/delay", "4\n");
    let r2 = w.next_release(2);

    // Home A deploys; home B is refused, naming A's lease.
    let (a, a_log) = spawn_until(
        &w,
        &at(w.ctx.home().as_path(), &["deploy", "production", &r2]),
        "leased",
    );
    run_at(&w, &home_b, &["deploy", "production", &r1]).fails(
        1,
        &["pull release", "leased to", "run ", "deploy of", "--wait"],
    );
    // With --wait, B waits for A's lease and then deploys.
    let (b, b_log) = spawn_until(
        &w,
        &at(&home_b, &["deploy", "production", &r1, "--wait"]),
        "waiting",
    );
    let mut a = a;
    assert!(a.wait().unwrap().success(), "{}", a_log.join().unwrap());
    let mut b = b;
    assert!(b.wait().unwrap().success(), "{}", b_log.join().unwrap());
    w.assert_serving(&r1);

    // A deploy killed while it holds its lease: the next one takes the lease over once
    // it expired, and says so.
    let (mut a, _) = spawn_until(
        &w,
        &at(w.ctx.home().as_path(), &["deploy", "production", &r2]),
        "leased",
    );
    a.kill().unwrap();
    a.wait().unwrap();
    let out = run_at(&w, &home_b, &["deploy", "production", &r2, "--wait"]).ok();
    assert!(out.stderr.contains("took over the stale lease of"), "{out}");
    w.assert_serving(&r2);
}
