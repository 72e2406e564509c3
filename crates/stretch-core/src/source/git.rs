//! `git:` sources: a bare mirror cached in the home folder, fetched on every build;
//! the ref is resolved to a commit and that commit's tree is listed (`git ls-tree`),
//! not checked out: the build tree gets its folders and symlinks, and file contents
//! are read from the mirror's objects only where something needs them (the archive
//! reads them in process, see [`super::odb`]; the build tree writes them from one
//! `git cat-file --batch`, see [`super::Tree`]).
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

/// Fetch `url` into its mirror and resolve `git_ref` (default: the remote HEAD).
/// Returns the mirror and the full commit id.
pub fn pull(
    url: &str,
    git_ref: Option<&str>,
    cache: &Path,
    log: &Log,
) -> Result<(PathBuf, String)> {
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
        // `--no-local`: a local repository's objects arrive packed, as from a
        // server, not as thousands of linked loose files for git to pack later.
        cmd.args(["clone", "--mirror", "--no-local", "--quiet", "--"])
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
        // Housekeeping git decides to do runs now, in the pull stage, and not
        // detached, competing unseen with the archive for the cores.
        cmd.args([
            "-c",
            "gc.autoDetach=false",
            "-c",
            "maintenance.autoDetach=false",
        ])
        .args(["fetch", "--prune", "--quiet", "origin"]);
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
    Ok((mirror, commit))
}

/// What a commit's tree holds at a path, as the build tree takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// A file: its blob, size and exec bit.
    File {
        oid: String,
        size: u64,
        exec: bool,
    },
    Symlink(PathBuf),
    /// A submodule: an empty folder, as `git archive` makes it.
    Dir,
}

/// Every entry of `commit`'s tree (paths relative to its root, checked to stay
/// inside it), with symlink targets read from their blobs.
pub fn list(mirror: &Path, commit: &str) -> Result<Vec<(PathBuf, Listed)>> {
    use std::os::unix::ffi::OsStrExt;
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
    let mut entries = Vec::new();
    let mut links = Vec::new();
    // Files whose size is still to be read (`ls-tree -l` would map the whole pack).
    let mut to_size = Vec::new();
    for raw in out.stdout.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let bad = || {
            Error::failed(
                "pull",
                format!(
                    "git ls-tree: unexpected line `{}`",
                    String::from_utf8_lossy(raw)
                ),
            )
        };
        let tab = raw.iter().position(|b| *b == b'\t').ok_or_else(bad)?;
        let head = std::str::from_utf8(&raw[..tab]).map_err(|_| bad())?;
        let rel = &raw[tab + 1..];
        // The paths come from the repository: each must stay inside the tree.
        if !safe_path(rel) {
            return Err(Error::invalid(format!(
                "commit {commit} holds the unsafe path `{}`",
                String::from_utf8_lossy(rel)
            )));
        }
        let rel = PathBuf::from(std::ffi::OsStr::from_bytes(rel));
        let mut f = head.split_ascii_whitespace();
        let (mode, kind, oid) = (f.next(), f.next(), f.next());
        let (Some(mode), Some(kind), Some(oid)) = (mode, kind, oid) else {
            return Err(bad());
        };
        match (kind, mode) {
            ("commit", _) => entries.push((rel, Listed::Dir)),
            ("blob", "120000") => {
                links.push((entries.len(), oid.to_string()));
                entries.push((rel, Listed::Symlink(PathBuf::new())));
            }
            ("blob", _) => {
                to_size.push(entries.len());
                entries.push((
                    rel,
                    Listed::File {
                        oid: oid.to_string(),
                        size: 0,
                        exec: mode == "100755",
                    },
                ));
            }
            _ => return Err(bad()),
        }
    }
    sizes(mirror, &mut entries, &to_size)?;
    if !links.is_empty() {
        let ids = links.iter().map(|(_, oid)| oid.clone()).collect();
        let mut blobs = Blobs::open(mirror, ids).map_err(|e| cat_error(&e))?;
        for (at, oid) in &links {
            let size = blobs.start(oid).map_err(|e| cat_error(&e))?;
            if size > 4096 {
                return Err(Error::invalid(format!(
                    "commit {commit} holds a symlink target of {size} bytes"
                )));
            }
            let mut target = Vec::new();
            blobs.read(size, &mut target).map_err(|e| cat_error(&e))?;
            blobs.end().map_err(|e| cat_error(&e))?;
            entries[*at].1 = Listed::Symlink(PathBuf::from(std::ffi::OsStr::from_bytes(&target)));
        }
    }
    Ok(entries)
}

/// The sizes of the files at `at` of `entries`: from the mirror's object files
/// where found there, the others from `git cat-file --batch-check`.
fn sizes(mirror: &Path, entries: &mut [(PathBuf, Listed)], at: &[usize]) -> Result<()> {
    let mut odb: Option<super::odb::Odb> = None;
    let mut asked = Vec::new();
    for &i in at {
        let Some((_, Listed::File { oid, size, .. })) = entries.get_mut(i) else {
            continue;
        };
        let odb = odb.get_or_insert_with(|| super::odb::Odb::open(mirror, oid.len() / 2));
        match odb.locate(oid).map(|loc| odb.size(&loc)) {
            Some(Ok(n)) => *size = n,
            Some(Err(e)) => {
                return Err(Error::failed(
                    "pull",
                    format!("cannot read blob {oid} of `{}`: {e}", mirror.display()),
                ));
            }
            None => asked.push(i),
        }
    }
    if asked.is_empty() {
        return Ok(());
    }
    let ids = asked
        .iter()
        .filter_map(|&i| match entries.get(i) {
            Some((_, Listed::File { oid, .. })) => Some(oid.clone()),
            _ => None,
        })
        .collect();
    let mut check = Blobs::sizes(mirror, ids).map_err(|e| cat_error(&e))?;
    for &i in &asked {
        if let Some((_, Listed::File { oid, size, .. })) = entries.get_mut(i) {
            *size = check.start(oid).map_err(|e| cat_error(&e))?;
        }
    }
    Ok(())
}

fn cat_error(e: &std::io::Error) -> Error {
    Error::failed("pull", format!("git cat-file: {e}"))
}

/// A relative path of plain names (no `..`, `.`, `.git`, empty or absolute parts).
fn safe_path(rel: &[u8]) -> bool {
    !rel.is_empty()
        && rel
            .split(|b| *b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b".." && !c.eq_ignore_ascii_case(b".git"))
}

/// Blob contents streamed from one `git cat-file --batch`, in the order their ids
/// were given: each blob is [`start`](Blobs::start)ed, read or skipped through, then
/// [`end`](Blobs::end)ed. The process is killed when this is dropped.
pub struct Blobs {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    /// Bytes of the current blob not yet read, and whether one is open.
    left: u64,
    open: bool,
    /// `--batch-check`: sizes only, no contents follow.
    check: bool,
}

impl Blobs {
    pub fn open(mirror: &Path, ids: Vec<String>) -> std::io::Result<Blobs> {
        Blobs::spawn(mirror, ids, false)
    }

    /// Only the blobs' sizes, each given by [`start`](Blobs::start), nothing to read.
    pub fn sizes(mirror: &Path, ids: Vec<String>) -> std::io::Result<Blobs> {
        Blobs::spawn(mirror, ids, true)
    }

    fn spawn(mirror: &Path, ids: Vec<String>, check: bool) -> std::io::Result<Blobs> {
        use std::io::Write;
        let mut child = git(Some(mirror))
            .args(["cat-file", if check { "--batch-check" } else { "--batch" }])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("no pipes to git cat-file"));
        };
        // Fed from another thread: git answers while it reads, and both pipes are
        // bounded. It ends when all is written or git is gone (killed on drop).
        std::thread::spawn(move || {
            let mut w = std::io::BufWriter::new(&mut stdin);
            for id in ids {
                if writeln!(w, "{id}").is_err() {
                    return;
                }
            }
            let _ = w.flush();
        });
        // A larger pipe: fewer switches between git and the reader for each
        // megabyte. Only a hint (the system may cap it).
        let _ = rustix::pipe::fcntl_setpipe_size(&stdout, 1 << 20);
        Ok(Blobs {
            child,
            // Small: reads of whole files bypass it, copied once from the pipe.
            out: std::io::BufReader::with_capacity(64 << 10, stdout),
            left: 0,
            open: false,
            check,
        })
    }

    /// Open the next blob, which must be `oid`; returns its size. A blob left
    /// unfinished is skipped to its end first.
    pub fn start(&mut self, oid: &str) -> std::io::Result<u64> {
        use std::io::{BufRead, Read};
        if self.open {
            self.skip(self.left)?;
            self.end()?;
        }
        let mut head = String::new();
        (&mut self.out).take(512).read_line(&mut head)?;
        let mut f = head.trim_end().split(' ');
        let (got, kind, size) = (f.next(), f.next(), f.next().and_then(|n| n.parse().ok()));
        match (got, kind, size) {
            (Some(g), Some("blob"), Some(size)) if g == oid => {
                if !self.check {
                    self.left = size;
                    self.open = true;
                }
                Ok(size)
            }
            _ => Err(std::io::Error::other(format!(
                "asked for blob {oid}, got `{}`",
                head.trim_end()
            ))),
        }
    }

    /// Append the next `n` bytes of the open blob to `out`.
    pub fn read(&mut self, n: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
        use std::io::Read;
        let n = n.min(self.left);
        let len = usize::try_from(n).map_err(std::io::Error::other)?;
        let start = out.len();
        // One exact read: past what is buffered, it goes from the pipe straight here.
        out.resize(start + len, 0);
        if let Err(e) = self.out.read_exact(&mut out[start..]) {
            out.truncate(start);
            return Err(e);
        }
        self.left -= n;
        Ok(())
    }

    /// Pass over the next `n` bytes of the open blob.
    pub fn skip(&mut self, n: u64) -> std::io::Result<()> {
        use std::io::Read;
        let n = n.min(self.left);
        let got = std::io::copy(&mut (&mut self.out).take(n), &mut std::io::sink())?;
        self.left -= got;
        if got < n {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Close the open blob, wholly read: git ends each with a newline.
    pub fn end(&mut self) -> std::io::Result<()> {
        use std::io::Read;
        if self.left > 0 {
            return Err(std::io::Error::other("a blob was closed before its end"));
        }
        let mut newline = [0u8; 1];
        self.out.read_exact(&mut newline)?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Blobs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
