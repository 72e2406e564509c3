//! Sources: each is pulled into its own buffer (`buffer/N/`), then the buffers are
//! merged in order into one tree, later sources overwriting earlier files.

pub mod git;
pub mod path;

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
/// `path:` source is read where it is, a git source's commit is unpacked into
/// `buffer/N/` first. The merged tree stays from build to build and is only changed
/// where the sources changed (see [`path::sync_tree`]).
pub fn pull_all(system: &System, home: &Home, log: &Log) -> Result<(Vec<Pulled>, PathBuf)> {
    let buffer = home.buffer();
    fs::create_dir_all(&buffer).map_err(|e| io_error("create", &buffer, e))?;
    // Kept: the merged tree, and each git source's tree with its listing (`N`,
    // `N.tree`), updated in place; anything else is left from another configuration.
    let kept: Vec<String> = system
        .sources
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.kind, SourceKind::Git { .. }))
        .flat_map(|(i, _)| [(i + 1).to_string(), format!("{}.tree", i + 1)])
        .chain(["merged".to_string()])
        .collect();
    for entry in fs::read_dir(&buffer).map_err(|e| io_error("read", &buffer, e))? {
        let entry = entry.map_err(|e| io_error("read", &buffer, e))?;
        if kept.iter().any(|k| entry.file_name() == k.as_str()) {
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
    for (i, source) in system.sources.iter().enumerate() {
        let context = |e: Error| e.context(&format!("source `{}`", source.name));
        let (root, commit) = match &source.kind {
            SourceKind::Git { url, git_ref } => {
                let dir = buffer.join((i + 1).to_string());
                let commit =
                    git::pull(url, git_ref.as_deref(), &home.git(), &dir, log).map_err(context)?;
                (dir, Some(commit))
            }
            SourceKind::Path { path } => {
                if !path.is_dir() {
                    return Err(context(Error::invalid(format!(
                        "source folder `{}` does not exist",
                        path.display()
                    ))));
                }
                let real = path.canonicalize().map_err(|e| io_error("read", path, e))?;
                (real, None)
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
        });
    }
    let merged = buffer.join("merged");
    let brought = path::sync_tree(&layers, &merged)?;
    if brought.copied > 0 {
        log.line(format!(
            "{} file(s) copied (no hard link possible), {} linked",
            brought.copied, brought.linked
        ));
    }
    Ok((pulled, merged))
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
pub struct Stamps(Vec<(PathBuf, Stamp)>);

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
        Ok(Stamps(out))
    }

    /// The first file that is not as it was stamped (changed, gone), if any.
    pub fn changed(&self, root: &Path) -> Option<PathBuf> {
        self.0
            .iter()
            .find(|(rel, s)| {
                fs::symlink_metadata(root.join(rel))
                    .map(|m| stamp(&m) != *s)
                    .unwrap_or(true)
            })
            .map(|(rel, _)| rel.clone())
    }

    fn hash_into(&self, h: &mut blake3::Hasher) {
        for (rel, s) in &self.0 {
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
                })
                .collect()
        };
        let brought = path::sync_tree(&layers(&[&a, &b]), &m).unwrap();
        assert_eq!(brought.linked, 3);
        assert_eq!(fs::read_to_string(m.join("x.txt")).unwrap(), "b");
        assert_eq!(fs::read_to_string(m.join("d")).unwrap(), "file");
        assert_eq!(fs::read_to_string(m.join("e/z.txt")).unwrap(), "b");
        assert_eq!(fs::read_to_string(a.join("x.txt")).unwrap(), "a");
        // Again: nothing to do. Then a change in one layer changes only that.
        assert_eq!(path::sync_tree(&layers(&[&a, &b]), &m).unwrap().linked, 0);
        fs::write(m.join("stray"), "left by a plugin").unwrap();
        fs::remove_file(b.join("x.txt")).unwrap();
        let brought = path::sync_tree(&layers(&[&a, &b]), &m).unwrap();
        assert_eq!(brought.linked, 1);
        assert_eq!(fs::read_to_string(m.join("x.txt")).unwrap(), "a");
        assert!(!m.join("stray").exists());
        // One layer only: the other's files leave, a file becomes a folder again.
        path::sync_tree(&layers(&[&a]), &m).unwrap();
        assert_eq!(fs::read_to_string(m.join("d/y.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(m.join("e")).unwrap(), "file");
        assert!(!m.join("e/z.txt").exists());
        // A file replaced in its source (a new inode) is linked anew.
        fs::remove_file(a.join("e")).unwrap();
        fs::write(a.join("e"), "new").unwrap();
        path::sync_tree(&layers(&[&a]), &m).unwrap();
        assert_eq!(fs::read_to_string(m.join("e")).unwrap(), "new");
    }
}
