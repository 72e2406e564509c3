//! Sources: each is pulled (a `path:` folder read where it is, a git commit listed
//! from its mirror), then they are merged in order into one build tree, later
//! sources overwriting earlier files.

pub mod git;
pub mod odb;
pub mod path;
mod tree;

pub use tree::{GitFile, SourceFile, Tree};

use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::home::Home;
use crate::log::Log;
use crate::system::{Source, SourceKind, System};
use crate::{Error, Result};

/// A source after pulling: its buffer and, for git, the resolved commit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pulled {
    pub name: String,
    pub commit: Option<String>,
}

/// Pull every source and bring them, layered in order, into `buffer/merged/`: a
/// `path:` source is read where it is, a git source's commit is listed and its files
/// left as blobs until needed (see [`Tree`]). The merged tree stays from build to
/// build and is only changed where the sources changed (see [`path::sync_tree`]).
pub fn pull_all(system: &System, home: &Home, log: &Log) -> Result<(Vec<Pulled>, Tree)> {
    let buffer = home.buffer();
    fs::create_dir_all(&buffer).map_err(|e| io_error("create", &buffer, e))?;
    // Kept: the merged tree and the marks of the git files written into it; anything
    // else is left from another configuration or an earlier version.
    let kept = ["merged", "merged.blobs"];
    for entry in fs::read_dir(&buffer).map_err(|e| io_error("read", &buffer, e))? {
        let entry = entry.map_err(|e| io_error("read", &buffer, e))?;
        if kept.iter().any(|k| entry.file_name() == *k) {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| io_error("clean", &path, e))?;
    }
    let home_root = home
        .root
        .canonicalize()
        .unwrap_or_else(|_| home.root.clone());
    let mut pulled = Vec::new();
    let mut layers = Vec::new();
    let mut mirrors = Vec::new();
    for source in &system.sources {
        let context = |e: Error| e.context(&format!("source `{}`", source.name));
        let (root, commit, listed) = match &source.kind {
            SourceKind::Git { url, git_ref } => {
                let (mirror, commit) =
                    git::pull(url, git_ref.as_deref(), &home.git(), log).map_err(context)?;
                let listed = git::list(&mirror, &commit).map_err(context)?;
                mirrors.push(mirror.clone());
                (mirror, Some(commit), Some((mirrors.len() - 1, listed)))
            }
            SourceKind::Path { path } => {
                if !path.is_dir() {
                    return Err(context(Error::invalid(format!(
                        "source folder `{}` does not exist",
                        path.display()
                    ))));
                }
                let real = path.canonicalize().map_err(|e| io_error("read", path, e))?;
                (real, None, None)
            }
        };
        match &commit {
            Some(c) => log.line(format!(
                "source {}: {} at {}",
                source.name,
                describe(source),
                &c[..c.len().min(12)]
            )),
            None => log.line(format!("source {}: {}", source.name, describe(source))),
        }
        pulled.push(Pulled {
            name: source.name.clone(),
            commit,
        });
        layers.push(path::Layer {
            name: source.name.clone(),
            root,
            exclude: vec![home_root.clone()],
            listed,
        });
    }
    let merged = buffer.join("merged");
    let marks_file = buffer.join("merged.blobs");
    let meter = log.meter("sources", crate::log::Unit::Files, None);
    let synced = path::sync_tree_with(
        &layers,
        &merged,
        &tree::load_marks(&marks_file),
        Some(&meter),
    )?;
    meter.finish();
    tree::save_marks(&marks_file, &synced.marks)?;
    let tree = Tree::new(merged, mirrors, synced, marks_file);
    // The build files are read by name: written now, in one pass.
    tree.ensure(&is_build_file)?;
    Ok((pulled, tree))
}

/// Files the build reads by name wherever they are: build and container files,
/// configuration templates, secrets, Dockerfiles.
fn is_build_file(rel: &Path) -> bool {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    matches!(
        &*name,
        "stretch.yml" | "container.yml" | "config.yml" | "secrets.yml" | ".dockerignore"
    ) || name.ends_with(".age")
        || name.starts_with("Dockerfile")
        || name.ends_with(".Dockerfile")
        || name.ends_with(".dockerfile")
}

fn describe(source: &Source) -> String {
    match &source.kind {
        SourceKind::Git { url, git_ref } => {
            format!("git {url} ({})", git_ref.as_deref().unwrap_or("HEAD"))
        }
        SourceKind::Path { path } => format!("path {}", path.display()),
    }
}

/// What identifies a file's content without reading it: size, modification time,
/// inode, mode. Not the change time: linking a source file into a build tree changes
/// it (as make and cargo do, a content change that keeps size and mtime is missed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: i64,
    mtime_ns: i64,
    ino: u64,
    mode: u32,
}

fn stamp(meta: &fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp {
        len: meta.len(),
        mtime: meta.mtime(),
        mtime_ns: meta.mtime_nsec(),
        ino: meta.ino(),
        mode: meta.mode(),
    }
}

/// The stamps of every file under a tree, to tell later whether one changed.
#[derive(Debug, Clone, Default)]
pub struct Stamps {
    /// Files of a folder, by relative path.
    files: Vec<(PathBuf, Stamp)>,
    /// Files of the build tree still in their sources: path in the tree, where it is.
    sources: Vec<(PathBuf, PathBuf, Stamp)>,
}

impl Stamps {
    /// Stamp every file under `root` (not following links, skipping `.git` folders and
    /// `exclude`d folders).
    pub fn take(root: &Path, exclude: &[PathBuf]) -> Result<Stamps> {
        let mut out = Vec::new();
        let walker = walkdir::WalkDir::new(root)
            .min_depth(1)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.file_name() != ".git" && !exclude.iter().any(|x| x == e.path()));
        for entry in walker {
            let entry = entry.map_err(|e| {
                Error::failed("pull", format!("cannot walk `{}`: {e}", root.display()))
            })?;
            let meta = entry.metadata().map_err(|e| {
                Error::failed(
                    "pull",
                    format!("cannot read `{}`: {e}", entry.path().display()),
                )
            })?;
            let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
            out.push((rel.to_path_buf(), stamp(&meta)));
        }
        Ok(Stamps {
            files: out,
            sources: Vec::new(),
        })
    }

    /// Also the files of `tree` that are still in their sources (stamped where they
    /// are, named by their path in the tree).
    pub fn with_sources(mut self, tree: &Tree) -> Stamps {
        for (rel, f) in &tree.sources {
            let s = Stamp {
                len: f.size,
                mtime: f.mtime.0,
                mtime_ns: f.mtime.1,
                ino: f.ino,
                mode: f.mode,
            };
            self.sources.push((rel.clone(), f.path.clone(), s));
        }
        self
    }

    /// Without the folders: the build writes git files into the build tree's folders
    /// (changing their times), while only files can change what was archived.
    pub fn files_only(self) -> Stamps {
        const FOLDER: u32 = 0o040000;
        Stamps {
            files: self
                .files
                .into_iter()
                .filter(|(_, s)| s.mode & 0o170000 != FOLDER)
                .collect(),
            sources: self.sources,
        }
    }

    /// The first file that is not as it was stamped (changed, gone), if any.
    pub fn changed(&self, root: &Path) -> Option<PathBuf> {
        self.files
            .iter()
            .find(|(rel, s)| {
                fs::symlink_metadata(root.join(rel))
                    .map(|m| stamp(&m) != *s)
                    .unwrap_or(true)
            })
            .map(|(rel, _)| rel.clone())
            .or_else(|| {
                self.sources
                    .iter()
                    .find(|(_, path, s)| {
                        fs::symlink_metadata(path)
                            .map(|m| stamp(&m) != *s)
                            .unwrap_or(true)
                    })
                    .map(|(rel, _, _)| rel.clone())
            })
    }

    fn hash_into(&self, h: &mut blake3::Hasher) {
        for (rel, s) in &self.files {
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update(b"\0");
            for n in [
                s.len,
                s.mtime as u64,
                s.mtime_ns as u64,
                s.ino,
                u64::from(s.mode),
            ] {
                h.update(&n.to_le_bytes());
            }
        }
    }
}

/// What a build's inputs look like without reading a file: the system file, the
/// build identity and every file's stamps. `None` when a source is a git source (its
/// ref must be fetched to be known). The same fingerprint as a finished build's means
/// the same release.
pub fn fingerprint(
    system: &System,
    home: &Home,
    identity: Option<&Path>,
) -> Result<Option<String>> {
    let mut h = blake3::Hasher::new();
    h.update(b"stretch-inputs-v1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(b"\0");
    h.update(system.file.as_os_str().as_encoded_bytes());
    h.update(b"\0");
    h.update(&fs::read(&system.file).unwrap_or_default());
    if let Some(id) = identity {
        h.update(b"\0identity\0");
        h.update(blake3::hash(&fs::read(id).unwrap_or_default()).as_bytes());
    }
    // A git source's ref must be fetched to be known: no walk is worth doing then.
    if system
        .sources
        .iter()
        .any(|s| !matches!(s.kind, SourceKind::Path { .. }))
    {
        return Ok(None);
    }
    let home_root = home
        .root
        .canonicalize()
        .unwrap_or_else(|_| home.root.clone());
    for source in &system.sources {
        let SourceKind::Path { path } = &source.kind else {
            return Ok(None);
        };
        h.update(b"\0source\0");
        h.update(source.name.as_bytes());
        h.update(b"\0");
        h.update(path.as_os_str().as_encoded_bytes());
        // A source that cannot be read is the pull's to report.
        let Ok(real) = path.canonicalize() else {
            return Ok(None);
        };
        match Stamps::take(&real, std::slice::from_ref(&home_root)) {
            Ok(stamps) => stamps.hash_into(&mut h),
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(h.finalize().to_hex().to_string()))
}

/// Give `root` files of its own: every file that shares its content with another path
/// (a hard link to a source) is replaced by a copy, so that writing into the tree
/// (build plugins may) cannot change the sources.
pub fn materialize(root: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut copied = 0;
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry.map_err(|e| {
            Error::failed("plugins", format!("cannot walk `{}`: {e}", root.display()))
        })?;
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        let meta = entry.metadata().map_err(|e| {
            Error::failed("plugins", format!("cannot read `{}`: {e}", path.display()))
        })?;
        if meta.nlink() < 2 {
            continue;
        }
        let fail = |e: std::io::Error| {
            Error::failed("plugins", format!("cannot copy `{}`: {e}", path.display()))
        };
        let dir = path.parent().unwrap_or(root);
        let tmp = tempfile::Builder::new()
            .prefix(".materialize")
            .tempfile_in(dir)
            .map_err(fail)?;
        fs::copy(path, tmp.path()).map_err(fail)?;
        tmp.persist(path).map_err(|e| fail(e.error))?;
        copied += 1;
    }
    Ok(copied)
}

pub(crate) fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::failed("pull", format!("cannot {what} `{}`: {e}", path.display()))
}

/// Would a link at `link` (relative to the root) pointing to `target` stay inside?
pub(crate) fn stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside() {
        assert!(stays_inside(Path::new("a/l"), Path::new("b")));
        assert!(stays_inside(Path::new("a/l"), Path::new("../b")));
        assert!(!stays_inside(Path::new("a/l"), Path::new("../../b")));
        assert!(!stays_inside(Path::new("l"), Path::new("/etc/passwd")));
        assert!(!stays_inside(Path::new("l"), Path::new("x/../../y")));
    }

    #[test]
    fn merge_overrides() {
        // What the tree holds at `rel` once brought in: a folder's file, or the path of
        // the source file left where it is.
        fn at(m: &Path, s: &path::Synced, rel: &str) -> String {
            match s.sources.get(Path::new(rel)) {
                Some(f) => fs::read_to_string(&f.path).unwrap(),
                None => fs::read_to_string(m.join(rel)).unwrap(),
            }
        }
        let t = tempfile::tempdir().unwrap();
        let (a, b, m) = (t.path().join("1"), t.path().join("2"), t.path().join("m"));
        for (d, f, c) in [
            (&a, "x.txt", "a"),
            (&a, "d/y.txt", "a"),
            (&a, "e", "file"),
            (&b, "x.txt", "b"),
            (&b, "d", "file"),
            (&b, "e/z.txt", "b"),
        ] {
            let p = d.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, c).unwrap();
        }
        let layers = |roots: &[&PathBuf]| -> Vec<path::Layer> {
            roots
                .iter()
                .map(|r| path::Layer {
                    name: "s".into(),
                    root: r.to_path_buf(),
                    exclude: vec![],
                    listed: None,
                })
                .collect()
        };
        // Synced, then every file brought in: how many were linked.
        let marks = t.path().join("m.blobs");
        let sync = |roots: &[&PathBuf]| -> usize {
            let synced = path::sync_tree(&layers(roots), &m, &Default::default()).unwrap();
            let tree = Tree::new(m.clone(), vec![], synced, marks.clone());
            tree.ensure(&|_| true).unwrap()
        };
        // Left where they are until needed.
        let synced = path::sync_tree(&layers(&[&a, &b]), &m, &Default::default()).unwrap();
        assert_eq!(at(&m, &synced, "x.txt"), "b");
        assert_eq!(at(&m, &synced, "d"), "file");
        assert!(!m.join("x.txt").exists());
        assert_eq!(sync(&[&a, &b]), 3);
        assert_eq!(fs::read_to_string(m.join("x.txt")).unwrap(), "b");
        assert_eq!(fs::read_to_string(m.join("d")).unwrap(), "file");
        assert_eq!(fs::read_to_string(m.join("e/z.txt")).unwrap(), "b");
        assert_eq!(fs::read_to_string(a.join("x.txt")).unwrap(), "a");
        // Again: nothing to do. Then a change in one layer changes only that.
        assert_eq!(sync(&[&a, &b]), 0);
        fs::write(m.join("stray"), "left by a plugin").unwrap();
        fs::remove_file(b.join("x.txt")).unwrap();
        assert_eq!(sync(&[&a, &b]), 1);
        assert_eq!(fs::read_to_string(m.join("x.txt")).unwrap(), "a");
        assert!(!m.join("stray").exists());
        // One layer only: the other's files leave, a file becomes a folder again.
        sync(&[&a]);
        assert_eq!(fs::read_to_string(m.join("d/y.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(m.join("e")).unwrap(), "file");
        assert!(!m.join("e/z.txt").exists());
        // A file replaced in its source (a new inode) is linked anew.
        fs::remove_file(a.join("e")).unwrap();
        fs::write(a.join("e"), "new").unwrap();
        sync(&[&a]);
        assert_eq!(fs::read_to_string(m.join("e")).unwrap(), "new");
    }
}

/// Tests: run git in `dir` (as a committer), its output; panics if git fails.
#[cfg(test)]
pub(crate) fn run_git(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    out.stdout
}

#[cfg(test)]
mod git_tree_tests {
    use std::collections::BTreeMap;
    use std::process::Command;

    use super::*;
    use crate::release::archive::{self, Outside};

    fn sh(dir: &Path, args: &[&str]) {
        run_git(dir, args);
    }

    fn write(root: &Path, rel: &str, data: &[u8]) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    /// Sync `repo`'s HEAD into `merged` as a git layer over a folder layer.
    fn sync(repo: &Path, base: &Path, merged: &Path) -> Tree {
        let out = Command::new("git")
            .args(["-C", repo.to_str().unwrap(), "rev-parse", "HEAD"])
            .output()
            .unwrap();
        let commit = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let listed = git::list(repo, &commit).unwrap();
        let layers = vec![
            path::Layer {
                name: "base".into(),
                root: base.to_path_buf(),
                exclude: vec![],
                listed: None,
            },
            path::Layer {
                name: "git".into(),
                root: repo.to_path_buf(),
                exclude: vec![],
                listed: Some((0, listed)),
            },
        ];
        let marks_file = merged.with_extension("blobs");
        let synced = path::sync_tree(&layers, merged, &tree::load_marks(&marks_file)).unwrap();
        tree::save_marks(&marks_file, &synced.marks).unwrap();
        let t = Tree::new(
            merged.to_path_buf(),
            vec![repo.to_path_buf()],
            synced,
            marks_file,
        );
        t.ensure(&is_build_file).unwrap();
        t
    }

    fn archive_of(t: &Tree, home: &Path) -> archive::Written {
        let outside = Outside {
            mirrors: &t.mirrors,
            git: &t.git,
            sources: &t.sources,
        };
        archive::write_archive(
            &t.root,
            Some(outside),
            &home.join("chunks"),
            &home.join("index"),
            &|_| false,
            Some(&home.join("cache.json")),
        )
        .unwrap()
    }

    /// What the same layers give as plain folders: the reference hash.
    fn checkout_hash(repo: &Path, base: &Path, scratch: &Path) -> String {
        let (clone, merged) = (scratch.join("clone"), scratch.join("m"));
        let _ = fs::remove_dir_all(&clone);
        let _ = fs::remove_dir_all(&merged);
        let out = Command::new("git")
            .args([
                "clone",
                "-q",
                repo.to_str().unwrap(),
                clone.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let layers: Vec<path::Layer> = [base, &clone]
            .iter()
            .map(|r| path::Layer {
                name: "s".into(),
                root: r.to_path_buf(),
                exclude: vec![],
                listed: None,
            })
            .collect();
        let synced = path::sync_tree(&layers, &merged, &BTreeMap::new()).unwrap();
        Tree::new(merged.clone(), vec![], synced, scratch.join("m.blobs"))
            .ensure(&|_| true)
            .unwrap();
        archive::hash_tree(&merged, &|_| false).unwrap().hash
    }

    #[test]
    fn git_files_are_archived_from_their_blobs_as_if_checked_out() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let (repo, base, merged, home) = (
            t.path().join("repo"),
            t.path().join("base"),
            t.path().join("merged"),
            t.path().join("home"),
        );
        sh(
            t.path(),
            &["init", "-q", "-b", "main", repo.to_str().unwrap()],
        );
        write(&repo, "stretch.yml", b"name: web\n");
        write(&repo, "web/Dockerfile", b"FROM scratch\n");
        write(&repo, "a.txt", b"from git\n");
        // Bigger than a chunk piece, so it is read in several parts.
        let big: Vec<u8> = (0..9u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        write(&repo, "data/big.bin", &big);
        write(&repo, "data/run.sh", b"#!/bin/sh\n");
        fs::set_permissions(repo.join("data/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a.txt", repo.join("link")).unwrap();
        sh(&repo, &["add", "-A"]);
        sh(&repo, &["commit", "-qm", "one"]);
        // The folder layer below: overridden by git in one place, alone in another.
        write(&base, "a.txt", b"from the folder\n");
        write(&base, "only-base.txt", b"base\n");

        let tree = sync(&repo, &base, &merged);
        // Build files are written; the rest stays in git.
        assert!(merged.join("stretch.yml").is_file());
        assert!(merged.join("web/Dockerfile").is_file());
        assert!(!merged.join("data/big.bin").exists());
        assert!(
            !merged.join("a.txt").exists(),
            "git's a.txt wins, unwritten"
        );
        assert_eq!(
            fs::read_link(merged.join("link")).unwrap(),
            Path::new("a.txt")
        );
        // A folder's file is left where it is too, until needed.
        assert!(!merged.join("only-base.txt").exists());
        assert!(tree.sources.contains_key(Path::new("only-base.txt")));

        let want = checkout_hash(&repo, &base, &t.path().join("scratch"));
        let first = archive_of(&tree, &home);
        assert_eq!(first.digest.hash, want);
        // Written or not, a git file archives the same; its blob needs no stat.
        assert_eq!(tree.ensure_path(Path::new("data")).unwrap(), 2);
        assert_eq!(fs::read(merged.join("data/big.bin")).unwrap(), big);
        assert!(
            fs::metadata(merged.join("data/run.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o111
                != 0
        );
        let again = archive_of(&tree, &home);
        assert_eq!(again.digest.hash, want);
        assert_eq!(
            again.cached,
            again.chunks - 1,
            "all but the racy folder-layer chunk"
        );

        // A written git file changed in place (a plugin may) is not trusted next time.
        fs::write(merged.join("data/run.sh"), b"changed\n").unwrap();
        let tree = sync(&repo, &base, &merged);
        assert!(!merged.join("data/run.sh").exists());
        assert!(
            merged.join("data/big.bin").is_file(),
            "an unchanged written file stays"
        );
        assert_eq!(archive_of(&tree, &home).digest.hash, want);

        // A new commit: only what changed differs.
        write(&repo, "a.txt", b"changed in git\n");
        sh(&repo, &["commit", "-qam", "two"]);
        let tree = sync(&repo, &base, &merged);
        let want = checkout_hash(&repo, &base, &t.path().join("scratch"));
        assert_eq!(archive_of(&tree, &home).digest.hash, want);

        // Packed, as a fetched mirror is (deltas between the commits' files), into a
        // fresh home: read from the pack, the same archive.
        sh(&repo, &["repack", "-q", "-a", "-d", "-f"]);
        let tree = sync(&repo, &base, &merged);
        assert_eq!(archive_of(&tree, &t.path().join("home2")).digest.hash, want);

        // A mirror with no objects of its own (alternates): git reads them for us.
        let shared = t.path().join("shared.git");
        sh(
            t.path(),
            &[
                "clone",
                "-q",
                "--bare",
                "--shared",
                repo.to_str().unwrap(),
                shared.to_str().unwrap(),
            ],
        );
        assert!(
            !shared
                .join("objects/pack")
                .read_dir()
                .unwrap()
                .any(|_| true)
        );
        let tree = sync(&shared, &base, &t.path().join("merged3"));
        assert_eq!(tree.git[Path::new("data/big.bin")].size, big.len() as u64);
        assert_eq!(archive_of(&tree, &t.path().join("home3")).digest.hash, want);
    }
}

#[cfg(test)]
mod hostile_git_tests {

    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        String::from_utf8(run_git(dir, args))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A commit can hold what a checkout would refuse or regret: a symlink out of the
    /// tree. Listing it is fine; layering it into the build tree fails, and nothing
    /// is written through it.
    #[test]
    fn a_symlink_out_of_the_tree_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("repo");
        fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        fs::write(repo.join("a.txt"), "a").unwrap();
        std::os::unix::fs::symlink("../../../etc", repo.join("out")).unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-qm", "one"]);
        let commit = git(&repo, &["rev-parse", "HEAD"]);
        let listed = git::list(&repo, &commit).unwrap();
        let layer = path::Layer {
            name: "g".into(),
            root: repo.clone(),
            exclude: vec![],
            listed: Some((0, listed)),
        };
        let merged = t.path().join("merged");
        let err = path::sync_tree(&[layer], &merged, &Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("escapes its source"), "{err}");
        assert!(!merged.join("out").exists());
    }
}
