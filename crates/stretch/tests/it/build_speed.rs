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

/// A git source is unpacked once; later builds write only the files that differ from
/// the last build's commit, so the others keep their inodes and are not read again.
/// A git repository `repo` in the test's folder, and a writer of files into it.
fn git_repo(ctx: &Ctx) -> (std::path::PathBuf, impl Fn(&str, &str)) {
    let repo = ctx.path().join("repo");
    stretch_test::git_init(&repo);
    let root = repo.clone();
    let write = move |rel: &str, text: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    (repo, write)
}

#[test]
fn a_git_source_is_updated_in_place() {
    use std::os::unix::fs::MetadataExt;
    let system = unique("gitinc");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    ctx.one_node(&system, "local");
    let (repo, write) = git_repo(&ctx);
    write("stretch.yml", "name: web\n");
    write(
        "Dockerfile",
        &format!("{}COPY . /app\n", from_base(&system)),
    );
    for i in 0..200 {
        write(&format!("data/f{i:03}.txt"), &format!("{i}\n").repeat(50));
    }
    write("gone.txt", "bye\n");
    write("turns/into-a-folder", "file\n");
    write("run.sh", "#!/bin/sh\necho hi\n");
    std::os::unix::fs::symlink("data/f001.txt", repo.join("link")).unwrap();
    std::fs::set_permissions(
        repo.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    stretch_test::git_commit_all(&repo, "one");
    ctx.write(
        "system.yml",
        format!(
            "system: {system}\nregistry: local\n{}sources:\n  - git: ./repo\n    ref: main\n",
            ctx.recipients("local")
        ),
    );
    let (first, _) = build(&ctx);
    // The image's context is the whole tree: every file was written out of git.
    let tree = ctx.home().join("buffer/merged");
    let ino = |rel: &str| std::fs::symlink_metadata(tree.join(rel)).unwrap().ino();
    let kept = ino("data/f100.txt");

    write("data/f007.txt", "changed\n");
    std::fs::remove_file(repo.join("gone.txt")).unwrap();
    std::fs::remove_file(repo.join("turns/into-a-folder")).unwrap();
    write("turns/into-a-folder/now.txt", "inside\n");
    write("new/deep/file.txt", "new\n");
    write("run.sh", "#!/bin/sh\necho changed\n");
    stretch_test::git_commit_all(&repo, "two");
    // Wait out the stat cache's two seconds of distrust of fresh files.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (second, out) = build(&ctx);
    assert_ne!(second, first);
    assert_eq!(
        ino("data/f100.txt"),
        kept,
        "an unchanged file was written anew: {out}"
    );
    let read = |rel: &str| std::fs::read_to_string(ctx.home().join("buffer/merged").join(rel));
    assert_eq!(read("data/f007.txt").unwrap(), "changed\n");
    assert!(read("gone.txt").is_err());
    assert_eq!(read("turns/into-a-folder/now.txt").unwrap(), "inside\n");
    assert_eq!(read("new/deep/file.txt").unwrap(), "new\n");
    assert_eq!(read("link").unwrap(), "1\n".repeat(50));
    // Modes as committed, for a file written anew (changed) too.
    let mode = |rel: &str| std::fs::metadata(tree.join(rel)).unwrap().mode() & 0o111;
    assert_ne!(mode("run.sh"), 0);
    assert_eq!(mode("data/f007.txt"), 0);
    // Unchanged files were taken from the stat cache, not read.
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("chunks:"))
        .unwrap_or_default()
        .to_string();
    let unread: u64 = line
        .split("; ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(unread >= 1, "{out}");

    // The same tree built in a fresh home is the same release.
    let fresh = ctx.path().join("fresh-home");
    let out = ctx
        .run(&["--home", &fresh.display().to_string(), "build", "--json"])
        .ok();
    assert_eq!(out.json()["id"], second.as_str(), "{out}");
}

/// A git source is not checked out: only the files the build needs (build files, the
/// context of the image it builds) are written; the archive reads the rest from git
/// and is the same as a `path:` source of the same tree gives.
#[test]
fn a_git_source_is_not_checked_out_for_nothing() {
    let system = unique("gitlazy");
    let _cleanup = image_cleanup(&system);
    let ctx = Ctx::new();
    let (repo, write) = git_repo(&ctx);
    write("stretch.yml", "nodes: {web: web}\n");
    write(
        "web/Dockerfile",
        &format!("{}COPY hello.txt /hello.txt\n", from_base(&system)),
    );
    write("web/hello.txt", "hello\n");
    for i in 0..50 {
        write(&format!("data/f{i:02}.txt"), &format!("{i}\n").repeat(1000));
    }
    stretch_test::git_commit_all(&repo, "one");
    let recipients = ctx.recipients("local");
    ctx.write(
        "system.yml",
        format!("system: {system}\nregistry: local\n{recipients}sources:\n  - git: ./repo\n    ref: main\n"),
    );
    ctx.write(
        "path.yml",
        format!("system: {system}\nregistry: local\n{recipients}sources:\n  - path: ./repo\n"),
    );
    let (id, _) = build(&ctx);
    let merged = ctx.home().join("buffer/merged");
    assert!(merged.join("web/Dockerfile").is_file());
    assert!(
        merged.join("web/hello.txt").is_file(),
        "the image's context is written"
    );
    assert!(merged.join("data").is_dir());
    assert!(
        !merged.join("data/f07.txt").exists(),
        "a file nothing needed was written"
    );
    // The same tree as a folder (the repository's .git left out) is the same release.
    let other = ctx.path().join("path-home");
    let out = ctx
        .run(&[
            "--system",
            &ctx.path().join("path.yml").display().to_string(),
            "--home",
            &other.display().to_string(),
            "build",
            "--json",
        ])
        .ok();
    assert_eq!(out.json()["id"], id.as_str(), "{out}");
}
