//! The test context: a temp folder holding a system, and a way to run `stretch` in it.

use std::path::{Path, PathBuf};
use std::process::Command;

pub use stretch_test::{base_image, git, git_commit_all, git_init, unique, write};

/// What one run of the binary did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success:\n{self}");
        self
    }

    /// Assert a failure with `code` whose stderr contains every one of `needles`.
    #[track_caller]
    pub fn fails(self, code: i32, needles: &[&str]) -> Self {
        assert_eq!(self.code, code, "expected exit {code}:\n{self}");
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}:\n{self}");
        }
        self
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A temp folder with a `system.yml` (written by the test) and a home inside it.
///
/// Every context has a release key (`release.key`, given to every run through
/// `STRETCH_RELEASE_IDENTITY`); systems with a registry seal releases to it.
pub struct Ctx {
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
    /// The release key's recipient (`age1…`).
    pub release_recipient: String,
}

impl Ctx {
    pub fn new() -> Ctx {
        let dir = tempfile::tempdir().expect("temp dir");
        let (key, recipient) = stretch_core::secrets::generate();
        let key_file = dir.path().join("release.key");
        std::fs::write(&key_file, key).expect("write release.key");
        Ctx {
            dir,
            env: vec![(
                "STRETCH_RELEASE_IDENTITY".into(),
                key_file.display().to_string(),
            )],
            release_recipient: recipient,
        }
    }

    /// The `release_recipients:` line of a system with `registry` (none for `local`).
    pub fn recipients(&self, registry: &str) -> String {
        if registry == "local" {
            String::new()
        } else {
            format!("release_recipients: [{}]\n", self.release_recipient)
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn home(&self) -> PathBuf {
        self.path().join(".stretch")
    }

    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        write(self.path(), rel, contents)
    }

    /// `stretch ARGS` in the folder, to run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stretch"));
        cmd.args(args)
            .current_dir(self.path())
            .env_remove("STRETCH_HOME")
            .env_remove("STRETCH_IDENTITY");
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Run `stretch ARGS` in the folder.
    pub fn run(&self, args: &[&str]) -> Out {
        let out = self.command(args).output().expect("run stretch");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Nothing was recorded: no release, no history.
    #[track_caller]
    pub fn assert_nothing_recorded(&self) {
        let releases = self.run(&["releases", "--json"]).ok().json();
        assert_eq!(releases, serde_json::json!([]), "releases were recorded");
        let history = self.run(&["history", "--json"]).ok().json();
        assert_eq!(history, serde_json::json!([]), "history was recorded");
        let left: Vec<_> = std::fs::read_dir(self.home().join("releases"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "files left in releases/: {left:?}");
    }

    /// No release was recorded (a failed stage is in the history, with its log).
    #[track_caller]
    pub fn assert_no_release(&self) {
        let releases = self.run(&["releases", "--json"]).ok().json();
        assert_eq!(releases, serde_json::json!([]), "releases were recorded");
        let left: Vec<_> = std::fs::read_dir(self.home().join("releases"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "files left in releases/: {left:?}");
    }

    /// A one-node system at the root of a `path` source, with the test base image.
    pub fn one_node(&self, system: &str, registry: &str) {
        self.write(
            "system.yml",
            format!(
                "system: {system}\nregistry: {registry}\n{}sources:\n  - path: ./app\n",
                self.recipients(registry)
            ),
        );
        self.write("app/stretch.yml", "name: web\n");
        self.write(
            "app/Dockerfile",
            format!("{}COPY . /app\n", from_base(system)),
        );
    }
}

/// `FROM` the test base image, then a layer of this test's own: tests that build the
/// same Dockerfile in parallel must not share intermediate layers, or one test's
/// cleanup deletes a cached layer another test's build is using.
pub fn from_base(system: &str) -> String {
    format!("FROM {}\nENV STRETCH_TEST={system}\n", base_image())
}

/// Remove every image of a test's system when the test ends, pass or fail.
pub fn image_cleanup(system: &str) -> stretch_test::PrefixGuard {
    stretch_test::PrefixGuard(format!("{system}/"))
}

/// A `stretch agent` process on loopback, killed on drop; its containers (found by the
/// test's unique system label) are removed too. Its stderr goes to `agent.log` beside
/// its data, for assertions and for failure messages.
pub struct AgentProc {
    pub addr: String,
    pub proxy_ip: String,
    pub data_dir: PathBuf,
    token: String,
    /// `--token-file`; `None`: the token goes in `STRETCH_AGENT_TOKEN`.
    token_file: Option<PathBuf>,
    log_path: PathBuf,
    child: Option<std::process::Child>,
    system: String,
    /// More arguments of `stretch agent` (e.g. `--tls-cert`).
    pub extra_args: Vec<String>,
    /// More environment variables of `stretch agent` (e.g. `SSL_CERT_FILE`).
    pub extra_env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

static NEXT_IP: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A loopback address of its own for a host's proxies (127.0.0.2 … 127.0.0.254),
/// spread by process id so parallel test binaries rarely share one.
pub fn loopback_ip() -> String {
    let n = NEXT_IP.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let x = (std::process::id() * 7 + n) % 250 + 2;
    format!("127.0.0.{x}")
}

impl AgentProc {
    /// Start an agent with `token` (in a token file) and data in `dir`, labelled for
    /// cleanup by `system`.
    pub fn start(dir: &Path, token: &str, system: &str) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        AgentProc::launch(dir, token, Some(token_file), system, None, Vec::new())
    }

    /// Like [`AgentProc::start`], with more arguments.
    pub fn start_with(dir: &Path, token: &str, system: &str, extra: &[&str]) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        let extra = extra.iter().map(|s| s.to_string()).collect();
        AgentProc::launch(dir, token, Some(token_file), system, None, extra)
    }

    /// Like [`AgentProc::start_with`], with environment variables too.
    pub fn start_with_env(
        dir: &Path,
        token: &str,
        system: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        let mut a = AgentProc {
            addr: String::new(),
            proxy_ip: loopback_ip(),
            data_dir: dir.join("data"),
            token: token.to_string(),
            token_file: Some(token_file),
            log_path: dir.join("agent.log"),
            child: None,
            system: system.to_string(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: None,
        };
        a.spawn();
        a
    }

    /// Start an agent in a temp folder of its own, its token in `STRETCH_AGENT_TOKEN`.
    pub fn start_env_token(token: &str, system: &str) -> AgentProc {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        AgentProc::launch(&path, token, None, system, Some(dir), Vec::new())
    }

    fn launch(
        dir: &Path,
        token: &str,
        token_file: Option<PathBuf>,
        system: &str,
        owned: Option<tempfile::TempDir>,
        extra_args: Vec<String>,
    ) -> AgentProc {
        let mut a = AgentProc {
            addr: String::new(),
            proxy_ip: loopback_ip(),
            data_dir: dir.join("data"),
            token: token.to_string(),
            token_file,
            log_path: dir.join("agent.log"),
            child: None,
            system: system.to_string(),
            extra_args,
            extra_env: Vec::new(),
            _dir: owned,
        };
        a.spawn();
        a
    }

    /// Start the process (again) and wait for its ready line; a new port if the one
    /// picked was taken meanwhile.
    pub fn spawn(&mut self) {
        for _ in 0..5 {
            if self.addr.is_empty() {
                self.addr = format!("127.0.0.1:{}", stretch_test::free_port());
            }
            let log = std::fs::File::create(&self.log_path).unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_stretch"));
            cmd.args([
                "agent",
                "--listen",
                &self.addr,
                "--proxy-bind",
                &self.proxy_ip,
            ])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env_remove("STRETCH_AGENT_TOKEN")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
            match &self.token_file {
                Some(f) => cmd.arg("--token-file").arg(f),
                None => cmd.env("STRETCH_AGENT_TOKEN", &self.token),
            };
            self.child = Some(cmd.spawn().expect("starting stretch agent"));
            let ready = format!("agent listening on {}", self.addr);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let log = self.log();
                if log.contains(&ready) {
                    return;
                }
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    self.child = None;
                    if log.contains("cannot listen") {
                        self.addr.clear();
                        break;
                    }
                    panic!("the agent exited with {status}:\n{log}");
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the agent is not ready:\n{log}"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        panic!("the agent found no free port:\n{}", self.log());
    }

    /// What the agent printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn client(&self) -> stretch_core::agent::client::AgentClient {
        self.client_with_token(&self.token)
    }

    /// A client pinned to this agent's certificate, with another token.
    pub fn client_with_token(&self, token: &str) -> stretch_core::agent::client::AgentClient {
        stretch_core::agent::client::AgentClient::pinned(&self.addr, token, &self.fingerprint())
            .unwrap()
    }

    /// The agent's certificate fingerprint, `sha256:…`, as its log says.
    pub fn fingerprint(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .find_map(|l| l.strip_prefix("agent TLS certificate "))
            .unwrap_or_else(|| panic!("no fingerprint in the agent's log:\n{log}"));
        line.trim().to_string()
    }

    /// GET `path` of the agent's API over TLS (pinned), with `token` if any.
    pub async fn raw_get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n",
            self.addr
        );
        let text = tls_exchange(&self.addr, &self.fingerprint(), request.as_bytes())
            .await
            .unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, body.to_string())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn agent_id(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("agent-id"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `IP:PORT` of a group proxy of this agent.
    pub fn proxy(&self, listen: u16) -> String {
        format!("{}:{listen}", self.proxy_ip)
    }

    /// Kill the agent hard (its instances keep running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent ignored SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Start it again on the same address and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Ids of the running containers of this test's system.
    pub fn containers(system: &str) -> Vec<String> {
        let out = stretch_test::docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=stretch.system={system}"),
        ]);
        out.lines().map(String::from).collect()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
        // Its system's containers, and those of systems named after it (another
        // system a test deploys to the same agent, such as `{system}b`).
        let out = Command::new("docker")
            .args([
                "ps",
                "-a",
                "--filter",
                "label=stretch.system",
                "--format",
                "{{.ID}} {{.Label \"stretch.system\"}}",
            ])
            .output();
        if let Ok(out) = out {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(_, system)| system.starts_with(&self.system))
                .map(|(id, _)| id.to_string())
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

/// GET `http://addr/path` with a short timeout: `(status, body)`, or an error text.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response: {buf:?}"))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Send `request` over TLS to `addr` (trusting only `fingerprint`) and read the whole
/// answer.
pub async fn tls_exchange(addr: &str, fingerprint: &str, request: &[u8]) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let check = stretch_core::net::tls::PeerCheck::new(stretch_core::net::tls::Expect::Pinned(
        fingerprint.to_string(),
    ))
    .map_err(|e| e.to_string())?;
    let config = check.client_config().map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("stretch-agent")
        .map_err(|e| e.to_string())?
        .to_owned();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(request).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut out),
    )
    .await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
