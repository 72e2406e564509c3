//! The build tree: the merged folder plus the files that are not in it yet — files of
//! `path:` sources (linked in when needed) and of git sources (still objects in a
//! mirror, written out when needed). Something needs files as files for build files,
//! image contexts and build plugins; the archive reads the others where they are, so
//! a big tree is never copied, linked or checked out for nothing.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::git::Blobs;
use super::io_error;
use crate::{Error, Result};

/// A file of the build tree whose content is a git blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitFile {
    /// Index into [`Tree::mirrors`].
    pub mirror: usize,
    pub oid: String,
    pub size: u64,
    pub exec: bool,
}

/// A file of a `path:` source, not linked into the folder yet: where it is and its
/// stat when the sources were walked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    pub size: u64,
    pub mode: u32,
    pub mtime: (i64, i64),
    pub ino: u64,
    pub dev: u64,
}

impl SourceFile {
    pub fn of(path: PathBuf, meta: &fs::Metadata) -> SourceFile {
        SourceFile {
            path,
            size: meta.len(),
            mode: meta.mode(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// A git file written into the folder: its blob and the stat it was left with, so
/// that the next build keeps it only if nothing changed it since.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    pub oid: String,
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i128,
    pub mode: u32,
}

impl Mark {
    fn of(oid: &str, meta: &fs::Metadata) -> Mark {
        Mark {
            oid: oid.to_string(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            mode: meta.mode(),
        }
    }

    /// Is the file with `meta` still the blob `oid` as written?
    pub fn holds(&self, oid: &str, meta: &fs::Metadata) -> bool {
        *self == Mark::of(oid, meta)
    }
}

/// The written git files of a build tree, kept beside it (`merged.blobs`).
pub type Marks = BTreeMap<PathBuf, Mark>;

pub fn load_marks(path: &Path) -> Marks {
    fs::read(path)
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default()
}

pub(super) fn save_marks(path: &Path, marks: &Marks) -> Result<()> {
    let raw = serde_json::to_vec(marks).map_err(|e| Error::failed("pull", e.to_string()))?;
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, raw).map_err(|e| io_error("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_error("write", path, e))
}

/// The build tree of one build.
#[derive(Debug)]
pub struct Tree {
    /// The merged folder: every folder and symlink, and the files brought in so far
    /// (linked from `path:` sources, written from git).
    pub root: PathBuf,
    /// The git mirrors the files' blobs are in.
    pub mirrors: Vec<PathBuf>,
    /// Every file whose content is a git blob, written or not, by relative path.
    pub git: BTreeMap<PathBuf, GitFile>,
    /// Files of `path:` sources not linked in when the sources were synced.
    pub sources: BTreeMap<PathBuf, SourceFile>,
    marks: Mutex<Marks>,
    marks_file: PathBuf,
}

impl Tree {
    pub fn new(
        root: PathBuf,
        mirrors: Vec<PathBuf>,
        synced: super::path::Synced,
        marks_file: PathBuf,
    ) -> Tree {
        Tree {
            root,
            mirrors,
            git: synced.git,
            sources: synced.sources,
            marks: Mutex::new(synced.marks),
            marks_file,
        }
    }

    /// Bring the files `wanted` picks (by relative path) into the folder, if not there
    /// yet: `path:` files linked (copied where a link cannot be made), git files
    /// written. Returns how many were brought.
    pub fn ensure(&self, wanted: &dyn Fn(&Path) -> bool) -> Result<usize> {
        let mut marks = self
            .marks
            .lock()
            .map_err(|_| Error::failed("pull", "the build tree's marks are poisoned"))?;
        let mut linked = 0;
        for (rel, f) in self.sources.iter().filter(|(rel, _)| wanted(rel)) {
            let dest = self.root.join(rel);
            if fs::symlink_metadata(&dest).is_ok_and(|m| m.ino() == f.ino && m.dev() == f.dev) {
                continue;
            }
            if fs::hard_link(&f.path, &dest).is_err() {
                // Another file system, protected links: a copy (it keeps the mode).
                let _ = fs::remove_file(&dest);
                fs::copy(&f.path, &dest).map_err(|e| io_error("copy", &f.path, e))?;
            }
            linked += 1;
        }
        let todo: Vec<(&PathBuf, &GitFile)> = self
            .git
            .iter()
            .filter(|(rel, _)| !marks.contains_key(*rel) && wanted(rel))
            .collect();
        if todo.is_empty() {
            return Ok(linked);
        }
        let result = self.write(&todo, &mut marks);
        // Kept even after a failure: what was written is marked.
        save_marks(&self.marks_file, &marks)?;
        result.map(|()| linked + todo.len())
    }

    /// [`ensure`](Tree::ensure) one file.
    pub fn ensure_file(&self, rel: &Path) -> Result<usize> {
        if !self.git.contains_key(rel) && !self.sources.contains_key(rel) {
            return Ok(0);
        }
        self.ensure(&|p| p == rel)
    }

    /// [`ensure`](Tree::ensure) one path (a file or a folder and all under it; `""`
    /// is the whole tree).
    pub fn ensure_path(&self, rel: &Path) -> Result<usize> {
        self.ensure(&|p| p.starts_with(rel))
    }

    fn write(&self, todo: &[(&PathBuf, &GitFile)], marks: &mut Marks) -> Result<()> {
        let real_root = self
            .root
            .canonicalize()
            .map_err(|e| io_error("read", &self.root, e))?;
        for (m, mirror) in self.mirrors.iter().enumerate() {
            let mine: Vec<_> = todo.iter().filter(|(_, g)| g.mirror == m).collect();
            if mine.is_empty() {
                continue;
            }
            let fail = |e: std::io::Error| Error::failed("pull", format!("git cat-file: {e}"));
            let mut blobs = Blobs::open(mirror, mine.iter().map(|(_, g)| g.oid.clone()).collect())
                .map_err(fail)?;
            let mut checked: Option<PathBuf> = None;
            let mut buf = Vec::new();
            for (rel, g) in mine {
                let path = self.root.join(rel);
                let parent = path.parent().unwrap_or(&self.root);
                // Folders are made by the sync; never write through a symlink.
                if checked.as_deref() != Some(parent) {
                    let real = parent
                        .canonicalize()
                        .map_err(|e| io_error("read", parent, e))?;
                    if !real.starts_with(&real_root) {
                        return Err(Error::invalid(format!(
                            "`{}` is reached through a symlink",
                            rel.display()
                        )));
                    }
                    checked = Some(parent.to_path_buf());
                }
                let size = blobs.start(&g.oid).map_err(fail)?;
                let _ = fs::remove_file(&path);
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if g.exec { 0o755 } else { 0o644 })
                    .open(&path)
                    .map_err(|e| io_error("write", &path, e))?;
                let mut left = size;
                while left > 0 {
                    let n = left.min(1 << 20);
                    buf.clear();
                    blobs.read(n, &mut buf).map_err(fail)?;
                    file.write_all(&buf)
                        .map_err(|e| io_error("write", &path, e))?;
                    left -= n;
                }
                blobs.end().map_err(fail)?;
                let meta = file.metadata().map_err(|e| io_error("read", &path, e))?;
                marks.insert((*rel).clone(), Mark::of(&g.oid, &meta));
            }
        }
        Ok(())
    }
}
