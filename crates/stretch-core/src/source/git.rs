//! `git:` sources: a bare mirror cached in the home folder, fetched on every build;
//! the ref is resolved to a commit and that commit's tree is unpacked into the buffer.
//! Runs the `git` program, so https, ssh, file URLs and local paths all work as they
//! do for the operator's own git.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::log::Log;
use crate::{Error, Result};

fn git(dir: Option<&Path>) -> Command {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.arg("-C").arg(d);
    }
    // Never wait for a password prompt: a build is not interactive.
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::failed("pull", format!("cannot run git ({what}): {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::failed(
            "pull",
            format!("git {what} failed: {}", stderr.trim()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The mirror folder of `url` inside `cache`.
pub fn mirror_path(cache: &Path, url: &str) -> PathBuf {
    let hash = blake3::hash(url.as_bytes()).to_hex();
    let tail: String = url
        .trim_end_matches('/')
        .trim_end_matches(".git")
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("repo")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    cache.join(format!("{tail}-{}.git", &hash[..12]))
}

/// Fetch `url` into its mirror, resolve `git_ref` (default: the remote HEAD) and unpack
/// the commit's tree into `dest`. Returns the full commit id.
pub fn pull(
    url: &str,
    git_ref: Option<&str>,
    cache: &Path,
    dest: &Path,
    log: &Log,
) -> Result<String> {
    let mirror = mirror_path(cache, url);
    if !mirror.join("HEAD").exists() {
        // Clone into a temp sibling and rename, so an interrupted clone leaves nothing.
        let tmp = tempfile::Builder::new()
            .prefix(".clone")
            .tempdir_in(cache)
            .map_err(|e| {
                Error::failed(
                    "pull",
                    format!("cannot create a temp folder in `{}`: {e}", cache.display()),
                )
            })?;
        let target = tmp.path().join("m.git");
        log.line(format!("cloning {url}"));
        let mut cmd = git(None);
        cmd.args(["clone", "--mirror", "--quiet", "--"])
            .arg(url)
            .arg(&target);
        run(cmd, &format!("clone of `{url}`"))?;
        std::fs::rename(&target, &mirror).map_err(|e| {
            Error::failed(
                "pull",
                format!("cannot move the mirror of `{url}` into place: {e}"),
            )
        })?;
    } else {
        let mut cmd = git(Some(&mirror));
        cmd.args(["fetch", "--prune", "--quiet", "origin"]);
        run(cmd, &format!("fetch of `{url}`"))?;
        if git_ref.is_none() {
            // Follow a change of the remote's default branch.
            let mut cmd = git(Some(&mirror));
            cmd.args(["ls-remote", "--symref", "origin", "HEAD"]);
            if let Ok(out) = run(cmd, "ls-remote")
                && let Some(target) = out
                    .lines()
                    .find_map(|l| l.strip_prefix("ref: "))
                    .and_then(|l| l.split('\t').next())
            {
                let mut cmd = git(Some(&mirror));
                cmd.args(["symbolic-ref", "HEAD", target]);
                run(cmd, "symbolic-ref")?;
            }
        }
    }
    let wanted = git_ref.unwrap_or("HEAD");
    let commit = resolve(&mirror, wanted).ok_or_else(|| {
        let mut cmd = git(Some(&mirror));
        cmd.args([
            "for-each-ref",
            "--count=20",
            "--format=%(refname:short)",
            "refs/heads",
            "refs/tags",
        ]);
        let refs = run(cmd, "for-each-ref")
            .unwrap_or_default()
            .lines()
            .collect::<Vec<_>>()
            .join(", ");
        Error::invalid_with_help(
            format!("ref `{wanted}` does not exist in `{url}`"),
            format!("branches and tags there: {refs}"),
        )
    })?;
    unpack(&mirror, &commit, dest)?;
    Ok(commit)
}

/// The commit a ref names, if any.
fn resolve(mirror: &Path, git_ref: &str) -> Option<String> {
    if git_ref.starts_with('-') {
        return None;
    }
    let mut cmd = git(Some(mirror));
    cmd.args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
        .arg(format!("{git_ref}^{{commit}}"));
    run(cmd, "rev-parse").ok().filter(|s| !s.is_empty())
}

/// Unpack the tree of `commit` into `dest` by streaming `git archive` into tar.
fn unpack(mirror: &Path, commit: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| super::io_error("create", dest, e))?;
    let mut child = git(Some(mirror))
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::failed("pull", format!("cannot run git archive: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::failed("pull", "git archive has no output"))?;
    let mut archive = tar::Archive::new(stdout);
    archive.set_preserve_permissions(true);
    let unpacked = archive.unpack(dest);
    let out = child
        .wait_with_output()
        .map_err(|e| Error::failed("pull", format!("git archive: {e}")))?;
    if !out.status.success() {
        return Err(Error::failed(
            "pull",
            format!(
                "git archive failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    unpacked.map_err(|e| Error::failed("pull", format!("cannot unpack commit {commit}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names() {
        let p = mirror_path(Path::new("/c"), "https://x.org/a/shop.git");
        assert!(p.to_string_lossy().starts_with("/c/shop-"), "{p:?}");
        let p = mirror_path(Path::new("/c"), "git@host:team/app");
        assert!(p.to_string_lossy().starts_with("/c/app-"), "{p:?}");
        assert_ne!(
            mirror_path(Path::new("/c"), "a/x"),
            mirror_path(Path::new("/c"), "b/x")
        );
    }
}
