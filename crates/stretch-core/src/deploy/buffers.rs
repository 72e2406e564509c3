//! Release buffers of an environment (`home/environments/ENV/`): `new/` holds the
//! release being deployed, `existing/` the one running, `previous/` the one before
//! (kept so post-deploy plugins of a rollback can read the newer release's files).
//! Each buffer is the release archive extracted (verified against its hash); while a
//! run uses it, also the decrypted `*.age` files (0600), which [`Buffers::scrub`]
//! removes when the run ends. A missing or damaged buffer is re-extracted.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::home::{Home, write_private};
use crate::log::Log;
use crate::release::archive;
use crate::release::config::ReleaseConfig;
use crate::store::ReleaseRecord;
use crate::{Error, Result};

pub struct Buffers {
    dir: PathBuf,
    /// Decrypted files never written here: groups' TLS keys (read from memory).
    withheld: std::collections::BTreeSet<String>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::failed(
        "pull release",
        format!("cannot {what} `{}`: {e}", path.display()),
    )
}

impl Buffers {
    pub fn new(home: &Home, env: &str) -> Buffers {
        Buffers {
            dir: super::environment_dir(home, env),
            withheld: Default::default(),
        }
    }

    /// Keep these decrypted files out of the buffers.
    pub fn withholding(mut self, paths: std::collections::BTreeSet<String>) -> Buffers {
        self.withheld = paths;
        self
    }

    pub fn new_dir(&self) -> PathBuf {
        self.dir.join("new")
    }
    pub fn existing_dir(&self) -> PathBuf {
        self.dir.join("existing")
    }
    pub fn previous_dir(&self) -> PathBuf {
        self.dir.join("previous")
    }
    fn marker(&self, buffer: &str) -> PathBuf {
        self.dir.join(format!("{buffer}.id"))
    }

    /// Extract `release` into `dir` (replacing it), verified, with its decrypted files.
    fn extract(
        &self,
        home: &Home,
        release: &ReleaseRecord,
        cfg: &ReleaseConfig,
        buffer: &str,
    ) -> Result<()> {
        let dir = self.dir.join(buffer);
        fs::create_dir_all(&self.dir).map_err(|e| io("create", &self.dir, e))?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| io("clean", &dir, e))?;
        }
        let _ = fs::remove_file(self.marker(buffer));
        let archive = home
            .stored_archive(&release.id)
            .unwrap_or_else(|| home.archive(&release.id));
        archive::extract_archive(&archive, &home.chunks(), &dir, Some(&release.archive_hash))
            .map_err(|e| e.context(&format!("release {}", release.id)))?;
        self.reveal(cfg, buffer)?;
        fs::write(self.marker(buffer), &release.id)
            .map_err(|e| io("write", &self.marker(buffer), e))?;
        Ok(())
    }

    /// Write the decrypted `*.age` files into `buffer` (0600), for plugins.
    fn reveal(&self, cfg: &ReleaseConfig, buffer: &str) -> Result<()> {
        let dir = self.dir.join(buffer);
        for (path, data) in &cfg.files {
            if self.withheld.contains(path) {
                continue;
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| {
                    Error::failed(
                        "pull release",
                        format!("decrypted file `{path}` is damaged: {e}"),
                    )
                })?;
            let target = dir.join(path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
            }
            write_private(&target, &bytes).map_err(|e| io("write", &target, e))?;
        }
        Ok(())
    }

    /// Remove `cfg`'s decrypted files from every buffer: no clear secret stays in the
    /// home after a run.
    pub fn scrub(&self, cfg: &ReleaseConfig) {
        for buffer in ["new", "existing", "previous"] {
            for path in cfg.files.keys() {
                let _ = fs::remove_file(self.dir.join(buffer).join(path));
            }
        }
    }

    /// Does `buffer` hold exactly `release`?
    fn intact(&self, release: &ReleaseRecord, cfg: &ReleaseConfig, buffer: &str) -> bool {
        let marked = fs::read_to_string(self.marker(buffer))
            .map(|s| s.trim() == release.id)
            .unwrap_or(false);
        if !marked {
            return false;
        }
        let skip = |p: &Path| cfg.files.contains_key(&p.to_string_lossy().into_owned());
        archive::hash_tree(&self.dir.join(buffer), &skip)
            .map(|d| d.hash == release.archive_hash)
            .unwrap_or(false)
    }

    pub fn prepare_new(
        &self,
        home: &Home,
        release: &ReleaseRecord,
        cfg: &ReleaseConfig,
        log: &Log,
    ) -> Result<()> {
        self.extract(home, release, cfg, "new")?;
        log.line(format!(
            "new release buffer: {} ({})",
            release.name, release.id
        ));
        Ok(())
    }

    pub fn ensure_existing(
        &self,
        home: &Home,
        release: &ReleaseRecord,
        cfg: &ReleaseConfig,
        log: &Log,
    ) -> Result<()> {
        if self.intact(release, cfg, "existing") {
            self.reveal(cfg, "existing")?;
            log.line(format!(
                "existing release buffer: {} ({})",
                release.name, release.id
            ));
            return Ok(());
        }
        self.extract(home, release, cfg, "existing")?;
        log.line(format!(
            "existing release buffer was missing or damaged: re-extracted {} from its archive",
            release.id
        ));
        Ok(())
    }

    /// After a deploy: `existing` → `previous`, `new` → `existing`.
    pub fn switch(&self) -> Result<()> {
        let (new, existing, previous) = (self.new_dir(), self.existing_dir(), self.previous_dir());
        if previous.exists() {
            fs::remove_dir_all(&previous).map_err(|e| io("clean", &previous, e))?;
        }
        let _ = fs::remove_file(self.marker("previous"));
        if existing.exists() {
            fs::rename(&existing, &previous).map_err(|e| io("move", &existing, e))?;
            let _ = fs::rename(self.marker("existing"), self.marker("previous"));
        }
        fs::rename(&new, &existing).map_err(|e| io("move", &new, e))?;
        fs::rename(self.marker("new"), self.marker("existing"))
            .map_err(|e| io("move", &self.marker("new"), e))?;
        Ok(())
    }
}
