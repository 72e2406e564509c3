//! The home folder (`.stretch/` beside the system file by default): release store,
//! archives, git mirrors and build buffers. Mode 0700; files holding secrets are 0600.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Home {
    pub root: PathBuf,
}

impl Home {
    /// Open (creating it if needed) the home folder, tightening its mode to 0700.
    pub fn open(root: &Path) -> Result<Home> {
        fs::create_dir_all(root).map_err(|e| {
            Error::invalid(format!(
                "cannot create home folder `{}`: {e}",
                root.display()
            ))
        })?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::invalid(format!("cannot set mode of `{}`: {e}", root.display())))?;
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        let home = Home { root };
        for d in [home.releases(), home.git()] {
            fs::create_dir_all(&d)
                .map_err(|e| Error::invalid(format!("cannot create `{}`: {e}", d.display())))?;
        }
        Ok(home)
    }

    pub fn db(&self) -> PathBuf {
        self.root.join("stretch.db")
    }
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }
    /// The index of a release's archive (its chunks are in [`Home::chunks`]).
    pub fn archive(&self, id: &str) -> PathBuf {
        self.releases().join(format!("{id}.index"))
    }
    /// A release archive of the first format: one `.tar.zst`.
    pub fn legacy_archive(&self, id: &str) -> PathBuf {
        self.releases().join(format!("{id}.tar.zst"))
    }
    /// The release's archive as this home holds it, in either format, if it does.
    pub fn stored_archive(&self, id: &str) -> Option<PathBuf> {
        [self.archive(id), self.legacy_archive(id)]
            .into_iter()
            .find(|p| p.exists())
    }
    /// The chunk store every archive of this home shares.
    pub fn chunks(&self) -> PathBuf {
        self.root.join("chunks")
    }
    /// The stat cache of the last build's archive (see `release::archive`).
    pub fn chunk_cache(&self) -> PathBuf {
        self.chunks().join("stat-cache.json")
    }
    pub fn release_config(&self, id: &str) -> PathBuf {
        self.releases().join(format!("{id}.json"))
    }
    /// The release configuration sealed to the system's `release_recipients`.
    pub fn sealed_config(&self, id: &str) -> PathBuf {
        self.releases().join(format!("{id}.config.age"))
    }
    pub fn git(&self) -> PathBuf {
        self.root.join("git")
    }
    pub fn buffer(&self) -> PathBuf {
        self.root.join("buffer")
    }

    /// Take an exclusive lock named `name` (e.g. `build`), waiting for it when `wait`.
    /// The lock is released when the returned file is dropped, even if the process dies.
    pub fn lock(&self, name: &str, wait: bool) -> Result<Option<File>> {
        let path = self.root.join(format!("{name}.lock"));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::invalid(format!("cannot open lock `{}`: {e}", path.display())))?;
        if wait {
            f.lock()
                .map_err(|e| Error::invalid(format!("cannot lock `{}`: {e}", path.display())))?;
            return Ok(Some(f));
        }
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(Error::invalid(format!(
                "cannot lock `{}`: {e}",
                path.display()
            ))),
        }
    }
}

/// Write `data` to `path` atomically with mode 0600 (temp file, fsync, rename).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
