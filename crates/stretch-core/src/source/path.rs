//! `path:` sources: a plain directory copied into its buffer.

use std::fs;
use std::path::{Path, PathBuf};

use super::io_error;
use crate::{Error, Result};

/// Copy the tree at `from` into `to`, skipping `.git` folders and the `exclude`d
/// folders (the home folder, when it lies inside the source).
pub fn copy(from: &Path, to: &Path, exclude: &[PathBuf]) -> Result<()> {
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
            // fs::copy keeps the mode (the exec bit matters) and uses copy_file_range.
            fs::copy(entry.path(), &dest).map_err(|e| io_error("copy", entry.path(), e))?;
        } else {
            return Err(Error::invalid(format!(
                "`{}` is not a file, folder or symlink",
                rel.display()
            )));
        }
    }
    Ok(())
}
