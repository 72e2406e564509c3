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

/// Pull every source into `buffer/N/` and merge them into `buffer/merged/`.
pub fn pull_all(system: &System, home: &Home, log: &Log) -> Result<(Vec<Pulled>, PathBuf)> {
    let buffer = home.buffer();
    if buffer.exists() {
        fs::remove_dir_all(&buffer).map_err(|e| io_error("clean", &buffer, e))?;
    }
    fs::create_dir_all(&buffer).map_err(|e| io_error("create", &buffer, e))?;
    let mut pulled = Vec::new();
    let mut dirs = Vec::new();
    for (i, source) in system.sources.iter().enumerate() {
        let dir = buffer.join((i + 1).to_string());
        let commit = pull_one(source, home, &dir, log)
            .map_err(|e| e.context(&format!("source `{}`", source.name)))?;
        check_symlinks(&dir).map_err(|e| e.context(&format!("source `{}`", source.name)))?;
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
        dirs.push(dir);
    }
    let merged = buffer.join("merged");
    fs::create_dir_all(&merged).map_err(|e| io_error("create", &merged, e))?;
    for d in &dirs {
        merge_into(d, &merged)?;
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

fn pull_one(source: &Source, home: &Home, dir: &Path, log: &Log) -> Result<Option<String>> {
    match &source.kind {
        SourceKind::Git { url, git_ref } => {
            git::pull(url, git_ref.as_deref(), &home.git(), dir, log).map(Some)
        }
        SourceKind::Path { path } => {
            let b = path::link(path, dir, std::slice::from_ref(&home.root))?;
            if b.copied > 0 {
                log.line(format!(
                    "source {}: {} file(s) copied (no hard link possible), {} linked",
                    source.name, b.copied, b.linked
                ));
            }
            Ok(None)
        }
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

/// Fail if a symlink under `root` points outside it (absolute, or `..` above the root).
pub fn check_symlinks(root: &Path) -> Result<()> {
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry
            .map_err(|e| Error::failed("pull", format!("cannot walk `{}`: {e}", root.display())))?;
        if !entry.path_is_symlink() {
            continue;
        }
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let target =
            fs::read_link(entry.path()).map_err(|e| io_error("read link", entry.path(), e))?;
        if !stays_inside(rel, &target) {
            return Err(Error::invalid_with_help(
                format!(
                    "symlink `{}` -> `{}` escapes its source",
                    rel.display(),
                    target.display()
                ),
                "symlinks must point inside the source, with a relative target",
            ));
        }
    }
    Ok(())
}

/// Would a link at `link` (relative to the root) pointing to `target` stay inside?
fn stays_inside(link: &Path, target: &Path) -> bool {
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

/// Hard-link every file of `from` into `to`, replacing what is there.
fn merge_into(from: &Path, to: &Path) -> Result<()> {
    for entry in walkdir::WalkDir::new(from)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry
            .map_err(|e| Error::failed("pull", format!("cannot walk `{}`: {e}", from.display())))?;
        let rel = entry.path().strip_prefix(from).unwrap_or(entry.path());
        let dest = to.join(rel);
        let ft = entry.file_type();
        let existing = fs::symlink_metadata(&dest).ok();
        if ft.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    fs::remove_file(&dest).map_err(|e| io_error("replace", &dest, e))?;
                    fs::create_dir(&dest).map_err(|e| io_error("create", &dest, e))?;
                }
                None => fs::create_dir(&dest).map_err(|e| io_error("create", &dest, e))?,
            }
            continue;
        }
        match existing {
            Some(m) if m.is_dir() => {
                fs::remove_dir_all(&dest).map_err(|e| io_error("replace", &dest, e))?
            }
            Some(_) => fs::remove_file(&dest).map_err(|e| io_error("replace", &dest, e))?,
            None => {}
        }
        if ft.is_symlink() {
            let target =
                fs::read_link(entry.path()).map_err(|e| io_error("read link", entry.path(), e))?;
            std::os::unix::fs::symlink(&target, &dest).map_err(|e| io_error("link", &dest, e))?;
        } else {
            fs::hard_link(entry.path(), &dest).map_err(|e| io_error("link", &dest, e))?;
        }
    }
    Ok(())
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
            (&b, "x.txt", "b"),
            (&b, "d", "file"),
        ] {
            let p = d.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, c).unwrap();
        }
        fs::create_dir_all(&m).unwrap();
        merge_into(&a, &m).unwrap();
        merge_into(&b, &m).unwrap();
        assert_eq!(fs::read_to_string(m.join("x.txt")).unwrap(), "b");
        assert_eq!(fs::read_to_string(m.join("d")).unwrap(), "file");
        assert_eq!(fs::read_to_string(a.join("x.txt")).unwrap(), "a");
    }
}
