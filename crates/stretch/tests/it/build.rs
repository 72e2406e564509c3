//! `stretch build` end to end: a 3-node, 2-source system with secrets, pushed to a real
//! registry; rebuilds that change nothing; image reuse; `--source` overrides.

use std::os::unix::fs::PermissionsExt;

use stretch_test::Registry;

use super::common::*;

/// Write the shared example: a git repo with three nodes (two built from a chain of
/// base containers), global and local config, secrets, and a path source overriding a file.
fn three_nodes(ctx: &Ctx, system: &str, registry: &str) -> (String, String) {
    let repo = ctx.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git_init(&repo);
    let w = |rel: &str, text: &str| write(&repo, rel, text);
    w(
        "stretch.yml",
        "nodes: {web: node_web, api: node_api, worker: node_worker}\n\
         plugins:\n  - exec: {build: 'echo \"root plugin $STRETCH_HOOK $STRETCH_RELEASE_ID\" > \"$MARKER\"', env: [MARKER]}\n\
         local_stretch:\n  servers:\n    includes: [web, api]\n    plugins: {exec: {build: 'echo local $STRETCH_NODE >> \"$MARKER\"', env: [MARKER]}}\n",
    );
    w(
        "config.yml",
        "config: {greeting: hello, db: {password: !secret db.password}}\nlocal_config:\n  - includes: [web]\n    config: {greeting: web-hello}\n",
    );
    w("secrets.yml", "db:\n  password: s3cret-root\n");
    w("containers/os/container.yml", "name: os\n");
    w(
        "containers/os/Dockerfile",
        &format!("{}RUN echo os > /os.txt\n", from_base(system)),
    );
    w(
        "containers/httpd/container.yml",
        "from: ../os/container.yml\n",
    );
    w(
        "containers/httpd/Dockerfile",
        "RUN echo httpd > /httpd.txt\n",
    );
    w(
        "node_web/container.yml",
        "from: ../containers/httpd\nport: 8080\nhealth: {path: /, interval: 500ms}\n",
    );
    w(
        "node_web/Dockerfile",
        "ARG STRETCH_BASE_IMAGE\nFROM ${STRETCH_BASE_IMAGE}\nCOPY app/ /www/\n",
    );
    w("node_web/app/index.html", "version 1\n");
    w(
        "node_web/config.yml",
        "port: 8080\ntoken: !secret api.token\n",
    );
    w("node_web/secrets.yml", "api:\n  token: web-token-123\n");
    w(
        "node_web/templates/httpd.conf.jinja",
        "listen {{ config.port }}\n",
    );
    w(
        "node_api/container.yml",
        "from: ../containers/os/container.yml\n",
    );
    w("node_api/Dockerfile", "COPY app/ /api/\n");
    w("node_api/app/api.txt", "api v1\n");
    w(
        "node_worker/Dockerfile",
        &format!("{}CMD [\"sleep\", \"3600\"]\n", from_base(system)),
    );
    w("node_worker/tls.key", "not yet encrypted");
    let commit = git_commit_all(&repo, "first");

    // Secrets: one key from `stretch keys generate`, one from `age-keygen`.
    let out = ctx.run(&["keys", "generate", "-o", "key.txt"]).ok();
    let recipient = out
        .stderr
        .trim()
        .strip_prefix("Public key: ")
        .expect("recipient")
        .to_string();
    let age_key = ctx.path().join("age-key.txt");
    let status = std::process::Command::new("age-keygen")
        .arg("-o")
        .arg(&age_key)
        .output()
        .unwrap();
    assert!(status.status.success());
    let age_recipient = String::from_utf8_lossy(&status.stderr)
        .trim()
        .strip_prefix("Public key: ")
        .unwrap()
        .to_string();
    for f in ["secrets.yml", "node_web/secrets.yml"] {
        let file = repo.join(f);
        ctx.run(&[
            "secrets",
            "encrypt",
            file.to_str().unwrap(),
            "-r",
            &recipient,
            "-r",
            &age_recipient,
        ])
        .ok();
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("BEGIN AGE ENCRYPTED FILE")
        );
    }
    // A `.age` file made by the age CLI.
    let key_plain = repo.join("node_worker/tls.key");
    let st = std::process::Command::new("age")
        .args(["-r", &recipient, "-o"])
        .arg(repo.join("node_worker/tls.key.age"))
        .arg(&key_plain)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&key_plain).unwrap();
    let commit2 = git_commit_all(&repo, "secrets");
    assert_ne!(commit, commit2);

    ctx.write(
        "system.yml",
        format!(
            "system: {system}\nregistry: {registry}\n{}sources:\n  - name: app\n    git: ./repo\n    ref: main\n  - name: overrides\n    path: ./overrides\n",
            ctx.recipients(registry)
        ),
    );
    ctx.write(
        "overrides/node_web/app/index.html",
        "version 1 (overridden)\n",
    );
    (commit2, recipient)
}

#[test]
fn three_nodes_two_sources_with_secrets_push_to_a_registry() {
    let registry = Registry::start();
    let system = unique("shop");
    let _cleanup = image_cleanup(&system);
    let mut ctx = Ctx::new();
    let (commit, _) = three_nodes(&ctx, &system, &registry.addr);
    let marker = ctx.path().join("marker.txt");
    ctx.env
        .push(("MARKER".into(), marker.display().to_string()));

    // Missing identity while secrets exist: bad input, nothing recorded.
    ctx.run(&["build"]).fails(2, &["no identity was given"]);
    ctx.assert_nothing_recorded();

    let out = ctx.run(&["build", "-i", "key.txt", "--json"]).ok();
    let r = out.json();
    let id = r["id"].as_str().unwrap().to_string();
    assert_eq!(r["reused"], false);
    assert_eq!(
        r["sources"][0],
        serde_json::json!({"name": "app", "commit": commit})
    );
    assert_eq!(
        r["sources"][1],
        serde_json::json!({"name": "overrides", "commit": null})
    );
    let images: Vec<String> = r["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    for image in r["images"].as_array().unwrap() {
        // The manifest the registry took, as the registry itself names it.
        let (name, tag) = image["name"].as_str().unwrap().rsplit_once(':').unwrap();
        let repo = name.split_once('/').unwrap().1;
        let digest = registry.manifest_digest(repo, tag);
        assert_eq!(image["digest"], digest.as_str(), "{image}");
    }
    for node in ["base-os", "base-httpd", "web", "api", "worker"] {
        let want = format!("{}/{system}/{node}:{id}", registry.addr);
        assert!(images.contains(&want), "{want} not in {images:?}");
        assert_eq!(
            registry.catalog_tags(&format!("{system}/{node}")),
            vec![id.clone()],
            "{node} not pushed"
        );
    }
    // Build plugins ran, root first, then node plugins from local_stretch.
    let m = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(m, format!("root plugin build {id}\nlocal web\nlocal api\n"));

    // The override won, the base chain ran, and no plaintext secret is in any image.
    let web = format!("{}/{system}/web:{id}", registry.addr);
    let cat = stretch_test::docker(&[
        "run",
        "--rm",
        &web,
        "cat",
        "/www/index.html",
        "/os.txt",
        "/httpd.txt",
    ]);
    assert_eq!(cat, "version 1 (overridden)\nos\nhttpd");
    let history = stretch_test::docker(&["history", "--no-trunc", &web]);
    assert!(!history.contains("s3cret-root") && !history.contains("web-token-123"));

    // Home 0700; archive and sealed release configuration 0600; secrets decrypted in
    // the configuration, which is sealed to the release key: no clear secret in any file.
    let home = ctx.home();
    assert_eq!(
        std::fs::metadata(&home).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let chunks: Vec<String> = walk(&home.join("chunks"))
        .into_iter()
        .map(|p| p.strip_prefix(&home).unwrap().display().to_string())
        .collect();
    assert!(chunks.iter().any(|c| c.ends_with(".zst")), "{chunks:?}");
    assert_eq!(
        std::fs::metadata(home.join("chunks"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    for f in [
        format!("releases/{id}.index"),
        format!("releases/{id}.config.age"),
    ]
    .into_iter()
    .chain(chunks)
    {
        assert_eq!(
            std::fs::metadata(home.join(&f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "{f}"
        );
    }
    assert!(!home.join(format!("releases/{id}.json")).exists());
    for entry in walkdir::WalkDir::new(&home).into_iter().flatten() {
        if entry.file_type().is_file() {
            let data = std::fs::read(entry.path()).unwrap();
            let text = String::from_utf8_lossy(&data);
            for secret in ["s3cret-root", "web-token-123"] {
                assert!(
                    !text.contains(secret),
                    "{secret} in {}",
                    entry.path().display()
                );
            }
        }
    }
    let key =
        stretch_core::secrets::Identities::from_file(&ctx.path().join("release.key")).unwrap();
    let sealed = std::fs::read(home.join(format!("releases/{id}.config.age"))).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&stretch_core::secrets::decrypt(&key, &sealed).unwrap()).unwrap();
    assert_eq!(
        config["secrets"]["secrets.yml"]["db"]["password"],
        "s3cret-root"
    );
    assert_eq!(
        config["secrets"]["node_web/secrets.yml"]["api"]["token"],
        "web-token-123"
    );
    assert!(config["files"]["node_worker/tls.key"].is_string());
    assert_eq!(config["nodes"][0]["port"], 8080);
    // Secrets never reach the output or the log.
    let run_id = ctx.run(&["history", "--json"]).ok().json()[0]["id"].to_string();
    let run_log = ctx.run(&["logs", &run_id]).ok();
    assert!(run_log.stdout.contains("[images]"), "{run_log}");
    for text in [&out.stdout, &out.stderr, &run_log.stdout] {
        assert!(
            !text.contains("s3cret-root") && !text.contains("web-token-123"),
            "secret leaked"
        );
    }

    // Listed.
    let releases = ctx.run(&["releases", "--json"]).ok().json();
    assert_eq!(releases[0]["id"], id.as_str());
    assert_eq!(releases[0]["name"], r["name"]);

    // Same sources again: the same release at once, nothing built.
    let again = ctx.run(&["build", "-i", "key.txt", "--json"]).ok();
    assert_eq!(again.json()["id"], id.as_str());
    assert_eq!(again.json()["reused"], true);
    assert!(!again.stderr.contains("==> images"), "{again}");
    assert_eq!(
        ctx.run(&["releases", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // One changed byte: a new release; unchanged containers are not rebuilt.
    ctx.write("overrides/node_web/app/index.html", "version 2\n");
    let third = ctx.run(&["build", "-i", "key.txt", "--json"]).ok();
    let id3 = third.json()["id"].as_str().unwrap().to_string();
    assert_ne!(id3, id);
    assert!(
        third
            .stderr
            .contains("container `node_api/container.yml`: inputs unchanged"),
        "{third}"
    );
    assert!(
        third
            .stderr
            .contains("container `node_web/container.yml`: building"),
        "{third}"
    );
    assert_eq!(registry.catalog_tags(&format!("{system}/api")).len(), 2);

    let history = ctx.run(&["history", "--json"]).ok().json();
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["build", "build", "build"]);
    assert_eq!(history[0]["status"], "succeeded");
    assert_eq!(history[0]["release"], id3.as_str());
}

#[test]
fn source_ref_override_and_identical_trees() {
    let system = unique("refs");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    let repo = ctx.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git_init(&repo);
    write(&repo, "stretch.yml", "name: web\n");
    write(
        &repo,
        "Dockerfile",
        format!("{}COPY v.txt /v.txt\n", from_base(&system)),
    );
    write(&repo, "v.txt", "one\n");
    let first = git_commit_all(&repo, "one");
    git(&repo, &["tag", "v1"]);
    write(&repo, "v.txt", "two\n");
    let second = git_commit_all(&repo, "two");
    ctx.write(
        "system.yml",
        format!("system: {system}\nsources:\n  - name: app\n    git: ./repo\n"),
    );

    // Default ref: the remote HEAD.
    let head = ctx.run(&["build", "--json"]).ok().json();
    assert_eq!(head["sources"][0]["commit"], second.as_str());
    // A tag, and a commit id, give the older tree.
    let tagged = ctx
        .run(&["build", "--json", "--source", "app=v1"])
        .ok()
        .json();
    assert_eq!(tagged["sources"][0]["commit"], first.as_str());
    assert_ne!(tagged["id"], head["id"]);
    let by_commit = ctx
        .run(&["build", "--json", "--source", &format!("app={first}")])
        .ok()
        .json();
    assert_eq!(by_commit["id"], tagged["id"]);
    assert_eq!(by_commit["reused"], true);
    let out = stretch_test::docker(&[
        "run",
        "--rm",
        &format!("{system}/web:{}", tagged["id"].as_str().unwrap()),
        "cat",
        "/v.txt",
    ]);
    assert_eq!(out, "one");
    // A new commit upstream is fetched into the cached mirror.
    write(&repo, "v.txt", "three\n");
    let third = git_commit_all(&repo, "three");
    let latest = ctx.run(&["build", "--json"]).ok().json();
    assert_eq!(latest["sources"][0]["commit"], third.as_str());

    ctx.run(&["build", "--source", "nope=main"])
        .fails(2, &["no source is named `nope`"]);
}

#[test]
fn a_build_whose_process_died_shows_as_failed() {
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    let system = unique("abandoned");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    ctx.one_node(&system, "local");
    ctx.write(
        "app/stretch.yml",
        "name: web\nplugins:\n  exec: {build: 'echo plugin-started; sleep 60'}\n",
    );
    // Its own process group, so that the plugin's shell goes with it.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stretch"))
        .arg("build")
        .current_dir(ctx.path())
        .env_remove("STRETCH_HOME")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = format!("-{}", child.id());
    let kill = || {
        let _ = std::process::Command::new("kill")
            .args(["-9", "--", &group])
            .status();
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let run = loop {
        let history = ctx.run(&["history", "--json"]).ok().json();
        let id = history[0]["id"].as_i64();
        if let Some(id) = id
            && ctx
                .run(&["logs", &id.to_string()])
                .ok()
                .stdout
                .contains("plugin-started")
        {
            break id;
        }
        let ended = history[0]["status"]
            .as_str()
            .is_some_and(|s| s != "running");
        if Instant::now() > deadline || ended {
            kill();
            let log = id
                .map(|id| ctx.run(&["logs", &id.to_string()]).stdout)
                .unwrap_or_default();
            panic!("the plugin never started: {history}\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        ctx.run(&["history", "--json"]).ok().json()[0]["status"],
        "running"
    );
    kill();
    let _ = child.wait();

    let history = ctx.run(&["history", "--json"]).ok().json();
    assert_eq!(history[0]["id"], run);
    assert_eq!(history[0]["status"], "failed", "{history}");
    let log = ctx.run(&["logs", &run.to_string()]).ok().stdout;
    assert!(log.contains("abandoned: the process running this"), "{log}");
    assert_eq!(
        ctx.run(&["releases", "--json"]).ok().json(),
        serde_json::json!([])
    );

    // What it had written is swept by the next build; only that one's release is left.
    let files = || {
        let mut f: Vec<String> = std::fs::read_dir(ctx.home().join("releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        f.sort();
        f
    };
    assert_eq!(files().len(), 2, "{:?}", files());
    ctx.write(
        "app/stretch.yml",
        "name: web\nplugins:\n  exec: {build: 'echo quick'}\n",
    );
    let id = ctx.run(&["build", "--json"]).ok().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(files(), [format!("{id}.index"), format!("{id}.json")]);
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
