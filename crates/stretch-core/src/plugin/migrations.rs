//! The built-in `migrations` plugin: `{path: DIR, up: CMD, down: CMD, env: [NAME]}` over versioned
//! migration files (`NNNN-name…`). A forward deploy runs `up` from the new release
//! before switching; a rollback runs `down` afterwards from the newer release's files
//! (only they hold the down migrations), down to the newest migration of the release
//! rolled back to.
//!
//! Env given to the commands: `STRETCH_MIGRATIONS_DIR` (the folder the command runs
//! in), `STRETCH_MIGRATIONS_TARGET` (for `down`: the version to go back to, empty when
//! the older release has none; for `up`: the newest version of the new release).

use std::path::Path;

use super::{Call, Hook, known_options, opt_str};
use crate::log::Log;
use crate::system::project::PluginDecl;
use crate::{Error, Result};

pub fn validate(decl: &PluginDecl) -> Result<()> {
    known_options(decl, &["path", "up", "down", "env"])?;
    for k in ["path", "up", "down"] {
        opt_str(decl, k)?;
    }
    Ok(())
}

/// The newest migration version (`NNNN` prefix) in `dir`, if any.
pub fn newest(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let digits: String = name.chars().take_while(char::is_ascii_digit).collect();
            (!digits.is_empty()).then_some(digits)
        })
        .max_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)))
}

pub async fn run(call: &Call<'_>, log: &Log) -> Result<()> {
    let path = opt_str(call.decl, "path")?;
    let kind = call.facts.kind.as_deref();
    let (cmd, dir, target) = match (call.hook, kind) {
        (Hook::PreDeploy, Some("deploy")) => {
            let Some(up) = opt_str(call.decl, "up")? else {
                return Ok(());
            };
            let dir = call.folder(&call.facts.release.path, path)?;
            let target = newest(&dir).unwrap_or_default();
            (up, dir, target)
        }
        (Hook::PostDeploy, Some("rollback")) => {
            let Some(down) = opt_str(call.decl, "down")? else {
                return Ok(());
            };
            let Some(existing) = &call.facts.existing_release else {
                return Ok(());
            };
            let dir = call.folder(&existing.path, path)?;
            let target = newest(&call.folder(&call.facts.release.path, path)?).unwrap_or_default();
            (down, dir, target)
        }
        _ => return Ok(()),
    };
    if !dir.is_dir() {
        return Err(Error::failed(
            call.hook.as_str(),
            format!("migrations: folder `{}` does not exist", dir.display()),
        ));
    }
    log.line(format!(
        "migrations ({}): {cmd} (target {})",
        call.label(),
        if target.is_empty() { "none" } else { &target }
    ));
    let mut c = call.new_command("sh")?;
    c.arg("-c")
        .arg(cmd)
        .current_dir(&dir)
        .env("STRETCH_MIGRATIONS_DIR", &dir)
        .env("STRETCH_MIGRATIONS_TARGET", target);
    call.command(c, None, log).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version() {
        let t = tempfile::tempdir().unwrap();
        for f in ["0001-init.sql", "0010-more.sql", "0002-x.sql", "README"] {
            std::fs::write(t.path().join(f), "").unwrap();
        }
        assert_eq!(newest(t.path()).as_deref(), Some("0010"));
        assert_eq!(newest(&t.path().join("nope")), None);
    }
}
