//! `path:` sources: a plain directory brought into its buffer by hard links (a copy
//! where a link cannot be made: another filesystem, another owner). Linked files share
//! their content with the sources, so nothing may write into a buffer in place: the
//! build replaces files (write to a temp file, rename), and materializes the tree
//! before build plugins, which may write anywhere.

use std::fs;
use std::path::{Path, PathBuf};

use super::io_error;
use crate::{Error, Result};

/// How a tree was brought in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Brought {
    pub linked: u64,
    pub copied: u64,
}

/// Bring the tree at `from` into `to` (files hard-linked where possible, else copied),
/// skipping `.git` folders and the `exclude`d folders (the home folder, when it lies
/// inside the source).
pub fn link(from: &Path, to: &Path, exclude: &[PathBuf]) -> Result<Brought> {
    let mut brought = Brought::default();
    let mut links = true;
    if !from.is_dir() {
        return Err(Error::invalid(format!(
            "source folder `{}` does not exist",
            from.display()
        )));
    }
    let exclude: Vec<PathBuf> = exclude
        .iter()
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .collect();
    let real_from = from.canonicalize().map_err(|e| io_error("read", from, e))?;
    fs::create_dir_all(to).map_err(|e| io_error("create", to, e))?;
    let walker = walkdir::WalkDir::new(&real_from)
        .min_depth(1)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git" && !exclude.iter().any(|x| x == e.path()));
    for entry in walker {
        let entry = entry
            .map_err(|e| Error::failed("pull", format!("cannot walk `{}`: {e}", from.display())))?;
        let rel = entry
            .path()
            .strip_prefix(&real_from)
            .unwrap_or(entry.path());
        let dest = to.join(rel);
        let ft = entry.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&dest).map_err(|e| io_error("create", &dest, e))?;
        } else if ft.is_symlink() {
            let target =
                fs::read_link(entry.path()).map_err(|e| io_error("read link", entry.path(), e))?;
            std::os::unix::fs::symlink(&target, &dest).map_err(|e| io_error("link", &dest, e))?;
        } else if ft.is_file() {
            if links && fs::hard_link(entry.path(), &dest).is_ok() {
                brought.linked += 1;
                continue;
            }
            // Once a link fails (another filesystem, protected links), the rest copy.
            links = false;
            // fs::copy keeps the mode (the exec bit matters) and uses copy_file_range.
            fs::copy(entry.path(), &dest).map_err(|e| io_error("copy", entry.path(), e))?;
            brought.copied += 1;
        } else {
            return Err(Error::invalid(format!(
                "`{}` is not a file, folder or symlink",
                rel.display()
            )));
        }
    }
    Ok(brought)
}
