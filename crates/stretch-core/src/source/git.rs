//! `git:` sources: a bare mirror cached in the home folder, fetched on every build;
//! the ref is resolved to a commit and that commit's tree is brought into the source's
//! buffer: unpacked whole the first time, then only the files that differ from the
//! last build's commit are written or removed (the others keep their inodes, so the
//! build tree and the archive's stat cache see them unchanged).
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
    update(&mirror, &commit, dest)?;
    Ok(commit)
}

/// The listing of the tree `dest` holds, beside it: written only once `dest` is
/// complete, removed while it changes.
fn listing_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".tree");
    dest.with_file_name(name)
}

/// One entry of `git ls-tree -r`: mode, type, object id.
type Entry = (String, String, String);
/// A tree's entries by path.
type Listing = std::collections::BTreeMap<Vec<u8>, Entry>;

fn ls_tree(mirror: &Path, commit: &str) -> Result<(Vec<u8>, Listing)> {
    let out = git(Some(mirror))
        .args(["ls-tree", "-r", "-z", "--full-tree", commit])
        .output()
        .map_err(|e| Error::failed("pull", format!("cannot run git ls-tree: {e}")))?;
    if !out.status.success() {
        return Err(Error::failed(
            "pull",
            format!(
                "git ls-tree failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let listing = parse_listing(&out.stdout);
    Ok((out.stdout, listing))
}

fn parse_listing(raw: &[u8]) -> Listing {
    raw.split(|b| *b == 0)
        .filter_map(|entry| {
            let tab = entry.iter().position(|b| *b == b'\t')?;
            let head = std::str::from_utf8(&entry[..tab]).ok()?;
            let mut f = head.split(' ');
            let (mode, kind, oid) = (f.next()?, f.next()?, f.next()?);
            Some((
                entry[tab + 1..].to_vec(),
                (mode.to_string(), kind.to_string(), oid.to_string()),
            ))
        })
        .collect()
}

/// Bring `dest` to the tree of `commit`: incrementally from the listing of the tree it
/// holds, else (no listing: first build, or an update that did not finish) anew.
fn update(mirror: &Path, commit: &str, dest: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let listing = listing_path(dest);
    let (raw, new) = ls_tree(mirror, commit)?;
    let old = std::fs::read(&listing)
        .ok()
        .filter(|_| dest.is_dir())
        .map(|raw| parse_listing(&raw));
    let _ = std::fs::remove_file(&listing);
    let Some(old) = old else {
        if dest.exists() {
            std::fs::remove_dir_all(dest).map_err(|e| super::io_error("clean", dest, e))?;
        }
        unpack(mirror, commit, dest)?;
        return std::fs::write(&listing, raw).map_err(|e| super::io_error("write", &listing, e));
    };
    // The paths come from the repository: each must stay inside `dest`.
    if let Some(bad) = new.keys().find(|rel| !safe_path(rel)) {
        return Err(Error::invalid(format!(
            "commit {commit} holds the unsafe path `{}`",
            String::from_utf8_lossy(bad)
        )));
    }
    let path_of = |rel: &[u8]| dest.join(std::ffi::OsStr::from_bytes(rel));
    // Gone or changed: removed (a changed file is written anew below).
    for (rel, entry) in &old {
        if new.get(rel) != Some(entry) {
            let p = path_of(rel);
            let removed = match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
                Ok(_) => std::fs::remove_file(&p),
                Err(_) => Ok(()),
            };
            removed.map_err(|e| super::io_error("remove", &p, e))?;
        }
    }
    remove_empty_dirs(dest);
    // Submodules are empty folders, as `git archive` makes them: made again whether
    // they changed or not, since the sweep above removed them.
    for (rel, (_, kind, _)) in &new {
        if kind == "commit" {
            let p = path_of(rel);
            std::fs::create_dir_all(&p).map_err(|e| super::io_error("create", &p, e))?;
        }
    }
    let wanted: Vec<(&Vec<u8>, &Entry)> = new
        .iter()
        .filter(|(rel, entry)| old.get(*rel) != Some(entry))
        .collect();
    write_objects(mirror, dest, &wanted)?;
    std::fs::write(&listing, raw).map_err(|e| super::io_error("write", &listing, e))
}

/// A relative path of plain names (no `..`, `.`, `.git`, empty or absolute parts).
fn safe_path(rel: &[u8]) -> bool {
    !rel.is_empty()
        && rel
            .split(|b| *b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b".." && !c.eq_ignore_ascii_case(b".git"))
}

/// Remove the folders under `dir` that hold nothing (a commit has no empty folders).
fn remove_empty_dirs(dir: &Path) {
    for entry in walkdir::WalkDir::new(dir)
        .min_depth(1)
        .contents_first(true)
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_dir() {
            // Fails, as it should, on a folder that is not empty.
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Write the listed blobs (files and symlinks) into `dest`, their contents read with
/// one `git cat-file --batch`.
fn write_objects(mirror: &Path, dest: &Path, wanted: &[(&Vec<u8>, &Entry)]) -> Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let blobs: Vec<_> = wanted.iter().filter(|(_, e)| e.1 == "blob").collect();
    if blobs.is_empty() {
        return Ok(());
    }
    let fail = |what: String| Error::failed("pull", format!("git cat-file: {what}"));
    let mut child = git(Some(mirror))
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    let mut stdin = child.stdin.take().ok_or_else(|| fail("no input".into()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("no output".into()))?;
    let ids: Vec<String> = blobs.iter().map(|(_, e)| e.2.clone()).collect();
    // Fed from another thread: git answers while it reads, and both pipes are bounded.
    let feeder = std::thread::spawn(move || {
        for id in ids {
            if writeln!(stdin, "{id}").is_err() {
                break;
            }
        }
    });
    let root = dest
        .canonicalize()
        .map_err(|e| super::io_error("read", dest, e))?;
    let mut out = BufReader::with_capacity(1 << 20, stdout);
    let result = (|| -> Result<()> {
        for (rel, (mode, _, oid)) in &blobs {
            let mut head = String::new();
            out.read_line(&mut head).map_err(|e| fail(e.to_string()))?;
            let mut f = head.trim_end().split(' ');
            let (got, size) = (f.next(), f.nth(1).and_then(|n| n.parse::<u64>().ok()));
            let Some(size) = size.filter(|_| got == Some(oid.as_str())) else {
                return Err(fail(format!("unexpected answer `{}`", head.trim_end())));
            };
            let p = dest.join(std::ffi::OsStr::from_bytes(rel));
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| super::io_error("create", parent, e))?;
                // Not through a symlink of the tree.
                let real = parent
                    .canonicalize()
                    .map_err(|e| super::io_error("read", parent, e))?;
                if !real.starts_with(&root) {
                    return Err(Error::invalid(format!(
                        "`{}` of commit is reached through a symlink",
                        String::from_utf8_lossy(rel)
                    )));
                }
            }
            let mut body = (&mut out).take(size);
            if mode == "120000" {
                let mut target = Vec::new();
                body.read_to_end(&mut target)
                    .map_err(|e| fail(e.to_string()))?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &p)
                    .map_err(|e| super::io_error("link", &p, e))?;
            } else {
                let mut file =
                    std::fs::File::create(&p).map_err(|e| super::io_error("write", &p, e))?;
                let n = std::io::copy(&mut body, &mut file)
                    .map_err(|e| super::io_error("write", &p, e))?;
                if n != size {
                    return Err(fail(format!("{oid} ended early")));
                }
                let exec = if mode == "100755" { 0o755 } else { 0o644 };
                file.set_permissions(std::fs::Permissions::from_mode(exec))
                    .map_err(|e| super::io_error("write", &p, e))?;
            }
            let mut newline = [0u8; 1];
            out.read_exact(&mut newline)
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    })();
    drop(out);
    let _ = feeder.join();
    let status = child.wait().map_err(|e| fail(e.to_string()))?;
    result?;
    if !status.success() {
        return Err(fail(format!("exited with {status}")));
    }
    Ok(())
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
    fn safe_paths() {
        for ok in [&b"a"[..], b"a/b.txt", b"x/.gitignore", b"..x/y"] {
            assert!(safe_path(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"a/../b",
            b"..",
            b"./a",
            b"a//b",
            b".git/config",
            b"a/.GIT/x",
        ] {
            assert!(!safe_path(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

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
