//! `stretch agent`: the real binary on loopback, driven through `AgentClient`, with the
//! real Docker engine and tiny busybox app images (one per "release").
//!
//! Every test has its own system name (containers are labelled with it and removed by
//! a guard), its own images (removed by an `ImageGuard`), free ports and its own
//! 127.0.0.x proxy address, so tests run in parallel with each other and with other
//! test binaries.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use stretch_core::agent::api::{
    GroupKey, GroupSpec, HealthSpec, ReleaseRef, Switch, config_version,
};
use stretch_core::agent::client::{AgentClient, AgentError};
use stretch_test::{ImageGuard, base_image, docker, free_port, unique, write};

use crate::common::AgentProc;

const TOKEN: &str = "742a56f30d5757e4392cb1279775d012466e430b3f00a89399d10c5c5a6fd712";

// ---------------------------------------------------------------------------------------
// support

/// Removes every container labelled with the test's system when dropped.
struct Containers(String);

impl Containers {
    /// `docker ps` of this system: (id, state, release label), sorted by id.
    fn list(&self) -> Vec<(String, String, String)> {
        let out = docker(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=stretch.system={}", self.0),
            "--format",
            "{{.ID}} {{.State}} {{.Label \"stretch.release\"}}",
        ]);
        let mut v: Vec<_> = out
            .lines()
            .filter_map(|l| {
                let mut p = l.split_whitespace();
                Some((
                    p.next()?.to_string(),
                    p.next()?.to_string(),
                    p.next().unwrap_or("").to_string(),
                ))
            })
            .collect();
        v.sort();
        v
    }

    fn running(&self) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|(_, state, _)| state == "running")
            .map(|(id, _, _)| id)
            .collect()
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=stretch.system={}", self.0))
            .output();
        if let Ok(out) = out {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from)
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

/// Build `tag` from the base image plus `body` (Dockerfile lines).
fn build_image(images: &mut ImageGuard, tag: &str, body: &str) {
    build_image_with(images, tag, body, &[]);
}

/// [`build_image`] with `files` (name, content) in the build context.
fn build_image_with(images: &mut ImageGuard, tag: &str, body: &str, files: &[(&str, &str)]) {
    images.add(tag);
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        write(dir.path(), name, content);
    }
    write(
        dir.path(),
        "Dockerfile",
        // A layer of this image's own: parallel tests must not share cached layers.
        format!("FROM {}\nENV STRETCH_TEST={tag}\n{body}\n", base_image()),
    );
    let out = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(dir.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker build {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An app image whose `/` answers `text`.
fn app_image(images: &mut ImageGuard, tag: &str, text: &str) {
    build_image(
        images,
        tag,
        &format!(
            "RUN mkdir -p /www && printf '{text}' > /www/index.html\n\
             CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]"
        ),
    );
}

/// Like [`app_image`], for an app that takes a second to start listening (as real apps
/// do): traffic sent to it before it is healthy would fail.
fn slow_app_image(images: &mut ImageGuard, tag: &str, text: &str) {
    build_image(
        images,
        tag,
        &format!(
            "RUN mkdir -p /www && printf '{text}' > /www/index.html\n\
             CMD [\"sh\", \"-c\", \"sleep 1; exec httpd -f -p 8080 -h /www\"]"
        ),
    );
}

fn spec(system: &str, image: &str, release: &str, listen: Option<u16>) -> GroupSpec {
    let mut s = GroupSpec {
        key: GroupKey {
            system: system.to_string(),
            environment: "test".to_string(),
            group: "web".to_string(),
        },
        host: "host-1".to_string(),
        node: "web".to_string(),
        release: ReleaseRef {
            id: release.to_string(),
            name: format!("name-{release}"),
            created_at: "2024-01-01T00:00:00Z".to_string(),
        },
        existing_release: None,
        image: image.to_string(),
        image_id: None,
        pull: false,
        instances: 2,
        listen,
        port: Some(8080),
        health: HealthSpec {
            path: "/".to_string(),
            interval_ms: 100,
            timeout_ms: 15_000,
        },
        reload: None,
        reload_signal: None,
        stop_timeout_ms: Some(2_000),
        response_timeout_ms: None,
        config: json!({}),
        config_version: String::new(),
        templates: BTreeMap::new(),
        environment_name: "test".to_string(),
        secrets: BTreeMap::new(),
        domains: vec![],
        tls: None,
    };
    s.config_version = config_version(&s.config, &s.templates);
    s
}

fn configure(mut s: GroupSpec, config: serde_json::Value, templates: &[(&str, &str)]) -> GroupSpec {
    s.config = config;
    s.templates = templates
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.config_version = config_version(&s.config, &s.templates);
    s
}

fn switch_of(s: &GroupSpec) -> Switch {
    Switch {
        release_id: s.release.id.clone(),
        config_version: s.config_version.clone(),
    }
}

/// PUT then switch; panics with the agent's log on failure.
async fn deploy(client: &AgentClient, s: &GroupSpec, agent: &AgentProc) {
    client
        .put_spec(s)
        .await
        .unwrap_or_else(|e| panic!("PUT: {e}\n{}", agent.log()));
    let status = client
        .switch(&s.key, &switch_of(s))
        .await
        .unwrap_or_else(|e| panic!("switch: {e}\n{}", agent.log()));
    assert!(status.healthy, "{status:?}");
    assert_eq!(status.release.as_ref(), Some(&s.release));
}

/// A GET with a fresh connection (HTTP/1.0).
fn get(addr: &str) -> Result<(u16, String), String> {
    stretch_test::http_get(addr, "/").map_err(|e| e.to_string())
}

/// GET until it answers 200, for at most 10 s.
fn get_ok(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(addr) {
            Ok((200, body)) => return body,
            other => assert!(Instant::now() < deadline, "GET {addr}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.1 keep-alive client: one connection, many requests.
struct KeepAlive {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
    pub connections: usize,
}

impl KeepAlive {
    fn new(addr: &str) -> KeepAlive {
        KeepAlive {
            addr: addr.to_string(),
            conn: None,
            connections: 0,
        }
    }

    fn get(&mut self) -> Result<(u16, String), String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.addr).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            self.conn = Some(BufReader::new(s));
            self.connections += 1;
        }
        let result = self.exchange();
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn exchange(&mut self) -> Result<(u16, String), String> {
        let err = |e: std::io::Error| e.to_string();
        let conn = self.conn.as_mut().ok_or("no connection")?;
        write!(
            conn.get_mut(),
            "GET / HTTP/1.1\r\nHost: {}\r\n\r\n",
            self.addr
        )
        .map_err(err)?;
        let mut line = String::new();
        conn.read_line(&mut line).map_err(err)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            let mut h = String::new();
            conn.read_line(&mut h).map_err(err)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').ok_or("bad header")?;
            let (name, value) = (name.to_ascii_lowercase(), value.trim().to_ascii_lowercase());
            match name.as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value == "close",
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                conn.read_line(&mut size).map_err(err)?;
                let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
                let mut chunk = vec![0; n + 2];
                conn.read_exact(&mut chunk).map_err(err)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            conn.read_exact(&mut body).map_err(err)?;
        } else {
            conn.read_to_end(&mut body).map_err(err)?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// What a hammering thread saw.
#[derive(Debug, Default)]
struct Hammered {
    requests: usize,
    failures: Vec<String>,
    bodies: Vec<String>,
}

/// Threads that GET the proxy continuously until stopped: one opening a connection
/// per request, one keeping its connection alive.
struct Hammer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Hammered>>,
}

impl Hammer {
    fn start(addr: &str, allowed: &[&str]) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        let threads = (0..2)
            .map(|kind| {
                let (stop, addr, allowed) = (stop.clone(), addr.to_string(), allowed.clone());
                std::thread::spawn(move || {
                    let mut seen = Hammered::default();
                    let mut keep = KeepAlive::new(&addr);
                    while !stop.load(Ordering::Relaxed) {
                        let result = if kind == 0 { get(&addr) } else { keep.get() };
                        seen.requests += 1;
                        match result {
                            Ok((200, body)) if allowed.contains(&body) => {
                                if seen.bodies.last() != Some(&body) {
                                    seen.bodies.push(body);
                                }
                            }
                            other => seen.failures.push(format!("{other:?}")),
                        }
                    }
                    seen
                })
            })
            .collect();
        Hammer { stop, threads }
    }

    fn finish(self) -> Vec<Hammered> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("hammer thread"))
            .collect()
    }
}

fn exec(container: &str, script: &str) -> String {
    docker(&["exec", container, "sh", "-c", script])
}

fn exec_fails(container: &str, script: &str) -> bool {
    !Command::new("docker")
        .args(["exec", container, "sh", "-c", script])
        .output()
        .unwrap()
        .status
        .success()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------------------
// tests

#[test]
fn missing_token_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stretch"))
        .args(["agent", "--listen", "127.0.0.1:1", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("STRETCH_AGENT_TOKEN")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no agent token"), "{stderr}");
    assert!(stderr.contains("STRETCH_AGENT_TOKEN"), "{stderr}");

    let empty = write(dir.path(), "empty.token", "\n");
    let out = Command::new(env!("CARGO_BIN_EXE_stretch"))
        .args(["agent", "--listen", "127.0.0.1:1", "--token-file"])
        .arg(&empty)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is empty"), "{stderr}");
}

#[test]
fn weak_tokens_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let weak = "s3cret-agent-token";
    let file = write(dir.path(), "weak.token", format!("{weak}\n"));
    let run = |token_file: Option<&Path>, env_token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stretch"));
        cmd.args(["agent", "--listen", "127.0.0.1:1", "--data-dir"])
            .arg(dir.path().join("data"))
            .env_remove("STRETCH_AGENT_TOKEN")
            .env("NO_COLOR", "1");
        if let Some(f) = token_file {
            cmd.arg("--token-file").arg(f);
        }
        if let Some(t) = env_token {
            cmd.env("STRETCH_AGENT_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("too weak"), "{stderr}");
        assert!(stderr.contains("stretch keys token"), "{stderr}");
        assert!(!stderr.contains(weak), "the token is echoed: {stderr}");
        stderr
    };
    let stderr = run(Some(&file), None);
    assert!(stderr.contains("weak.token"), "{stderr}");
    assert!(stderr.contains("18 characters; at least 22"), "{stderr}");
    // 31 hex digits: 124 bits.
    let stderr = run(None, Some(&TOKEN[..31]));
    assert!(stderr.contains("STRETCH_AGENT_TOKEN"), "{stderr}");
    assert!(stderr.contains("31 hex digits"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "the agent started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_is_401_and_changes_nothing() {
    let system = unique("agent-auth");
    let _containers = Containers(system.clone());
    let agent = AgentProc::start_env_token(TOKEN, &system);
    assert_eq!(mode(&agent.data_dir), 0o700);

    let wrong = agent.client_with_token("not-the-token");
    let err = wrong.state().await.unwrap_err();
    assert_eq!(
        err,
        AgentError::Unauthorized {
            addr: agent.addr.clone()
        }
    );
    assert_eq!(
        err.to_string(),
        format!("agent at {} rejected the token", agent.addr)
    );
    let s = spec(&system, &base_image(), "r1", None);
    assert!(matches!(
        wrong.put_spec(&s).await,
        Err(AgentError::Unauthorized { .. })
    ));
    assert!(matches!(
        wrong.switch(&s.key, &switch_of(&s)).await,
        Err(AgentError::Unauthorized { .. })
    ));
    assert!(matches!(
        wrong.remove_group(&s.key).await,
        Err(AgentError::Unauthorized { .. })
    ));
    // A token that is a prefix of the right one is wrong too.
    let prefix = agent.client_with_token(&TOKEN[..TOKEN.len() - 1]);
    assert!(matches!(
        prefix.state().await,
        Err(AgentError::Unauthorized { .. })
    ));

    // No header at all, on real routes and an unknown one: 401 with an error body.
    let activity = format!("{}/activity", s.key.path());
    for path in ["/v1/state", activity.as_str(), "/nope"] {
        let (status, body) = agent.raw_get(path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("token"), "{body}");
    }

    let state = agent.client().state().await.unwrap();
    assert!(state.groups.is_empty(), "{state:?}");
    assert!(_containers.list().is_empty());
    assert!(!agent.log().contains(TOKEN), "the token is logged");

    // With the token, an unknown route is a 404 and a switch without spec a 404.
    let err = agent
        .client()
        .switch(&s.key, &switch_of(&s))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Failed { status: 404, message, .. } if message.contains("PUT one first")),
        "{err:?}"
    );
}

/// An image whose `/cgi-bin/slow` answers `slow TEXT` after 6 s.
fn slow_request_image(images: &mut ImageGuard, tag: &str, text: &str) {
    build_image(
        images,
        tag,
        &format!(
            "RUN mkdir -p /www/cgi-bin && echo {text} > /www/index.html\n\
             RUN printf '#!/bin/sh\\nsleep 6\\necho Content-Type: text/plain\\necho\\necho slow {text}\\n' \
             > /www/cgi-bin/slow && chmod +x /www/cgi-bin/slow\n\
             CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]"
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_finishes_before_its_instance_stops() {
    let system = unique("agent-slow");
    let mut images = ImageGuard::new();
    // Declared after the images: dropped first, so the images are no longer in use.
    let _containers = Containers(system.clone());
    let (v1, v2) = (format!("{system}:v1"), format!("{system}:v2"));
    slow_request_image(&mut images, &v1, "v1");
    slow_request_image(&mut images, &v2, "v2");
    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();
    let listen = free_port();
    let proxy = agent.proxy(listen);
    // The app stops fast (1 s): that must not cut a request still being answered.
    let mut one = spec(&system, &v1, "r1", Some(listen));
    one.stop_timeout_ms = Some(1_000);
    deploy(&client, &one, &agent).await;
    assert_eq!(get_ok(&proxy), "v1\n");

    let slow = {
        let proxy = proxy.clone();
        std::thread::spawn(move || stretch_test::http_get(&proxy, "/cgi-bin/slow"))
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut two = spec(&system, &v2, "r2", Some(listen));
    two.stop_timeout_ms = Some(1_000);
    deploy(&client, &two, &agent).await;
    assert_eq!(get_ok(&proxy), "v2\n");
    let answer = slow.join().unwrap().map_err(|e| e.to_string());
    assert_eq!(
        answer,
        Ok((200, "slow v1\n".to_string())),
        "{}",
        agent.log()
    );
}

/// An app that answers `text` over plain HTTP and switches `GET /ws` to an echo
/// protocol that first says `text`, as a WebSocket server switches: busybox `nc` runs
/// the script for each connection.
fn upgrading_app_image(images: &mut ImageGuard, tag: &str, text: &str) {
    let script = format!(
        "#!/bin/sh\n\
         read -r line\n\
         while read -r h; do [ \"${{#h}}\" -le 1 ] && break; done\n\
         case \"$line\" in\n\
         \"GET /ws \"*) printf 'HTTP/1.1 101 Switching Protocols\\r\\nConnection: upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n{text}\\n'; exec cat;;\n\
         *) printf 'HTTP/1.0 200 OK\\r\\nContent-Length: {}\\r\\nConnection: close\\r\\n\\r\\n{text}\\n';;\n\
         esac\n",
        text.len() + 1
    );
    build_image_with(
        images,
        tag,
        "COPY serve.sh /serve.sh\nRUN chmod +x /serve.sh\nCMD [\"nc\", \"-ll\", \"-p\", \"8080\", \"-e\", \"/serve.sh\"]",
        &[("serve.sh", &script)],
    );
}

/// Open an upgraded (`Upgrade: echo`) connection through `proxy`; returns it with the
/// response head and the app's first line.
fn open_upgraded(proxy: &str) -> (TcpStream, String, String) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        head.push_str(&line);
    }
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    // Everything the app sent so far was consumed by the reader; later bytes come
    // through `s` again.
    (s, head.to_ascii_lowercase(), first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_are_tunnelled_and_end_with_their_instance() {
    let system = unique("agent-upgrade");
    let mut images = ImageGuard::new();
    let _containers = Containers(system.clone());
    let (v1, v2) = (format!("{system}:v1"), format!("{system}:v2"));
    upgrading_app_image(&mut images, &v1, "v1");
    upgrading_app_image(&mut images, &v2, "v2");
    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();
    let listen = free_port();
    let proxy = agent.proxy(listen);
    deploy(&client, &spec(&system, &v1, "r1", Some(listen)), &agent).await;
    assert_eq!(get_ok(&proxy), "v1\n");

    let (mut tunnel, head, first) = open_upgraded(&proxy);
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("upgrade: echo") && head.contains("connection: upgrade"),
        "{head}"
    );
    assert_eq!(first, "v1\n");
    tunnel.write_all(b"ping\n").unwrap();
    let mut echoed = [0u8; 5];
    tunnel.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping\n");

    // A new release: the open tunnel does not hold the drain, and it ends when its old
    // instance stops; a new one reaches the new release.
    deploy(&client, &spec(&system, &v2, "r2", Some(listen)), &agent).await;
    assert!(
        !agent.log().contains("still had requests in flight"),
        "{}",
        agent.log()
    );
    if let Err(e) = tunnel.read_to_end(&mut Vec::new()) {
        // A timeout here means the tunnel outlived its instance.
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    let (_, head, first) = open_upgraded(&proxy);
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(first, "v2\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_without_downtime_rollback_and_delete() {
    let system = unique("agent-switch");
    let mut images = ImageGuard::new();
    // Declared after the images: dropped first, so the images are no longer in use.
    let containers = Containers(system.clone());
    let (v1, v2) = (format!("{system}:v1"), format!("{system}:v2"));
    app_image(&mut images, &v1, "v1");
    slow_app_image(&mut images, &v2, "v2");
    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();
    let listen = free_port();
    let proxy = agent.proxy(listen);

    let one = spec(&system, &v1, "r1", Some(listen));
    let prepared = client.put_spec(&one).await.unwrap();
    assert_eq!(
        prepared.image_id,
        docker(&["image", "inspect", "--format", "{{.Id}}", &v1])
    );
    let state = client.state().await.unwrap();
    assert_eq!(state.groups.len(), 1);
    assert_eq!(state.groups[0].release, None, "PUT changes nothing running");
    assert!(containers.list().is_empty());
    deploy(&client, &one, &agent).await;
    assert_eq!(get_ok(&proxy), "v1");
    let v1_ids = containers.running();
    assert_eq!(v1_ids.len(), 2);
    let state = client.state().await.unwrap();
    let group = &state.groups[0];
    assert!(group.healthy, "{group:?}");
    assert_eq!(group.listen, Some(listen));
    assert_eq!(group.instances.len(), 2);
    assert!(
        group
            .instances
            .iter()
            .all(|i| i.state == "running" && i.healthy && i.release_id == "r1")
    );
    let pid = agent.pid();

    // Switch to release 2 while clients hammer the proxy.
    let hammer = Hammer::start(&proxy, &["v1", "v2"]);
    std::thread::sleep(Duration::from_millis(300));
    let two = spec(&system, &v2, "r2", Some(listen));
    let started = Instant::now();
    deploy(&client, &two, &agent).await;
    let switch_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let seen = hammer.finish();
    let requests: usize = seen.iter().map(|s| s.requests).sum();
    let failures: Vec<&String> = seen.iter().flat_map(|s| &s.failures).collect();
    eprintln!(
        "zero downtime: {requests} requests during a {switch_time:?} switch, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(
        requests > 100,
        "too few requests to mean anything: {requests}"
    );
    for s in &seen {
        // Each client saw v1, then v2, and never v1 again: the switch is atomic.
        assert_eq!(s.bodies, ["v1", "v2"], "{s:?}");
    }
    assert!(seen[1].requests > 1, "{:?}", seen[1]);
    assert_eq!(get_ok(&proxy), "v2");

    // The old instances are stopped and kept; a rollback reuses them.
    let list = containers.list();
    let stopped: Vec<_> = list.iter().filter(|c| c.1 != "running").collect();
    assert_eq!(stopped.len(), 2, "{list:?}");
    assert!(stopped.iter().all(|c| c.2 == "r1" && v1_ids.contains(&c.0)));
    deploy(&client, &one, &agent).await;
    assert_eq!(get_ok(&proxy), "v1");
    assert_eq!(containers.running(), v1_ids, "the kept instances came back");
    assert_eq!(containers.list().len(), 4);

    // A third release: release 2 and 1 stay kept, nothing older exists.
    let three = spec(&system, &v2, "r3", Some(listen));
    deploy(&client, &three, &agent).await;
    let list = containers.list();
    assert_eq!(list.len(), 6, "{list:?}");
    let r1 = list.iter().filter(|c| c.2 == "r1").count();
    assert_eq!(r1, 2);
    let three_b = spec(&system, &v1, "r4", Some(listen));
    deploy(&client, &three_b, &agent).await;
    let mut releases: Vec<_> = containers.list().into_iter().map(|c| c.2).collect();
    releases.sort();
    assert_eq!(
        releases,
        ["r1", "r1", "r3", "r3", "r4", "r4"],
        "r2 was pruned"
    );

    if let Some(kib) = rss_kib(pid) {
        eprintln!("agent RSS after four switches: {} KiB", kib);
    }

    // DELETE stops everything and closes the proxy.
    client.remove_group(&one.key).await.unwrap();
    assert!(containers.list().is_empty(), "{:?}", containers.list());
    assert!(
        TcpStream::connect(&proxy).is_err(),
        "the proxy still listens"
    );
    assert!(client.state().await.unwrap().groups.is_empty());
    assert!(
        std::fs::read_dir(agent.data_dir.join("instances"))
            .unwrap()
            .next()
            .is_none(),
        "instance folders are left"
    );
    client.remove_group(&one.key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_release_fails_and_the_old_one_keeps_serving() {
    let system = unique("agent-unhealthy");
    let mut images = ImageGuard::new();
    // Declared after the images: dropped first, so the images are no longer in use.
    let containers = Containers(system.clone());
    let (good, hangs, dies) = (
        format!("{system}:good"),
        format!("{system}:hangs"),
        format!("{system}:dies"),
    );
    app_image(&mut images, &good, "good");
    build_image(&mut images, &hangs, "CMD [\"sleep\", \"3600\"]");
    build_image(
        &mut images,
        &dies,
        "CMD [\"sh\", \"-c\", \"echo boom: missing setting >&2; exit 3\"]",
    );
    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();
    let listen = free_port();
    let proxy = agent.proxy(listen);
    let first = spec(&system, &good, "r1", Some(listen));
    deploy(&client, &first, &agent).await;
    let serving = containers.running();

    let mut bad = spec(&system, &hangs, "r2", Some(listen));
    bad.health.timeout_ms = 1_500;
    client.put_spec(&bad).await.unwrap();
    let hammer = Hammer::start(&proxy, &["good"]);
    let err = client.switch(&bad.key, &switch_of(&bad)).await.unwrap_err();
    let seen = hammer.finish();
    let text = err.to_string();
    assert!(
        matches!(err, AgentError::Failed { status: 500, .. }),
        "{err:?}"
    );
    assert!(text.contains("not healthy within 1.5s"), "{text}");
    assert!(
        text.contains("instance 0") || text.contains("instance 1"),
        "{text}"
    );
    assert!(seen.iter().all(|s| s.failures.is_empty()), "{seen:?}");
    assert_eq!(get_ok(&proxy), "good");
    assert_eq!(containers.running(), serving);
    assert_eq!(containers.list().len(), 2, "the new instances are gone");
    let state = client.state().await.unwrap();
    assert_eq!(state.groups[0].release.as_ref().unwrap().id, "r1");
    assert!(state.groups[0].healthy);

    let crash = spec(&system, &dies, "r3", Some(listen));
    client.put_spec(&crash).await.unwrap();
    let err = client
        .switch(&crash.key, &switch_of(&crash))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("boom: missing setting"),
        "the app's output: {err}"
    );
    assert_eq!(containers.list().len(), 2, "{:?}", containers.list());
    assert_eq!(get_ok(&proxy), "good");

    // A switch to something else than the pending spec is a conflict.
    let err = client
        .switch(&first.key, &switch_of(&bad))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Failed { status: 409, .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_and_config_are_mounted_read_only() {
    let system = unique("agent-files");
    let mut images = ImageGuard::new();
    // Declared after the images: dropped first, so the images are no longer in use.
    let containers = Containers(system.clone());
    let web = format!("{system}:web");
    let worker = format!("{system}:worker");
    app_image(&mut images, &web, "web");
    build_image(&mut images, &worker, "CMD [\"sleep\", \"3600\"]");
    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();

    let mut s = spec(&system, &web, "r1", None);
    s.instances = 1;
    s.existing_release = Some(ReleaseRef {
        id: "r0".into(),
        name: "older".into(),
        created_at: "2023-01-01T00:00:00Z".into(),
    });
    let s = configure(
        s,
        json!({"greeting": "hello", "db": {"port": 5432}}),
        &[
            (
                "app.conf.jinja",
                "{{ config.greeting }} from {{ node.name }} on {{ host.name }} #{{ instance.index }} \
                 in {{ environment }}: {{ release.name }} after {{ existing_release.name }}\n",
            ),
            ("sub/plain.txt", "port {{ config.db.port }}\n"),
        ],
    );
    deploy(&client, &s, &agent).await;
    let ids = containers.running();
    assert_eq!(ids.len(), 1);
    let id = &ids[0];
    assert_eq!(
        exec(id, "cat /stretch/templates/app.conf"),
        "hello from web on host-1 #0 in test: name-r1 after older"
    );
    assert_eq!(
        exec(id, "cat /stretch/templates/sub/plain.txt"),
        "port 5432"
    );
    assert_eq!(
        exec(id, "cd /stretch/templates && find . -type f | sort"),
        "./app.conf\n./sub/plain.txt"
    );
    let config: serde_json::Value =
        serde_json::from_str(&exec(id, "cat /stretch/config.json")).unwrap();
    assert_eq!(config, s.config);
    assert!(exec_fails(id, "echo x > /stretch/config.json"));
    assert!(exec_fails(id, "touch /stretch/templates/new"));
    assert_eq!(exec(id, "echo $STRETCH_RELEASE_ID"), "r1");

    let labels: serde_json::Value = serde_json::from_str(&docker(&[
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        id,
    ]))
    .unwrap();
    for (k, v) in [
        ("stretch.system", system.as_str()),
        ("stretch.environment", "test"),
        ("stretch.group", "web"),
        ("stretch.node", "web"),
        ("stretch.release", "r1"),
        ("stretch.host", "host-1"),
        ("stretch.config", s.config_version.as_str()),
        ("stretch.instance", "0"),
        ("stretch.agent", agent.agent_id().as_str()),
    ] {
        assert_eq!(labels[k], v, "label {k}: {labels}");
    }
    let ports = docker(&["port", id]);
    assert!(ports.starts_with("8080/tcp -> 127.0.0.1:"), "{ports}");

    // A template error fails the PUT and changes nothing.
    let broken = configure(
        spec(&system, &web, "r9", None),
        json!({}),
        &[("x.jinja", "{{ config.nope }}")],
    );
    let err = client.put_spec(&broken).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Failed { status: 400, message, .. }
            if message.contains("templates/x.jinja") && message.contains("config.nope")),
        "{err:?}"
    );

    // A worker: no port, no proxy, healthy while it runs.
    let mut w = spec(&system, &worker, "r1", None);
    w.key.group = "worker".into();
    w.node = "worker".into();
    w.port = None;
    w.instances = 1;
    let w = configure(w, json!({}), &[]);
    deploy(&client, &w, &agent).await;
    let state = client.state().await.unwrap();
    assert_eq!(state.groups.len(), 2);
    assert!(state.groups.iter().all(|g| g.healthy), "{state:?}");

    // Secrets may be in config.json: the state file is private.
    assert_eq!(mode(&agent.data_dir.join("state.json")), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_readopts_without_touching_and_removes_orphans() {
    let system = unique("agent-restart");
    let mut images = ImageGuard::new();
    // Declared after the images: dropped first, so the images are no longer in use.
    let containers = Containers(system.clone());
    let v1 = format!("{system}:v1");
    app_image(&mut images, &v1, "v1");
    let mut agent = AgentProc::start_env_token(TOKEN, &system);
    let listen = free_port();
    let proxy = agent.proxy(listen);
    let one = spec(&system, &v1, "r1", Some(listen));
    deploy(&agent.client(), &one, &agent).await;
    assert_eq!(get_ok(&proxy), "v1");
    let ids = containers.running();
    let started_at = |id: &str| docker(&["inspect", "--format", "{{.State.StartedAt}}", id]);
    let starts: Vec<String> = ids.iter().map(|i| started_at(i)).collect();

    // Idle memory and the proxy's added latency, while we are here.
    std::thread::sleep(Duration::from_millis(500));
    if let Some(kib) = rss_kib(agent.pid()) {
        eprintln!("agent idle RSS: {kib} KiB");
        assert!(kib < 40 * 1024, "agent idle RSS {kib} KiB");
    }
    let direct_port = docker(&["port", &ids[0], "8080/tcp"]);
    let direct = direct_port.trim().to_string();
    let median = |addr: &str| {
        let mut times: Vec<Duration> = (0..300)
            .map(|_| {
                let t = Instant::now();
                let (status, _) = get(addr).unwrap();
                assert_eq!(status, 200);
                t.elapsed()
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    };
    let (d, p) = (median(&direct), median(&proxy));
    eprintln!(
        "median GET: direct {d:?}, through the proxy {p:?}, added {:?}",
        p.saturating_sub(d)
    );

    // kill -9 while idle; an orphan appears meanwhile (and a stray folder).
    agent.kill();
    assert!(TcpStream::connect(&proxy).is_err());
    let orphan = docker(&[
        "run",
        "-d",
        "--label",
        &format!("stretch.agent={}", agent.agent_id()),
        "--label",
        &format!("stretch.system={system}"),
        &base_image(),
        "sleep",
        "3600",
    ]);
    std::fs::create_dir_all(agent.data_dir.join("instances/stray")).unwrap();
    // A container of another agent sharing the engine is not ours to touch.
    let foreign = docker(&[
        "run",
        "-d",
        "--label",
        "stretch.agent=someone-else",
        "--label",
        &format!("stretch.system={system}"),
        &base_image(),
        "sleep",
        "3600",
    ]);

    agent.spawn();
    assert_eq!(get_ok(&proxy), "v1", "the proxy is back");
    let mut running = containers.running();
    running.retain(|id| id != &foreign);
    assert_eq!(running, ids, "same containers, orphan removed");
    let now: Vec<String> = ids.iter().map(|i| started_at(i)).collect();
    assert_eq!(now, starts, "the apps were not restarted");
    assert!(!containers.list().iter().any(|c| c.0 == orphan));
    assert!(containers.list().iter().any(|c| c.0 == foreign));
    assert!(!agent.data_dir.join("instances/stray").exists());
    let state = agent.client().state().await.unwrap();
    assert!(state.groups[0].healthy, "{state:?}");
    assert!(
        agent.log().contains("removing orphan container"),
        "{}",
        agent.log()
    );

    // SIGTERM: a clean exit, instances keep running, and they are adopted again.
    let status = agent.terminate();
    assert!(status.success(), "{status}\n{}", agent.log());
    let mut running = containers.running();
    running.retain(|id| id != &foreign);
    assert_eq!(running, ids);
    agent.spawn();
    assert_eq!(get_ok(&proxy), "v1");
    let hammer = Hammer::start(&proxy, &["v1"]);
    std::thread::sleep(Duration::from_millis(300));
    let seen = hammer.finish();
    assert!(seen.iter().all(|s| s.failures.is_empty()), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_updates_reload_or_replace() {
    let system = unique("agent-config");
    let mut images = ImageGuard::new();
    // Declared after the images: dropped first, so the images are no longer in use.
    let containers = Containers(system.clone());
    let app = format!("{system}:app");
    // Serves the rendered template; `reload` copies it again.
    build_image(
        &mut images,
        &app,
        "CMD [\"sh\", \"-c\", \"mkdir -p /www && cp /stretch/templates/* /www/ && exec httpd -f -p 8080 -h /www\"]",
    );
    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();
    let listen = free_port();
    let proxy = agent.proxy(listen);
    let mut base = spec(&system, &app, "r1", Some(listen));
    base.reload = Some(
        [
            "sh",
            "-c",
            "if grep -q broken /stretch/config.json; then echo refusing >&2; exit 3; fi; cp /stretch/templates/* /www/",
        ]
        .map(String::from)
        .to_vec(),
    );
    let with = |greeting: &str, s: &GroupSpec| {
        configure(
            s.clone(),
            json!({ "greeting": greeting }),
            &[("index.html.jinja", "{{ config.greeting }}")],
        )
    };
    let one = with("one", &base);
    deploy(&client, &one, &agent).await;
    assert_eq!(get_ok(&proxy), "one");
    let ids = containers.running();

    // `reload`: same containers, new files.
    let two = with("two", &base);
    let status = client.update_config(&two).await.unwrap();
    assert_eq!(
        status.config_version.as_deref(),
        Some(two.config_version.as_str())
    );
    assert!(
        status
            .instances
            .iter()
            .all(|i| i.config_version == two.config_version)
    );
    assert_eq!(containers.running(), ids);
    for _ in 0..10 {
        assert_eq!(get_ok(&proxy), "two");
    }

    // A failing `reload`: the old files are back, the error says why.
    let broken = with("broken", &base);
    let err = client.update_config(&broken).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, AgentError::Failed { status: 500, .. }),
        "{err:?}"
    );
    assert!(
        text.contains("exited with 3") && text.contains("refusing"),
        "{text}"
    );
    for id in &ids {
        assert_eq!(exec(id, "cat /stretch/templates/index.html"), "two");
        assert!(exec(id, "cat /stretch/config.json").contains("\"two\""));
    }
    assert_eq!(get_ok(&proxy), "two");
    let state = client.state().await.unwrap();
    assert_eq!(
        state.groups[0].config_version.as_deref(),
        Some(two.config_version.as_str())
    );

    // Another release is not a config update.
    let other = with("two", &spec(&system, &app, "r2", Some(listen)));
    let err = client.update_config(&other).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Failed { status: 409, .. }),
        "{err:?}"
    );

    // No `reload`: the instances are replaced, without downtime.
    let mut plain = base.clone();
    plain.reload = None;
    let three = with("three", &plain);
    let hammer = Hammer::start(&proxy, &["two", "three"]);
    std::thread::sleep(Duration::from_millis(200));
    let status = client.update_config(&three).await.unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let seen = hammer.finish();
    assert!(status.healthy, "{status:?}");
    assert!(seen.iter().all(|s| s.failures.is_empty()), "{seen:?}");
    assert!(
        seen.iter().all(|s| s.bodies == ["two", "three"]),
        "{seen:?}"
    );
    let now = containers.running();
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|id| !ids.contains(id)), "replaced");
    assert_eq!(get_ok(&proxy), "three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_instances_leave_the_rotation_and_come_back() {
    let system = unique("agent-rotation");
    let mut images = ImageGuard::new();
    // Declared after the images: dropped first, so the images are no longer in use.
    let containers = Containers(system.clone());
    let v1 = format!("{system}:v1");
    app_image(&mut images, &v1, "v1");
    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();
    let listen = free_port();
    let proxy = agent.proxy(listen);
    let one = spec(&system, &v1, "r1", Some(listen));
    deploy(&client, &one, &agent).await;
    let ids = containers.running();
    assert_eq!(ids.len(), 2);

    // One instance starts answering 404: after two failed checks it gets no traffic.
    exec(&ids[0], "mv /www/index.html /www/gone.html");
    let deadline = Instant::now() + Duration::from_secs(10);
    let group = loop {
        let group = client.state().await.unwrap().groups.remove(0);
        if !group.healthy {
            break group;
        }
        assert!(Instant::now() < deadline, "{group:?}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let sick: Vec<_> = group.instances.iter().filter(|i| !i.healthy).collect();
    assert_eq!(sick.len(), 1, "{group:?}");
    assert_eq!(sick[0].container, ids[0]);
    for _ in 0..50 {
        assert_eq!(get(&proxy), Ok((200, "v1".to_string())));
    }

    // Both sick: nothing to send traffic to.
    exec(&ids[1], "mv /www/index.html /www/gone.html");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(&proxy) {
            Ok((503, _)) => break,
            Ok((200 | 404, _)) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Recovered: back in the rotation.
    for id in &ids {
        exec(id, "mv /www/gone.html /www/index.html");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.state().await.unwrap().groups[0].healthy {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get_ok(&proxy), "v1");
    assert!(agent.log().contains("left the rotation"), "{}", agent.log());

    // A container the engine restarts (maybe on another host port) comes back too.
    let before = docker(&["port", &ids[0], "8080/tcp"]);
    docker(&["restart", "-t", "0", &ids[0]]);
    let after = docker(&["port", &ids[0], "8080/tcp"]);
    eprintln!("restarted instance: {before} -> {after}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.state().await.unwrap().groups[0].healthy {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..20 {
        assert_eq!(get(&proxy), Ok((200, "v1".to_string())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_pulls_the_image_from_its_registry() {
    let system = unique("agent-pull");
    let mut images = ImageGuard::new();
    // Declared after the images: dropped first, so the images are no longer in use.
    let _containers = Containers(system.clone());
    let registry = stretch_test::Registry::start();
    let local = format!("{system}:v1");
    app_image(&mut images, &local, "v1");
    let remote = format!("{}/{system}/web:r1", registry.addr);
    images.add(&remote);
    docker(&["tag", &local, &remote]);
    docker(&["push", "-q", &remote]);
    docker(&["rmi", &remote]);

    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();
    let mut s = spec(&system, &remote, "r1", None);
    s.pull = true;
    let prepared = client.put_spec(&s).await.unwrap();
    assert_eq!(
        prepared.image_id,
        docker(&["image", "inspect", "--format", "{{.Id}}", &remote])
    );
    assert!(
        agent.log().contains(&format!("pulling {remote}")),
        "{}",
        agent.log()
    );

    // Not pulled and not there; pulled from nowhere: clear errors, nothing pending.
    let absent = format!("{}/{system}/web:none", registry.addr);
    let mut s2 = spec(&system, &absent, "r2", None);
    let err = client.put_spec(&s2).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "image {absent} is not in this host's Docker engine"
        )),
        "{err}"
    );
    s2.pull = true;
    s2.image = format!("127.0.0.1:{}/{system}/web:r2", free_port());
    let err = client.put_spec(&s2).await.unwrap_err().to_string();
    assert!(err.contains(&format!("pulling {}", s2.image)), "{err}");
    let state = client.state().await.unwrap();
    assert_eq!(state.groups[0].release, None);
    let pending = std::fs::read_to_string(agent.data_dir.join("state.json")).unwrap();
    assert!(
        pending.contains(&remote) && !pending.contains(&absent),
        "{pending}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_template_fails_its_own_put_while_the_agent_serves() {
    let system = unique("agent-fuel");
    let mut images = ImageGuard::new();
    let _containers = Containers(system.clone());
    let web = format!("{system}:web");
    app_image(&mut images, &web, "web");
    let agent = AgentProc::start_env_token(TOKEN, &system);
    let client = agent.client();
    let listen = free_port();
    let mut good = spec(&system, &web, "r1", Some(listen));
    good.instances = 1;
    deploy(&client, &good, &agent).await;
    let proxy = format!("{}:{listen}", agent.proxy_ip);
    assert_eq!(get_ok(&proxy), "web");

    // Another group: 64 instances whose template is heavy (within bounds) for all but
    // the last, which loops (nearly) forever. The PUT renders them all before failing.
    let mut bad = spec(&system, &web, "r2", None);
    bad.key.group = "worker".into();
    bad.instances = 64;
    let bad = configure(
        bad,
        json!({}),
        &[(
            "loop.conf.jinja",
            "{% if instance.index < 63 %}{% for i in range(300) %}{% for j in range(300) %}{% endfor %}{% endfor %}\n\
             {% else %}{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}{% endif %}\n",
        )],
    );
    let started = Instant::now();
    let put = {
        let client = agent.client();
        let bad = bad.clone();
        tokio::spawn(async move { client.put_spec(&bad).await })
    };
    // Meanwhile the agent answers at once, and the other group serves.
    let (mut answered, mut slowest) = (0, Duration::ZERO);
    while !put.is_finished() {
        let asked = Instant::now();
        let state = client.state().await.unwrap();
        assert_eq!(state.groups.len(), 1, "{state:?}");
        assert_eq!(get(&proxy), Ok((200, "web".to_string())));
        slowest = slowest.max(asked.elapsed());
        answered += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let err = put.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, AgentError::Failed { status: 400, message, .. }
            if message.contains("templates/loop.conf.jinja") && message.contains("too much work")),
        "{err:?}"
    );
    eprintln!("PUT failed after {took:?}; {answered} answers meanwhile, slowest {slowest:?}");
    assert!(
        answered > 0,
        "the PUT ended before the agent was asked ({took:?})"
    );
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    assert!(agent.log().len() < 1_000_000);

    // More than 64 instances is refused outright.
    let mut many = bad.clone();
    many.instances = 65;
    let err = client.put_spec(&many).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Failed { status: 400, message, .. }
            if message.contains("between 1 and 64, not 65")),
        "{err:?}"
    );
    // Nothing of the worker group was kept; the web group still serves.
    let state = client.state().await.unwrap();
    assert_eq!(state.groups.len(), 1, "{state:?}");
    assert_eq!(get_ok(&proxy), "web");
}
