//! Test context for stretch: a real registry process, a tiny local base image, unique
//! names, image cleanup guards, git repositories and small file helpers.
//!
//! Everything here is synchronous and std-only (plus `tempfile` and `serde_json`) so
//! that both async unit tests and the binary's integration tests can use it. Helpers
//! panic with a clear message instead of returning errors: this is test support.
//!
//! Tests run in parallel, in several processes at once (one per test binary), so every
//! shared resource is either made unique per test ([`unique`], [`Registry::start`]) or
//! created idempotently under a lock ([`base_image`]).

// Test support: failing loudly at the point of failure is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// The reference of the local base image made by [`base_image`]. Bump the tag when its
/// content changes, so that machines with the old one rebuild it.
pub const BASE_IMAGE: &str = "stretch-test/busybox:1";

const BUSYBOX: &str = "/bin/busybox";
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

// ---------------------------------------------------------------------------------------
// names and files

/// A name no other test (in this or another process, now or in an earlier run) uses:
/// `PREFIX-PID-COUNTER-TIME`, lowercase, usable as a docker repository component, a
/// label value, a container or system name.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // Time guards against a pid reused by a later run whose images were left behind.
    let time = base36((millis % 36u128.pow(6)) as u64);
    let prefix: String = prefix
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let prefix = prefix.trim_matches('-');
    let prefix = if prefix.is_empty() { "t" } else { prefix };
    format!("{prefix}-{}-{n}-{time}", std::process::id())
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

/// Write `contents` to `dir/rel`, creating parent folders. Returns the full path.
pub fn write(dir: &Path, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    }
    fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago (another process may still take
/// it before the caller binds it: retry on collision).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local address of a bound socket")
        .port()
}

// ---------------------------------------------------------------------------------------
// docker

/// Whether `docker ARGS` succeeds (output discarded).
pub fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run the docker CLI; panics with its stderr on failure. Returns stdout, trimmed.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `docker {}`: {e}", args.join(" ")));
    if !out.status.success() {
        panic!(
            "`docker {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Run the docker CLI quietly, ignoring failure (cleanup). Returns whether it succeeded.
fn docker_quiet(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn image_exists(reference: &str) -> bool {
    docker_quiet(&["image", "inspect", "--format", "{{.Id}}", reference])
}

/// Makes sure the tiny local base image [`BASE_IMAGE`] exists and returns its reference.
///
/// Nothing can be pulled here, so the image is made with `docker import` from a root
/// filesystem holding `/bin/busybox` (Debian's `busybox-static`) and a symlink per
/// applet (`sh`, `httpd`, `wget`, `cat`, …). Safe to call from many threads and
/// processes at once: a process-wide `OnceLock` plus a file lock around the import.
pub fn base_image() -> String {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if image_exists(BASE_IMAGE) {
            return;
        }
        let lock_path = std::env::temp_dir().join("stretch-test-base-image.lock");
        let lock = File::create(&lock_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
        lock.lock()
            .unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));
        // Another process may have imported it while we waited for the lock.
        if !image_exists(BASE_IMAGE) {
            import_base_image(BASE_IMAGE);
        }
        // The lock is released when `lock` is dropped.
    });
    BASE_IMAGE.to_string()
}

fn import_base_image(reference: &str) {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (apt-get install -y busybox-static)"
    );
    let tmp = TempDir::new().expect("creating a temp dir");
    let root = tmp.path().join("rootfs");
    for d in [
        "bin", "usr/bin", "sbin", "etc", "tmp", "root", "var/www", "proc", "sys", "dev",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(BUSYBOX, root.join("bin/busybox"))
        .unwrap_or_else(|e| panic!("copying {BUSYBOX}: {e}"));
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .expect("running busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    // Scripts often start with `#!/usr/bin/env sh`.
    std::os::unix::fs::symlink("/bin/busybox", root.join("usr/bin/env")).unwrap();
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();

    let tarball = tmp.path().join("rootfs.tar");
    let status = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .expect("running tar");
    assert!(
        status.success(),
        "tar of the base image rootfs failed: {status}"
    );
    docker(&[
        "import",
        "--change",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        "CMD [\"sh\"]",
        "--change",
        "LABEL stretch-test=base",
        tarball.to_str().unwrap(),
        reference,
    ]);
}

/// Removes images by reference (`docker rmi -f`) when dropped, even if the test failed,
/// and the untagged images left by rebuilding those references.
#[derive(Debug, Default)]
pub struct ImageGuard(pub Vec<String>);

impl ImageGuard {
    pub fn new() -> Self {
        ImageGuard(Vec::new())
    }

    /// Also remove `reference` on drop.
    pub fn add(&mut self, reference: impl Into<String>) {
        self.0.push(reference.into());
    }
}

impl Drop for ImageGuard {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let mut args = vec!["rmi", "-f"];
        args.extend(self.0.iter().map(String::as_str));
        docker_quiet(&args);
        for reference in &self.0 {
            remove_dangling_layers(reference);
        }
    }
}

/// Calls [`remove_images_matching`] with its prefix when dropped.
#[derive(Debug)]
pub struct PrefixGuard(pub String);

impl Drop for PrefixGuard {
    fn drop(&mut self) {
        remove_images_matching(&self.0);
    }
}

/// Removes every local image whose repository starts with `prefix`, or has a path
/// component starting with it after a registry host (`127.0.0.1:5000/PREFIX…/web`).
/// Pass a name from [`unique`] so that nothing of another test matches. Untagged layers
/// left by its builds go too.
pub fn remove_images_matching(prefix: &str) {
    assert!(
        !prefix.is_empty(),
        "remove_images_matching needs a non-empty prefix"
    );
    let listing = docker(&["images", "--format", "{{.Repository}} {{.Tag}} {{.ID}}"]);
    let mut refs: Vec<String> = Vec::new();
    for line in listing.lines() {
        let mut parts = line.split_whitespace();
        let (Some(repo), Some(tag), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !(repo.starts_with(prefix) || repo.contains(&format!("/{prefix}"))) {
            continue;
        }
        refs.push(if tag == "<none>" {
            id.to_string()
        } else {
            format!("{repo}:{tag}")
        });
    }
    if !refs.is_empty() {
        let mut args = vec!["rmi", "-f"];
        args.extend(refs.iter().map(String::as_str));
        docker_quiet(&args);
    }
    remove_dangling_layers(prefix);
}

/// Untagged images left by a test's builds (a failed step keeps the layers before it;
/// the images tests build directly are tagged by their system): built on the test
/// base image with `STRETCH_TEST=PREFIX…` (see the integration tests' `from_base`).
fn remove_dangling_layers(prefix: &str) {
    // Quietly: this runs in guards, maybe while a failed test unwinds.
    let Ok(listed) = Command::new("docker")
        .args(["images", "-q", "--no-trunc", "--filter", "dangling=true"])
        .args(["--filter", "label=stretch-test=base"])
        .output()
    else {
        return;
    };
    let ids = String::from_utf8_lossy(&listed.stdout).into_owned();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return;
    }
    let mut args = vec![
        "image",
        "inspect",
        "--format",
        "{{.Id}}{{range .Config.Env}} {{.}}{{end}}",
    ];
    args.extend(&ids);
    let Some(listing) = Command::new("docker").args(&args).output().ok() else {
        return;
    };
    let needle = format!("STRETCH_TEST={}", prefix.trim_end_matches('/'));
    let ours: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|l| l.split_whitespace().skip(1).any(|e| e.starts_with(&needle)))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    if !ours.is_empty() {
        let mut args = vec!["rmi", "-f"];
        args.extend(ours.iter().map(String::as_str));
        docker_quiet(&args);
    }
}

// ---------------------------------------------------------------------------------------
// registry

/// A private registry (Debian's `docker-registry`, distribution v2) listening on a free
/// 127.0.0.1 port, with its storage in a temp dir. Docker allows plain HTTP to
/// 127.0.0.0/8 registries, so pushes work without TLS. Killed and deleted on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`, the registry part of image references.
    pub addr: String,
    child: Child,
    dir: TempDir,
}

impl Registry {
    /// Where the registry keeps its blobs and manifests.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start a registry and wait until it answers `GET /v2/`.
    pub fn start() -> Registry {
        Registry::start_with(None, false)
    }

    /// A registry serving HTTPS with a self-signed certificate for 127.0.0.1 (made
    /// with openssl). The engine accepts it: 127.0.0.0/8 registries are insecure by
    /// default, which skips verification.
    pub fn start_tls() -> Registry {
        Registry::start_with(None, true)
    }

    /// A registry that takes pushes and pulls only with `user`'s `password` (htpasswd,
    /// bcrypt); anonymous requests get 401.
    pub fn start_with_login(user: &str, password: &str) -> Registry {
        Registry::start_with(Some((user, password)), false)
    }

    fn start_with(login: Option<(&str, &str)>, tls: bool) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: install Debian's docker-registry (apt-get install -y docker-registry)"
        );
        let mut last_log = String::new();
        // The port is found by binding port 0 and released before the registry binds it,
        // so another process can take it in between: retry with a new port.
        for _ in 0..8 {
            let dir = TempDir::new().expect("creating a temp dir for the registry");
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            let mut yml = registry_config(&dir.path().join("data"), &addr);
            if let Some((user, password)) = login {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("htpasswd (apache2-utils) makes the registry's password file");
                assert!(out.status.success(), "htpasswd failed");
                let file = dir.path().join("htpasswd");
                fs::write(&file, out.stdout).unwrap();
                yml += &format!(
                    "auth:\n  htpasswd:\n    realm: stretch-test\n    path: {}\n",
                    file.display()
                );
            }
            if tls {
                let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
                let ok = Command::new("openssl")
                    .args([
                        "req",
                        "-x509",
                        "-newkey",
                        "ec",
                        "-pkeyopt",
                        "ec_paramgen_curve:P-256",
                    ])
                    .args(["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
                    .args(["-addext", "subjectAltName=IP:127.0.0.1"])
                    .arg("-keyout")
                    .arg(&key)
                    .arg("-out")
                    .arg(&cert)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "openssl could not make the registry's certificate");
                yml = yml.replace(
                    &format!("  addr: {addr}\n"),
                    &format!(
                        "  addr: {addr}\n  tls:\n    certificate: {}\n    key: {}\n",
                        cert.display(),
                        key.display()
                    ),
                );
            }
            fs::write(&config, yml).unwrap();
            let log_path = dir.path().join("registry.log");
            let log = File::create(&log_path).unwrap();
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {REGISTRY_BIN}: {e}"));
            let mut registry = Registry { addr, child, dir };
            match registry.wait_ready(Duration::from_secs(20), tls) {
                Ok(()) => return registry,
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!("registry on {} did not start:\n{log}", registry.addr),
            }
        }
        panic!("registry did not start: no free port after 8 attempts; last log:\n{last_log}");
    }

    /// Ready = our process says it listens and `GET /v2/` answers 200. Checking the log
    /// too avoids mistaking another registry that holds the same port for ours.
    fn wait_ready(&mut self, timeout: Duration, tls: bool) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            let answers = if tls {
                TcpStream::connect(&self.addr).is_ok()
            } else {
                matches!(http_get(&self.addr, "/v2/"), Ok((200 | 401, _)))
            };
            if self.log().contains("listening on")
                && answers
                && matches!(self.child.try_wait(), Ok(None))
            {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(format!("not ready after {timeout:?}:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The registry's own log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The digest the registry names `repo:tag`'s manifest by
    /// (`Docker-Content-Digest`).
    pub fn manifest_digest(&self, repo: &str, tag: &str) -> String {
        let (status, head) = raw_request(
            &self.addr,
            "HEAD",
            &format!("/v2/{repo}/manifests/{tag}"),
            MANIFEST_TYPES,
        )
        .unwrap_or_else(|e| panic!("HEAD manifest {repo}:{tag}: {e}"));
        assert_eq!(status, 200, "HEAD manifest {repo}:{tag}:\n{head}");
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("docker-content-digest")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no digest for {repo}:{tag}:\n{head}"))
    }

    /// Delete the manifest `digest` of `repo`; returns the status.
    pub fn delete_manifest(&self, repo: &str, digest: &str) -> u16 {
        raw_request(
            &self.addr,
            "DELETE",
            &format!("/v2/{repo}/manifests/{digest}"),
            MANIFEST_TYPES,
        )
        .unwrap_or_else(|e| panic!("DELETE manifest {repo}@{digest}: {e}"))
        .0
    }

    /// The tags of `repo` (e.g. `shop/web`), sorted; empty if the repository is unknown.
    pub fn catalog_tags(&self, repo: &str) -> Vec<String> {
        let (status, body) = http_get(&self.addr, &format!("/v2/{repo}/tags/list"))
            .unwrap_or_else(|e| panic!("GET /v2/{repo}/tags/list from {}: {e}", self.addr));
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(
            status, 200,
            "GET /v2/{repo}/tags/list from {}: {body}",
            self.addr
        );
        let doc: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("tags list of {repo} is not JSON ({e}): {body}"));
        let mut tags: Vec<String> = doc["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        tags.sort();
        tags
    }

    /// Repositories in the registry (`GET /v2/_catalog`), sorted.
    pub fn catalog(&self) -> Vec<String> {
        let (status, body) = http_get(&self.addr, "/v2/_catalog").expect("GET /v2/_catalog");
        assert_eq!(status, 200, "GET /v2/_catalog: {body}");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("catalog is JSON");
        let mut repos: Vec<String> = doc["repositories"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        repos.sort();
        repos
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` (config, log, storage) is deleted when the TempDir field drops.
    }
}

fn registry_config(data: &Path, addr: &str) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n\
         health:\n  storagedriver:\n    enabled: false\n",
        data.display()
    )
}

const MANIFEST_TYPES: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json";

/// A bodiless HTTP/1.0 request with an `Accept` header: the status and the head.
fn raw_request(
    addr: &str,
    method: &str,
    path: &str,
    accept: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let head = text.split_once("\r\n\r\n").map_or(&*text, |(h, _)| h);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_string()))
}

/// A minimal HTTP/1.0 GET: returns the status code and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {head}")))?;
    Ok((status, body.to_string()))
}

// ---------------------------------------------------------------------------------------
// git

/// Run git in `dir` with a fixed identity and fixed dates (so commits are reproducible)
/// and without the user's or system's config. Panics with stderr on failure. Returns
/// stdout without its trailing newline.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let date = "2024-01-01T00:00:00+0000";
    let out = Command::new("git")
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "tag.gpgsign=false",
        ])
        .args([
            "-c",
            "core.autocrlf=false",
            "-c",
            "protocol.file.allow=always",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Stretch Test")
        .env("GIT_AUTHOR_EMAIL", "test@stretch.invalid")
        .env("GIT_COMMITTER_NAME", "Stretch Test")
        .env("GIT_COMMITTER_EMAIL", "test@stretch.invalid")
        .env("GIT_AUTHOR_DATE", date)
        .env("GIT_COMMITTER_DATE", date)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .output()
        .unwrap_or_else(|e| panic!("running `git {}`: {e}", args.join(" ")));
    if !out.status.success() {
        panic!(
            "`git {}` in {} failed ({}): {}",
            args.join(" "),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// `git init` in `dir` (created if missing), on branch `main`.
pub fn git_init(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    git(dir, &["init", "-q", "-b", "main"]);
}

/// Stage everything and commit (empty commits allowed). Returns the commit sha.
pub fn git_commit_all(dir: &Path, message: &str) -> String {
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "--allow-empty", "-m", message]);
    git(dir, &["rev-parse", "HEAD"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_docker_safe_and_distinct() {
        let a = unique("My_Test.Name");
        let b = unique("My_Test.Name");
        assert_ne!(a, b);
        assert!(a.starts_with("my-test-name-"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{a}"
        );
        assert!(unique("--").starts_with("t-"));
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }

    #[test]
    fn write_creates_parents() {
        let tmp = TempDir::new().unwrap();
        let p = write(tmp.path(), "a/b/c.txt", "hi");
        assert_eq!(fs::read_to_string(p).unwrap(), "hi");
    }

    #[test]
    fn git_commits_are_reproducible() {
        let a = TempDir::new().unwrap();
        let b = TempDir::new().unwrap();
        for dir in [a.path(), b.path()] {
            git_init(dir);
            write(dir, "f.txt", "same");
        }
        let sa = git_commit_all(a.path(), "one");
        let sb = git_commit_all(b.path(), "one");
        assert_eq!(sa, sb);
        assert_eq!(sa.len(), 40);
        assert_eq!(
            git(a.path(), &["rev-parse", "--abbrev-ref", "HEAD"]),
            "main"
        );
    }

    #[test]
    fn base_image_runs_busybox() {
        let image = base_image();
        // Many threads at once must all see the same image.
        let handles: Vec<_> = (0..4).map(|_| std::thread::spawn(base_image)).collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), image);
        }
        let name = unique("stretch-test-base");
        let out = docker(&[
            "run",
            "--rm",
            "--name",
            &name,
            &image,
            "sh",
            "-c",
            "echo hello; ls /bin/httpd",
        ]);
        assert_eq!(out, "hello\n/bin/httpd");
    }

    #[test]
    fn registry_starts_answers_and_stops() {
        let registry = Registry::start();
        let other = Registry::start();
        assert_ne!(registry.addr, other.addr);
        assert_eq!(registry.catalog_tags("nothing/here"), Vec::<String>::new());
        assert!(registry.catalog().is_empty());
        let addr = registry.addr.clone();
        drop(registry);
        assert!(
            http_get(&addr, "/v2/").is_err(),
            "registry still answers after drop"
        );
    }

    #[test]
    fn push_to_registry_and_cleanup() {
        let registry = Registry::start();
        let repo = unique("stretch-test-push");
        let _cleanup = PrefixGuard(repo.clone());
        let reference = format!("{}/{repo}/app:v1", registry.addr);
        docker(&["tag", &base_image(), &reference]);
        docker(&["push", "-q", &reference]);
        assert_eq!(
            registry.catalog_tags(&format!("{repo}/app")),
            vec!["v1".to_string()]
        );
        remove_images_matching(&repo);
        assert!(!image_exists(&reference));
        assert!(
            image_exists(BASE_IMAGE),
            "cleanup must not remove the base image"
        );
    }
}
