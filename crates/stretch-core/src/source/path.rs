//! Layering the sources into the kept build tree: folders and symlinks made, files
//! listed where they are (a `path:` source's file, a git blob) for [`super::Tree`] to
//! bring in when needed. Files it links share their content with the sources, so
//! nothing may write into the tree in place: the build replaces files (write to a
//! temp file, rename), and materializes the tree before build plugins, which may write
//! anywhere.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::git::Listed;
use super::io_error;
use super::tree::{GitFile, Marks, SourceFile};
use crate::log::Meter;
use crate::{Error, Result};

/// One layer of the build tree: a folder (a `path:` source where it is) or a git
/// commit's listing, and what to leave out of it.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Names errors (`source `NAME``).
    pub name: String,
    pub root: PathBuf,
    /// Folders left out (the home folder, when it lies inside the source).
    pub exclude: Vec<PathBuf>,
    /// A git source: its mirror's index and its commit's entries, walked instead of
    /// `root`.
    pub listed: Option<(usize, Vec<(PathBuf, Listed)>)>,
}

/// The files [`sync_tree`] left out of the folder, to be brought in when needed.
#[derive(Debug, Default)]
pub struct Synced {
    /// Files of `path:` sources not linked in (those linked by an earlier build stay).
    pub sources: BTreeMap<PathBuf, SourceFile>,
    /// Every file whose content is a git blob.
    pub git: BTreeMap<PathBuf, GitFile>,
    /// Those of them already written in the folder, unchanged since.
    pub marks: Marks,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

/// What the build tree must hold at a path: which layer provides it, and how to tell
/// that what is there already is it (a file's inode, a symlink's target).
#[derive(Debug)]
struct Want {
    layer: usize,
    kind: Kind,
    ino: u64,
    target: Option<PathBuf>,
    /// A git file: written only when needed (see [`super::Tree`]).
    git: Option<GitFile>,
    present: bool,
}

/// Want `w` at `rel`: a file or symlink replaces an earlier layer's folder and all
/// under it (paths order by component, so those follow it directly); a folder
/// replaces a file.
fn put(want: &mut BTreeMap<PathBuf, Want>, rel: PathBuf, w: Want) {
    if w.kind != Kind::Dir && want.get(&rel).is_some_and(|o| o.kind == Kind::Dir) {
        let under: Vec<PathBuf> = want
            .range::<Path, _>((
                std::ops::Bound::Excluded(rel.as_path()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(&rel))
            .map(|(k, _)| k.clone())
            .collect();
        for k in under {
            want.remove(&k);
        }
    }
    want.insert(rel, w);
}

/// The wants of a git layer: its entries, and the folders they imply.
fn put_listed(
    want: &mut BTreeMap<PathBuf, Want>,
    layer: usize,
    mirror: usize,
    listed: &[(PathBuf, Listed)],
) -> Result<()> {
    let dir = |layer| Want {
        layer,
        kind: Kind::Dir,
        ino: 0,
        target: None,
        git: None,
        present: false,
    };
    for (rel, entry) in listed {
        let parents: Vec<&Path> = rel
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .collect();
        for p in parents.into_iter().rev() {
            if !want.get(p).is_some_and(|w| w.kind == Kind::Dir) {
                put(want, p.to_path_buf(), dir(layer));
            }
        }
        let w = match entry {
            Listed::Dir => dir(layer),
            Listed::Symlink(target) => {
                if !super::stays_inside(rel, target) {
                    return Err(Error::invalid_with_help(
                        format!(
                            "symlink `{}` -> `{}` escapes its source",
                            rel.display(),
                            target.display()
                        ),
                        "symlinks must point inside the source, with a relative target",
                    ));
                }
                Want {
                    kind: Kind::Symlink,
                    target: Some(target.clone()),
                    ..dir(layer)
                }
            }
            Listed::File { oid, size, exec } => Want {
                kind: Kind::File,
                git: Some(GitFile {
                    mirror,
                    oid: oid.clone(),
                    size: *size,
                    exec: *exec,
                }),
                ..dir(layer)
            },
        };
        put(want, rel.clone(), w);
    }
    Ok(())
}

/// Make `to` the layers merged in order (later layers replace earlier files; a file
/// replaces a folder and all under it, and the other way round): folders created,
/// symlinks recreated, files left where they are (see [`super::Tree`]).
/// `to` is kept from the last build and only changed where it differs, so an
/// unchanged source costs a walk. `.git` folders are left out; a symlink that points
/// outside its layer fails. Files already linked stay; git files `marks` says are
/// there, unchanged, stay; other files are removed.
pub fn sync_tree(layers: &[Layer], to: &Path, marks: &Marks) -> Result<Synced> {
    sync_tree_with(layers, to, marks, None)
}

/// [`sync_tree`], counting on `meter` the entries of the sources read, then the
/// entries of the tree brought in line (of all it holds).
pub fn sync_tree_with(
    layers: &[Layer],
    to: &Path,
    marks: &Marks,
    meter: Option<&Meter>,
) -> Result<Synced> {
    use walkdir::DirEntryExt;
    let mut want: BTreeMap<PathBuf, Want> = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        let context = |e: Error| e.context(&format!("source `{}`", layer.name));
        if let Some((mirror, listed)) = &layer.listed {
            put_listed(&mut want, i, *mirror, listed).map_err(context)?;
            if let Some(m) = meter {
                m.add(listed.len() as u64);
            }
            continue;
        }
        let walker = walkdir::WalkDir::new(&layer.root)
            .min_depth(1)
            .follow_links(false)
            .into_iter()
            .filter_entry(|e| {
                e.file_name() != ".git" && !layer.exclude.iter().any(|x| x == e.path())
            });
        for entry in walker {
            let entry = entry.map_err(|e| {
                Error::failed(
                    "pull",
                    format!("cannot walk `{}`: {e}", layer.root.display()),
                )
            })?;
            let rel = entry
                .path()
                .strip_prefix(&layer.root)
                .unwrap_or(entry.path())
                .to_path_buf();
            if let Some(m) = meter {
                m.add(1);
            }
            let ft = entry.file_type();
            let (kind, target) = if ft.is_dir() {
                (Kind::Dir, None)
            } else if ft.is_file() {
                (Kind::File, None)
            } else if ft.is_symlink() {
                let target = fs::read_link(entry.path())
                    .map_err(|e| io_error("read link", entry.path(), e))?;
                if !super::stays_inside(&rel, &target) {
                    return Err(context(Error::invalid_with_help(
                        format!(
                            "symlink `{}` -> `{}` escapes its source",
                            rel.display(),
                            target.display()
                        ),
                        "symlinks must point inside the source, with a relative target",
                    )));
                }
                (Kind::Symlink, Some(target))
            } else {
                return Err(context(Error::invalid(format!(
                    "`{}` is not a file, folder or symlink",
                    rel.display()
                ))));
            };
            put(
                &mut want,
                rel,
                Want {
                    layer: i,
                    kind,
                    ino: entry.ino(),
                    target,
                    git: None,
                    present: false,
                },
            );
        }
    }

    // The sources are read: from now on the meter counts the tree's entries.
    if let Some(m) = meter {
        m.set_total(want.len() as u64);
        m.set(0);
    }
    // Remove from `to` what is not as wanted; note what is.
    fs::create_dir_all(to).map_err(|e| io_error("create", to, e))?;
    let mut walker = walkdir::WalkDir::new(to)
        .min_depth(1)
        .follow_links(false)
        .into_iter();
    while let Some(entry) = walker.next() {
        let entry = entry
            .map_err(|e| Error::failed("pull", format!("cannot walk `{}`: {e}", to.display())))?;
        let rel = entry.path().strip_prefix(to).unwrap_or(entry.path());
        let ft = entry.file_type();
        if let Some(m) = meter {
            m.add(1);
        }
        let keep = match want.get_mut(rel) {
            Some(w) if w.kind == Kind::Dir && ft.is_dir() => {
                w.present = true;
                true
            }
            Some(w) if w.kind == Kind::File && ft.is_file() => {
                w.present = match &w.git {
                    Some(g) => marks
                        .get(rel)
                        .is_some_and(|m| entry.metadata().is_ok_and(|meta| m.holds(&g.oid, &meta))),
                    None => w.ino == entry.ino(),
                };
                w.present
            }
            Some(w)
                if w.kind == Kind::Symlink
                    && ft.is_symlink()
                    && fs::read_link(entry.path()).ok() == w.target =>
            {
                w.present = true;
                true
            }
            _ => false,
        };
        if keep {
            continue;
        }
        if ft.is_dir() {
            fs::remove_dir_all(entry.path()).map_err(|e| io_error("clean", entry.path(), e))?;
            walker.skip_current_dir();
        } else {
            fs::remove_file(entry.path()).map_err(|e| io_error("clean", entry.path(), e))?;
        }
    }

    // Then bring in what is missing, folders before what they hold; files stay where
    // they are, listed.
    let mut synced = Synced::default();
    for (rel, w) in &want {
        if !w.present
            && let Some(m) = meter
        {
            m.add(1);
        }
        if let Some(g) = &w.git {
            if w.present
                && let Some(m) = marks.get(rel)
            {
                synced.marks.insert(rel.clone(), m.clone());
            }
            synced.git.insert(rel.clone(), g.clone());
            continue;
        }
        if w.present {
            continue;
        }
        let dest = to.join(rel);
        let src = layers[w.layer].root.join(rel);
        match w.kind {
            Kind::Dir => fs::create_dir(&dest).map_err(|e| io_error("create", &dest, e))?,
            Kind::Symlink => {
                let target = w.target.as_deref().unwrap_or(Path::new(""));
                std::os::unix::fs::symlink(target, &dest)
                    .map_err(|e| io_error("link", &dest, e))?;
            }
            Kind::File => {
                let meta = fs::symlink_metadata(&src).map_err(|e| io_error("read", &src, e))?;
                if !meta.is_file() {
                    return Err(Error::failed(
                        "pull",
                        format!("`{}` changed while the sources were read", src.display()),
                    ));
                }
                synced
                    .sources
                    .insert(rel.clone(), SourceFile::of(src, &meta));
            }
        }
    }
    Ok(synced)
}
