//! Builds that do not copy their `path:` sources: files are linked into the build
//! tree, a rebuild whose inputs did not change reads nothing, a source file changed
//! while the build runs is detected, and build plugins cannot write through to the
//! sources.

use std::io::{BufRead, Write};

use super::common::*;

fn build(ctx: &Ctx) -> (String, Out) {
    let out = ctx.run(&["build", "--json"]).ok();
    let id = out.json()["id"].as_str().unwrap().to_string();
    (id, out)
}

#[test]
fn linked_sources_stay_untouched_and_unchanged_inputs_rebuild_nothing() {
    let system = unique("linked");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    ctx.one_node(&system, "local");
    ctx.write("app/page.txt", "v1\n");
    ctx.write(
        "app/stretch.yml",
        "name: web\nplugins:\n  exec: {build: 'echo from-plugin >> page.txt'}\n",
    );
    let (id, first) = build(&ctx);
    assert!(
        first
            .stderr
            .contains("copied so that plugins cannot change the sources"),
        "{first}"
    );
    // The plugin wrote into the build tree, not through a link into the source.
    let page = ctx.path().join("app/page.txt");
    assert_eq!(std::fs::read_to_string(&page).unwrap(), "v1\n");

    // Nothing changed: the rebuild reads no file and names the same release.
    let (again, out) = build(&ctx);
    assert_eq!(again, id);
    assert_eq!(out.json()["reused"], true, "{out}");
    assert!(
        out.stderr.contains("inputs unchanged since the build of"),
        "{out}"
    );
    assert!(!out.stderr.contains("archived"), "{out}");

    // Rewritten with the same content: the inputs look different, the build reads
    // them, and the archive (so the release) is the same.
    std::fs::write(&page, "v1\n").unwrap();
    let (same, out) = build(&ctx);
    assert_eq!(same, id);
    assert!(out.stderr.contains("archived"), "{out}");
    assert!(out.stderr.contains("already exists"), "{out}");

    // Changed: a new release.
    std::fs::write(&page, "v2\n").unwrap();
    let (next, _) = build(&ctx);
    assert_ne!(next, id);
}

#[test]
fn a_source_file_changed_during_the_build_fails_it() {
    let system = unique("midbuild");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    ctx.one_node(&system, "local");
    ctx.write("app/page.txt", "v1\n");
    // Long enough an images stage to change a file while it runs.
    ctx.write(
        "app/Dockerfile",
        format!("{}RUN sleep 3\nCOPY . /app\n", from_base(&system)),
    );
    let mut child = ctx
        .command(&["build"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut changed = false;
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !changed && line.contains("==> images") {
            // In place: the same file the build tree links to.
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(ctx.path().join("app/page.txt"))
                .unwrap();
            f.write_all(b"edited mid-build\n").unwrap();
            changed = true;
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("`page.txt` changed during the build"), "{log}");
    ctx.assert_no_release();
}
