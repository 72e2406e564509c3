//! Every bad input named by the build issue: a clear message (file, line, what was
//! expected), exit 2 for bad input or 1 for a failed stage, and no release recorded.

use super::common::*;

/// A one-node system with `registry: local` and one extra file.
fn with_file(rel: &str, text: &str) -> Ctx {
    let ctx = Ctx::new();
    ctx.one_node("bad", "local");
    ctx.write(rel, text);
    ctx
}

#[test]
fn malformed_yaml() {
    let ctx = Ctx::new();
    ctx.write("system.yml", "system: shop\n  sources: x\n");
    ctx.run(&["build"])
        .fails(2, &["system.yml:2:10", "mapping values are not allowed"]);
    ctx.assert_nothing_recorded();
    let ctx = with_file("app/config.yml", "a: 1\n b: 2\n");
    ctx.run(&["build"])
        .fails(2, &["config.yml:2:3", "mapping values are not allowed"]);
    ctx.assert_nothing_recorded();
}

#[test]
fn unknown_keys() {
    let ctx = with_file("app/stretch.yml", "name: web\nplugns: {}\n");
    ctx.run(&["build"]).fails(
        2,
        &[
            "stretch.yml:2:1",
            "unknown field `plugns`",
            "did you mean `plugins`?",
        ],
    );
    ctx.assert_nothing_recorded();
    let ctx = with_file("app/container.yml", "port: 80\nhelth: {path: /}\n");
    ctx.run(&["build"]).fails(
        2,
        &[
            "container.yml:2:1",
            "unknown field `helth`",
            "did you mean `health`?",
        ],
    );
    let ctx = Ctx::new();
    ctx.write(
        "system.yml",
        "system: shop\nregistri: local\nsources: [{path: .}]\n",
    );
    ctx.run(&["build"])
        .fails(2, &["system.yml:2:1", "did you mean `registry`?"]);
    ctx.assert_nothing_recorded();
}

#[test]
fn missing_build_files() {
    let ctx = Ctx::new();
    ctx.one_node("bad", "local");
    std::fs::remove_file(ctx.path().join("app/stretch.yml")).unwrap();
    ctx.run(&["build"]).fails(2, &["missing `stretch.yml`"]);
    ctx.assert_nothing_recorded();

    let ctx = Ctx::new();
    ctx.one_node("bad", "local");
    std::fs::remove_file(ctx.path().join("app/Dockerfile")).unwrap();
    ctx.run(&["build"])
        .fails(2, &["missing Dockerfile", "`Dockerfile` does not exist"]);
    ctx.assert_nothing_recorded();

    let ctx = with_file(
        "app/stretch.yml",
        "nodes:\n  web: web\n  api: services/api\n",
    );
    ctx.write("app/web/Dockerfile", "FROM x\n");
    ctx.run(&["build"]).fails(
        2,
        &[
            "stretch.yml:3:8",
            "node `api`: folder `services/api` does not exist",
        ],
    );
    ctx.assert_nothing_recorded();

    let ctx = Ctx::new();
    ctx.write("system.yml", "system: shop\nsources: [{path: ./nowhere}]\n");
    ctx.run(&["build"])
        .fails(2, &["source `1`", "nowhere", "does not exist"]);
    ctx.assert_nothing_recorded();
}

#[test]
fn from_loop() {
    let ctx = with_file("app/container.yml", "from: base/container.yml\n");
    ctx.write("app/base/container.yml", "from: ../mid/container.yml\n");
    ctx.write("app/base/Dockerfile", "");
    ctx.write("app/mid/container.yml", "from: ../base/container.yml\n");
    ctx.write("app/mid/Dockerfile", "");
    ctx.run(&["build"]).fails(
        2,
        &["container `from` loop: base/container.yml -> mid/container.yml -> base/container.yml"],
    );
    ctx.assert_nothing_recorded();
}

#[test]
fn path_escapes() {
    // `..` in a build file.
    let ctx = with_file("app/stretch.yml", "name: web\ncontainer: ../../outside\n");
    ctx.run(&["build"])
        .fails(2, &["stretch.yml:2:12", "escapes the sources"]);
    ctx.assert_nothing_recorded();
    let ctx = with_file("app/container.yml", "dockerfile: ../Dockerfile\n");
    ctx.run(&["build"]).fails(
        2,
        &["container.yml:1:1", "`../Dockerfile` escapes the sources"],
    );
    // A symlink out of its source.
    let ctx = Ctx::new();
    ctx.one_node("bad", "local");
    std::os::unix::fs::symlink("/etc/passwd", ctx.path().join("app/passwd")).unwrap();
    ctx.run(&["build"]).fails(
        2,
        &[
            "source `1`",
            "symlink `passwd` -> `/etc/passwd` escapes its source",
        ],
    );
    ctx.assert_nothing_recorded();
    let ctx = Ctx::new();
    ctx.one_node("bad", "local");
    std::fs::create_dir_all(ctx.path().join("app/sub")).unwrap();
    std::os::unix::fs::symlink("../../system.yml", ctx.path().join("app/sub/up")).unwrap();
    ctx.run(&["build"]).fails(
        2,
        &["symlink `sub/up` -> `../../system.yml` escapes its source"],
    );
    ctx.assert_nothing_recorded();
}

/// A system whose config reads `!secret` values, encrypted for a new key.
fn with_secrets(ctx: &Ctx, secrets: &str) -> String {
    ctx.one_node("bad", "local");
    ctx.write("app/config.yml", "db:\n  password: !secret db.password\n");
    ctx.write("app/secrets.yml", secrets);
    let out = ctx.run(&["keys", "generate", "-o", "key.txt"]).ok();
    let recipient = out
        .stderr
        .trim()
        .strip_prefix("Public key: ")
        .unwrap()
        .to_string();
    ctx.run(&["secrets", "encrypt", "app/secrets.yml", "-r", &recipient])
        .ok();
    recipient
}

#[test]
fn secret_path_missing() {
    let ctx = Ctx::new();
    with_secrets(&ctx, "db:\n  user: admin\n");
    ctx.run(&["build", "-i", "key.txt"]).fails(
        2,
        &[
            "config.yml:2:21",
            "`!secret db.password`",
            "has no value at `db.password`",
        ],
    );
    ctx.assert_nothing_recorded();
}

#[test]
fn wrong_or_missing_identity() {
    let ctx = Ctx::new();
    with_secrets(&ctx, "db:\n  password: hunter2\n");
    ctx.run(&["keys", "generate", "-o", "other.txt"]).ok();
    let out = ctx
        .run(&["build", "-i", "other.txt"])
        .fails(2, &["secrets.yml", "db.password"]);
    assert!(!out.stderr.contains("hunter2"));
    ctx.assert_nothing_recorded();
    ctx.run(&["build"])
        .fails(2, &["no identity was given", "--identity"]);
    ctx.run(&["build", "-i", "missing.txt"])
        .fails(2, &["missing.txt"]);
    ctx.assert_nothing_recorded();
}

#[test]
fn corrupt_armor() {
    let ctx = Ctx::new();
    with_secrets(&ctx, "db:\n  password: hunter2\n");
    let file = ctx.path().join("app/secrets.yml");
    let text = std::fs::read_to_string(&file).unwrap();
    // Damage the base64 body of the message, keeping the armor lines.
    let lines: Vec<&str> = text.lines().collect();
    let body = lines.iter().position(|l| l.contains("BEGIN AGE")).unwrap() + 1;
    let mut damaged: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    damaged[body] = damaged[body].replace(|c: char| c.is_ascii_alphanumeric(), "A");
    std::fs::write(&file, damaged.join("\n") + "\n").unwrap();
    ctx.run(&["build", "-i", "key.txt"])
        .fails(2, &["secrets.yml", "db.password"]);
    ctx.assert_nothing_recorded();
}

#[test]
fn git_ref_that_does_not_exist() {
    let ctx = Ctx::new();
    let repo = ctx.path().join("repo");
    git_init(&repo);
    write(&repo, "stretch.yml", "name: web\n");
    git_commit_all(&repo, "one");
    ctx.write(
        "system.yml",
        "system: shop\nsources:\n  - name: app\n    git: ./repo\n    ref: no-such-branch\n",
    );
    ctx.run(&["build"]).fails(
        2,
        &[
            "source `app`",
            "ref `no-such-branch` does not exist",
            "main",
        ],
    );
    ctx.assert_nothing_recorded();
    ctx.write(
        "system.yml",
        "system: shop\nsources:\n  - git: ./no-repo-here\n",
    );
    ctx.run(&["build"]).fails(1, &["source `1`", "clone"]);
    ctx.assert_no_release();
}

#[test]
fn unreachable_registry() {
    let system = unique("noreg");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    let port = stretch_test::free_port();
    ctx.one_node(&system, &format!("127.0.0.1:{port}"));
    ctx.run(&["build"])
        .fails(1, &["push failed", &format!("127.0.0.1:{port}")]);
    ctx.assert_no_release();
    let history = ctx.run(&["history", "--json"]).ok().json();
    assert_eq!(history[0]["status"], "failed");
}

#[test]
fn failing_docker_build_step() {
    let system = unique("badstep");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    ctx.one_node(&system, "local");
    ctx.write(
        "app/Dockerfile",
        format!("{}RUN echo about-to-fail && exit 7\n", from_base(&system)),
    );
    ctx.run(&["build"])
        .fails(1, &["build failed", "about-to-fail", "exit 7"]);
    ctx.assert_no_release();
}

#[test]
fn failing_build_plugin() {
    let system = unique("badplugin");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    ctx.one_node(&system, "local");
    ctx.write(
        "app/stretch.yml",
        "name: web\nplugins:\n  exec: {build: 'echo plugin-says-no; exit 3'}\n",
    );
    ctx.run(&["build"]).fails(
        1,
        &["plugin `exec`", "exited with status 3", "plugin-says-no"],
    );
    ctx.assert_no_release();
    // An external plugin from `plugins/NAME`, failing too.
    ctx.write(
        "app/stretch.yml",
        "name: web\nplugins:\n  check: {level: 2}\n",
    );
    let script = ctx.write(
        "app/plugins/check",
        "#!/bin/sh\ncat > /dev/null\necho external-failed >&2\nexit 4\n",
    );
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&script).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    ctx.run(&["build"]).fails(
        1,
        &["plugin `check`", "exited with status 4", "external-failed"],
    );
    ctx.assert_no_release();
    // An unknown plugin is bad input.
    ctx.write("app/stretch.yml", "name: web\nplugins:\n  nope: {}\n");
    ctx.run(&["build"]).fails(2, &["unknown plugin `nope`"]);
}

#[test]
fn a_registry_without_release_recipients_or_with_a_bad_one() {
    // With a registry, releases travel: their secrets must be sealed to someone.
    let ctx = Ctx::new();
    ctx.write(
        "system.yml",
        "system: shop\nregistry: 127.0.0.1:5999\nsources: [{path: ./app}]\n",
    );
    ctx.write("app/stretch.yml", "name: web\n");
    ctx.run(&["build"]).fails(
        2,
        &[
            "system.yml:2:1",
            "needs `release_recipients`",
            "stretch keys generate -o release.key",
        ],
    );
    ctx.assert_nothing_recorded();
    // A recipient that is not one, named at its line; a pasted secret key is not shown.
    ctx.write(
        "system.yml",
        "system: shop\nregistry: 127.0.0.1:5999\nrelease_recipients: [age1nope]\nsources: [{path: ./app}]\n",
    );
    ctx.run(&["build"]).fails(
        2,
        &["system.yml:3:", "`age1nope` is not a valid age recipient"],
    );
    let (key, _) = stretch_core::secrets::generate();
    let secret = key
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    ctx.write(
        "system.yml",
        format!("system: shop\nregistry: 127.0.0.1:5999\nrelease_recipients: [{secret}]\nsources: [{{path: ./app}}]\n"),
    );
    let out = ctx
        .run(&["build"])
        .fails(2, &["system.yml:3:", "is not a valid age recipient"]);
    assert!(!out.stderr.contains(secret), "{out}");
    ctx.assert_nothing_recorded();
}
