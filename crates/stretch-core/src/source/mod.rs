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
            path::copy(path, dir, std::slice::from_ref(&home.root))?;
            Ok(None)
        }
    }
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
