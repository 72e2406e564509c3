//! A real private registry: images pinned by the digest the build pushed.

use stretch_test::Registry;

use super::common::AgentProc;

use super::deploy::{TOKEN, World};

/// `(repository inside the registry, tag, digest)` of release `id`'s web image.
fn web_image(w: &World, id: &str) -> (String, String, String) {
    let releases = w.ctx.run(&["releases", "--json"]).ok().json();
    let r = releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap();
    let image = &r["images"][0];
    let name = image["name"].as_str().unwrap();
    let digest = image["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{image}");
    let (repo, tag) = name.rsplit_once(':').unwrap();
    (repo.to_string(), tag.to_string(), digest)
}

#[test]
fn a_tag_moved_after_the_build_changes_nothing_a_deploy_runs() {
    let w = World::new("pin", 1, true);
    let r1 = w.build();
    let (repo, tag, digest) = web_image(&w, &r1);
    // Someone pushes another image under the release's tag.
    stretch_test::docker(&["tag", &stretch_test::base_image(), &format!("{repo}:{tag}")]);
    stretch_test::docker(&["push", &format!("{repo}:{tag}")]);
    let registry_repo = repo.split_once('/').unwrap().1;
    let reg = repo.split_once('/').unwrap().0;
    let registry = w.registry().unwrap();
    assert_eq!(reg, registry.addr);
    assert_ne!(registry.manifest_digest(registry_repo, &tag), digest);
    w.ctx.run(&["deploy", "production"]).ok();
    w.assert_serving(&r1);
}

#[test]
fn a_manifest_deleted_from_the_registry_fails_the_deploy_before_any_switch() {
    let w = World::new("gone", 1, true);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    w.ctx.write("app/www/version.txt", "2\n");
    let r2 = w.build();
    let (repo, _, digest) = web_image(&w, &r2);
    let registry = w.registry().unwrap();
    let status = registry.delete_manifest(repo.split_once('/').unwrap().1, &digest);
    assert_eq!(status, 202);
    w.ctx
        .run(&["deploy", "production"])
        .fails(1, &["push failed", &digest]);
    w.assert_serving(&r1);
}

#[test]
fn a_local_image_retagged_after_the_build_is_refused_naming_both_ids() {
    let w = World::new("retag", 1, false);
    let r1 = w.build();
    let (repo, tag, id) = web_image(&w, &r1);
    stretch_test::docker(&["tag", &stretch_test::base_image(), &format!("{repo}:{tag}")]);
    let other = stretch_test::docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &repo_tag(&repo, &tag),
    ]);
    assert_ne!(other.trim(), id);
    w.ctx
        .run(&["deploy", "production"])
        .fails(1, &["refusing to run it", &id, other.trim()]);
    assert!(AgentProc::containers(&w.system).is_empty());
}

fn repo_tag(repo: &str, tag: &str) -> String {
    format!("{repo}:{tag}")
}

/// Docker's client configuration in `dir`, with `user:password` for `registry`.
fn docker_config(dir: &std::path::Path, registry: &str, user: &str, password: &str) {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({"auths": {registry: {"auth": auth}}}).to_string(),
    )
    .unwrap();
}

#[test]
fn a_registry_with_a_login_takes_dockers_credentials_and_never_shows_them() {
    const RIGHT: &str = "right-horse-battery-7731";
    const WRONG: &str = "wrong-horse-battery-4410";
    let registry = Registry::start_with_login("ci", RIGHT);
    let mut w = World::new("login", 0, false);
    let client = w.ctx.path().join("client-docker");
    let agent_cfg = w.ctx.path().join("agent-docker");
    docker_config(&client, &registry.addr, "ci", WRONG);
    docker_config(&agent_cfg, &registry.addr, "ci", RIGHT);
    let agent_dir = w.ctx.path().join("agent0");
    w.agents.push(AgentProc::start_with(
        &agent_dir,
        TOKEN,
        &w.system,
        &["--docker-config", agent_cfg.to_str().unwrap()],
    ));
    w.write_system(&registry.addr, "batch: 1", "");
    w.ctx
        .env
        .push(("DOCKER_CONFIG".into(), client.display().to_string()));

    // A wrong password: the push fails naming the registry and where the login came
    // from, and the password is in no output, log or run record.
    let out = w.ctx.run(&["build"]).fails(
        1,
        &[
            "push failed",
            &registry.addr,
            "refused the login of `ci`",
            &client.join("config.json").display().to_string(),
        ],
    );
    assert!(!format!("{out}").contains(WRONG), "{out}");
    let history = w.ctx.run(&["history", "--json"]).ok().json();
    let run = history[0]["id"].to_string();
    let log = w.ctx.run(&["logs", &run]).ok();
    assert!(log.stdout.contains("refused the login"), "{log}");
    assert!(!format!("{log}").contains(WRONG));

    // The right one: pushed with it. An agent without a login of its own cannot
    // pull (the controller's login never travels): the deploy fails before any
    // switch, naming the registry.
    docker_config(&client, &registry.addr, "ci", RIGHT);
    let r1 = w.build();
    docker_config(&agent_cfg, &registry.addr, "ci", WRONG);
    let out = w.ctx.run(&["deploy", "production"]).fails(
        1,
        &["push failed", &registry.addr, "refused the login of `ci`"],
    );
    assert!(!format!("{out}").contains(WRONG) && !format!("{out}").contains(RIGHT));
    assert!(AgentProc::containers(&w.system).is_empty());
    // With its own right login it pulls.
    docker_config(&agent_cfg, &registry.addr, "ci", RIGHT);
    let out = w.ctx.run(&["deploy", "production"]).ok();
    assert!(!format!("{out}").contains(RIGHT), "{out}");
    w.assert_serving(&r1);
    let agent_log = w.agents[0].log();
    assert!(!agent_log.contains(RIGHT) && !agent_log.contains(WRONG));

    // The override for CI, without any Docker configuration.
    std::fs::remove_file(client.join("config.json")).unwrap();
    w.ctx.write("app/www/version.txt", "2\n");
    w.ctx
        .run(&["build"])
        .fails(1, &["needs a login: none found"]);
    w.ctx
        .env
        .push(("STRETCH_REGISTRY_USERNAME".into(), "ci".into()));
    w.ctx
        .env
        .push(("STRETCH_REGISTRY_PASSWORD".into(), RIGHT.into()));
    w.build();
}

#[test]
fn prune_keeps_what_environments_run_and_removes_the_rest_everywhere() {
    let w = World::new("prune", 1, true);
    let registry = w.registry().unwrap();
    let mut ids = Vec::new();
    for v in 0..4 {
        w.ctx.write("app/www/version.txt", format!("{v}\n"));
        ids.push(w.build());
    }
    // r1 then r2 deployed: r2 runs, r1 is the rollback target, r3 the newest.
    w.ctx.run(&["deploy", "production", &ids[1]]).ok();
    w.ctx.run(&["deploy", "production", &ids[2]]).ok();
    let text = w.ctx.run(&["releases"]).ok().stdout;
    assert!(text.contains("runs on `production`\n"), "{text}");
    assert!(text.contains("runs on `production` (rollback)"), "{text}");
    let (repo0, tag0, digest0) = web_image(&w, &ids[0]);
    let registry_repo = repo0.split_once('/').unwrap().1.to_string();
    let archive0 = w
        .ctx
        .home()
        .join("releases")
        .join(format!("{}.index", ids[0]));
    let image0 = format!("{repo0}:{tag0}");

    // A dry run says the same and changes nothing.
    let dry = w
        .ctx
        .run(&["prune", "--keep", "1", "--dry-run", "--json"])
        .ok()
        .json();
    assert_eq!(dry["removed"].as_array().unwrap().len(), 1, "{dry}");
    assert_eq!(dry["removed"][0]["id"], ids[0].as_str());
    assert_eq!(
        dry["removed"][0]["registry"][0],
        format!("{repo0}@{digest0}").as_str()
    );
    assert!(archive0.exists());
    assert_eq!(registry.manifest_digest(&registry_repo, &tag0), digest0);
    assert!(stretch_test::docker_ok(&["image", "inspect", &image0]));

    let out = w.ctx.run(&["prune", "--keep", "1"]).ok();
    assert!(out.stdout.contains(&format!("({})\n", ids[0])), "{out}");
    for (id, why) in [
        (&ids[3], "one of the newest 1"),
        (&ids[2], "`production` runs it"),
        (&ids[1], "`production` rolls back to it"),
    ] {
        assert!(out.stdout.contains(&format!("({id}): {why}")), "{out}");
    }
    assert!(!archive0.exists());
    assert!(!stretch_test::docker_ok(&["image", "inspect", &image0]));
    let (status, _) = stretch_test::http_get(
        &registry.addr,
        &format!("/v2/{registry_repo}/manifests/{digest0}"),
    )
    .unwrap();
    assert_eq!(status, 404);
    let left = w.ctx.run(&["releases", "--json"]).ok().json();
    assert_eq!(left.as_array().unwrap().len(), 3);
    // What runs still deploys and rolls back.
    w.ctx.run(&["rollback", "production"]).ok();
    w.assert_serving(&ids[1]);
    // Nonsense is refused before anything changes.
    w.ctx
        .run(&["prune", "--keep", "many"])
        .fails(2, &["--keep"]);
}

#[test]
fn a_registry_over_tls_takes_pushes_pulls_and_deletes() {
    let registry = Registry::start_tls();
    let w = World::new("tlsreg", 1, false);
    w.write_system(&registry.addr, "batch: 1", "");
    let r0 = w.build();
    let (repo0, _, digest0) = web_image(&w, &r0);
    w.ctx.write("app/www/version.txt", "2\n");
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    w.assert_serving(&r1);
    // r0 is neither run nor a rollback target: its manifest goes, over HTTPS.
    let out = w.ctx.run(&["prune", "--keep", "0", "--json"]).ok().json();
    assert_eq!(out["removed"][0]["id"], r0.as_str(), "{out}");
    assert_eq!(
        out["removed"][0]["registry"][0],
        format!("{repo0}@{digest0}").as_str(),
        "{out}"
    );
    assert!(!stretch_test::docker_ok(&[
        "pull",
        &format!("{repo0}@{digest0}")
    ]));
}
