//! A real private registry: images pinned by the digest the build pushed.

use super::common::AgentProc;

use super::deploy::World;

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
