//! One deploy per environment at a time: an exclusive `flock` on
//! `home/locks/ENV.lock`, whose content says who holds it and since when. The kernel
//! releases the lock when its holder dies, so a crashed deploy never blocks the next;
//! the stale holder line it left is reported and replaced.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

use crate::home::Home;
use crate::log::Log;
use crate::util::now_rfc3339;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub what: String,
    pub since: String,
}

/// A held environment lock; released on drop.
pub struct EnvLock {
    file: File,
}

impl Drop for EnvLock {
    fn drop(&mut self) {
        // A clean exit leaves no holder behind; only a crash leaves a stale line.
        let _ = self.file.set_len(0);
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Lock environment `env` for `what` (e.g. `deploy of brave-otter`). Without `wait`,
/// fail at once naming the holder.
pub fn lock(home: &Home, env: &str, what: &str, wait: bool, log: &Log) -> Result<EnvLock> {
    let dir = home.root.join("locks");
    fs::create_dir_all(&dir)
        .map_err(|e| Error::failed("lock", format!("cannot create `{}`: {e}", dir.display())))?;
    let path = dir.join(format!("{env}.lock"));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::failed("lock", format!("cannot open `{}`: {e}", path.display())))?;
    let read_holder = |f: &mut File| -> Option<Holder> {
        let mut s = String::new();
        f.rewind().ok()?;
        f.read_to_string(&mut s).ok()?;
        serde_json::from_str(&s).ok()
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = read_holder(&mut file);
            let who = holder
                .map(|h| format!("{} (pid {}) since {}", h.what, h.pid, h.since))
                .unwrap_or_else(|| "another process".into());
            if !wait {
                return Err(Error::busy(
                    "lock",
                    format!("environment `{env}` is locked by {who}"),
                    Some("wait for it to finish, or pass `--wait` to queue behind it".into()),
                ));
            }
            log.line(format!("waiting for the lock of `{env}`, held by {who}"));
            file.lock().map_err(|e| {
                Error::failed("lock", format!("cannot lock `{}`: {e}", path.display()))
            })?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(Error::failed(
                "lock",
                format!("cannot lock `{}`: {e}", path.display()),
            ));
        }
    }
    if let Some(old) = read_holder(&mut file)
        && old.pid != std::process::id()
        && !pid_alive(old.pid)
    {
        log.line(format!(
            "breaking the stale lock of `{env}` left by {} (pid {}, gone) since {}",
            old.what, old.pid, old.since
        ));
    }
    let holder = Holder {
        pid: std::process::id(),
        what: what.to_string(),
        since: now_rfc3339(),
    };
    let text = serde_json::to_string(&holder).unwrap_or_default();
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(text.as_bytes()));
    written
        .map_err(|e| Error::failed("lock", format!("cannot write `{}`: {e}", path.display())))?;
    Ok(EnvLock { file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_naming_the_holder() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::open(t.path()).unwrap();
        let first = lock(&home, "prod", "deploy of a", false, &Log::null()).unwrap();
        match lock(&home, "prod", "deploy of b", false, &Log::null()) {
            Err(Error::Busy { stage, message, .. }) => {
                assert_eq!(stage, "lock");
                assert!(message.contains("locked by deploy of a (pid"), "{message}")
            }
            other => panic!("{:?}", other.err()),
        }
        assert!(lock(&home, "staging", "x", false, &Log::null()).is_ok());
        drop(first);
        assert!(lock(&home, "prod", "deploy of b", false, &Log::null()).is_ok());
    }
}
