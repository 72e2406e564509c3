//! `stretch serve`: the real binary on a free loopback port against a temp system —
//! tokens and sessions, builds and deploys through the API, the log over SSE (including
//! a client that drops it), 404s and 409s, the CLI with `--server`, and the web page
//! driven by headless Chromium through WebDriver (screenshots in `target/screenshots/`);
//! HTTPS and the CLI's trust in it, the plain-HTTP guard, slowed wrong tokens, and
//! idle connections.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::common::*;

pub const TOKEN: &str = "36d5efddd3a1eb05d34047f9f80bf30e9371b36166e63b87aca25d55d70fdc37";
const AGENT_TOKEN: &str = "98c3a55190c89e6ed7164d2a2adc78996f3ecab179b5b0a3373e08f73686e93f";
/// A second token of the server's file, base64 rather than hex.
const OTHER_TOKEN: &str = "n6wNI6vS02NyvxB77d3YslOLM-5W7VUWnsExT-dwz1g";

/// A `stretch serve` process, killed on drop.
pub struct Serve {
    pub addr: String,
    child: Child,
}

impl Serve {
    pub fn start(ctx: &Ctx) -> Serve {
        let token_file = ctx.write("server-token", format!("{OTHER_TOKEN}\n{TOKEN}\n"));
        let addr = format!("127.0.0.1:{}", stretch_test::free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_stretch"))
            .args(["serve", "--listen", &addr, "--token-file"])
            .arg(&token_file)
            .current_dir(ctx.path())
            .env_remove("STRETCH_HOME")
            .env_remove("STRETCH_SERVER")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start stretch serve");
        let s = Serve { addr, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&s.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "stretch serve at {} did not come up",
                s.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A request with the token; `(status, headers, body)`.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        request(
            &self.addr,
            method,
            path,
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            body.map(|b| b.to_string()),
        )
    }

    fn get(&self, path: &str) -> Value {
        let r = self.call("GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        r.json()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Resp {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    exchange(s, addr, method, path, headers, body)
}

/// One request on `s`, then its answer.
fn exchange<S: Read + Write>(
    mut s: S,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Resp {
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        if l.trim().is_empty() {
            break;
        }
        head.push_str(&l);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut resp = Resp {
        status,
        headers: head,
        body: String::new(),
    };
    let mut bytes = Vec::new();
    if let Some(n) = resp
        .header("content-length")
        .and_then(|n| n.parse::<usize>().ok())
    {
        bytes.resize(n, 0);
        reader.read_exact(&mut bytes).unwrap();
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).unwrap();
            bytes.extend_from_slice(&chunk[..n]);
        }
    } else if let Err(e) = reader.read_to_end(&mut bytes) {
        // A TLS peer may close without `close_notify`; the body is complete anyway.
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    resp.body = String::from_utf8_lossy(&bytes).into_owned();
    resp
}

/// A live SSE connection to a run's log.
struct Sse {
    reader: BufReader<TcpStream>,
}

impl Sse {
    fn open(addr: &str, run: i64) -> Sse {
        Sse::open_after(addr, run, 0)
    }

    /// Follow from after seq `after`, as a reconnecting client does.
    fn open_after(addr: &str, run: i64, after: i64) -> Sse {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "GET /api/runs/{run}/logs?follow=1&after={after} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "SSE status: {status}");
        loop {
            let mut l = String::new();
            reader.read_line(&mut l).unwrap();
            if l.trim().is_empty() {
                break;
            }
        }
        Sse { reader }
    }

    /// The next event: `(kind, data)`, or None at the end of the stream.
    fn next(&mut self) -> Option<(String, Value)> {
        let (mut kind, mut data) = (String::new(), String::new());
        loop {
            let mut l = String::new();
            if self.reader.read_line(&mut l).unwrap_or(0) == 0 {
                return None;
            }
            let l = l.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if !data.is_empty() {
                    return Some((kind, serde_json::from_str(&data).unwrap()));
                }
                continue;
            }
            if let Some(k) = l.strip_prefix("event:") {
                kind = k.trim().to_string();
            } else if let Some(d) = l.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
    }

    /// Every line until the `end` event: `(lines, end)`.
    fn until_end(&mut self) -> (Vec<Value>, Value) {
        self.until_end_with(&mut Vec::new())
    }

    /// [`Sse::until_end`], keeping the `progress` events in `progress`.
    fn until_end_with(&mut self, progress: &mut Vec<Value>) -> (Vec<Value>, Value) {
        let mut lines = Vec::new();
        while let Some((kind, data)) = self.next() {
            match kind.as_str() {
                "line" => lines.push(data),
                "progress" => progress.push(data),
                "end" => return (lines, data),
                _ => {}
            }
        }
        panic!(
            "the stream ended without an `end` event after {} lines",
            lines.len()
        );
    }
}

/// A one-node system whose build plugin prints `lines` lines, `delay` seconds apart,
/// with an environment `production` whose hosts are `agents`.
fn system(ctx: &Ctx, name: &str, lines: u32, delay: &str, agents: &[&AgentProc], listen: u16) {
    let hosts: String = agents
        .iter()
        .enumerate()
        .map(|(i, a)| format!("      h{i}: {{agent: {}}}\n", a.addr))
        .collect();
    let names: Vec<String> = (0..agents.len()).map(|i| format!("h{i}")).collect();
    let hosts = if hosts.is_empty() {
        "      h0: {agent: '127.0.0.1:9'}\n".to_string()
    } else {
        hosts
    };
    let names = if names.is_empty() {
        "h0".to_string()
    } else {
        names.join(", ")
    };
    ctx.write(
        "system.yml",
        format!(
            "system: {name}\nregistry: local\nsources:\n  - path: ./app\nenvironments:\n  production:\n    agent_token_file: ./agent-token\n    services: {{db: {{password: hunter2-secret}}}}\n    hosts:\n{hosts}    groups:\n      web: {{node: web, hosts: [{names}], listen: {listen}}}\n"
        ),
    );
    ctx.write("agent-token", AGENT_TOKEN);
    ctx.write(
        "app/stretch.yml",
        format!("name: web\nplugins:\n  exec: {{build: 'for i in $(seq 1 {lines}); do echo \"plugin line $i\"; sleep {delay}; done'}}\n"),
    );
    ctx.write(
        "app/container.yml",
        "port: 8080\nhealth: {path: /index.html, interval: 100ms, timeout: 8s}\nstop_timeout: 1s\n",
    );
    ctx.write("app/www/index.html", "hello\n");
    // Its own base layer: identical builds of two tests would share one image, and one
    // test's cleanup would remove it under the other's build.
    ctx.write(
        "app/Dockerfile",
        format!(
            "{}COPY www/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
            from_base(name)
        ),
    );
}

/// Start a build through the API: its run id.
fn start_build(s: &Serve) -> i64 {
    let r = s.call("POST", "/api/builds", None);
    assert_eq!(r.status, 202, "{r:?}");
    r.json()["run"].as_i64().unwrap()
}

#[test]
fn serve_needs_a_token() {
    let ctx = Ctx::new();
    ctx.one_node("notoken", "local");
    let out = ctx.run(&["serve", "--listen", "127.0.0.1:0"]);
    out.fails(
        2,
        &["`stretch serve` needs a token", "STRETCH_SERVER_TOKEN"],
    );
}

#[test]
fn weak_serve_tokens_are_refused_at_start() {
    let ctx = Ctx::new();
    ctx.one_node("weaktoken", "local");
    // Every token of the file is judged: a strong first one does not excuse the second.
    ctx.write("server-token", format!("{TOKEN}\n\nbench-token\n"));
    let out = ctx
        .run(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            "server-token",
        ])
        .fails(
            2,
            &[
                "line 3 of `server-token`",
                "too weak",
                "11 characters",
                "stretch keys token",
                "openssl rand -hex 32",
            ],
        );
    assert!(!out.stderr.contains("bench-token"), "{out}");
}

#[test]
fn tokens_sessions_and_cross_site_requests() {
    let ctx = Ctx::new();
    let name = unique("srv-auth");
    system(&ctx, &name, 1, "0", &[], stretch_test::free_port());
    let s = Serve::start(&ctx);
    let no = request(&s.addr, "GET", "/api/system", &[], None);
    assert_eq!(no.status, 401, "{no:?}");
    assert!(no.json()["error"].as_str().unwrap().contains("token"));
    assert_eq!(no.header("www-authenticate").as_deref(), Some("Bearer"));
    let wrong = request(
        &s.addr,
        "GET",
        "/api/system",
        &[("Authorization", "Bearer nope")],
        None,
    );
    assert_eq!(wrong.status, 401);
    let wrong = request(
        &s.addr,
        "POST",
        "/api/builds",
        &[("Authorization", &format!("Bearer {TOKEN}x"))],
        None,
    );
    assert_eq!(wrong.status, 401);
    // Every token of the file works.
    assert_eq!(
        request(
            &s.addr,
            "GET",
            "/api/releases",
            &[("Authorization", &format!("Bearer {OTHER_TOKEN}"))],
            None
        )
        .status,
        200
    );
    let sys = s.get("/api/system");
    assert_eq!(sys["system"], name.as_str());
    // Services (they may hold passwords) and tokens never leave the server.
    assert!(
        !sys.to_string().contains("hunter2") && !sys.to_string().contains(AGENT_TOKEN),
        "{sys}"
    );
    assert_eq!(
        sys["environments"][0]["hosts"][0]["reachable"], false,
        "{sys}"
    );
    // The page: 401 with the login form; a wrong token stays out.
    let page = request(&s.addr, "GET", "/", &[], None);
    assert_eq!(page.status, 401);
    assert!(page.body.contains("name=\"token\""), "{page:?}");
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let bad = request(&s.addr, "POST", "/login", &form, Some("token=nope".into()));
    assert_eq!(bad.status, 401);
    let cross = [form[0], ("Origin", "http://evil.example")];
    assert_eq!(
        request(
            &s.addr,
            "POST",
            "/login",
            &cross,
            Some(format!("token={TOKEN}"))
        )
        .status,
        403
    );
    let ok = request(
        &s.addr,
        "POST",
        "/login",
        &form,
        Some(format!("token={TOKEN}")),
    );
    assert_eq!(ok.status, 303, "{ok:?}");
    let cookie = ok.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = request(&s.addr, "GET", "/", &[("Cookie", &cookie)], None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains(&name));
    assert!(!page.body.contains("hunter2") && !page.body.contains(AGENT_TOKEN));
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    // With the cookie, state changes need the same origin and the CSRF token.
    let own = format!("http://{}", s.addr);
    let r = request(
        &s.addr,
        "POST",
        "/api/builds",
        &[("Cookie", &cookie), ("Origin", &own)],
        None,
    );
    assert_eq!(r.status, 403, "{r:?}");
    let r = request(
        &s.addr,
        "POST",
        "/api/builds",
        &[
            ("Cookie", &cookie),
            ("Origin", "http://evil.example"),
            ("X-CSRF-Token", &csrf),
        ],
        None,
    );
    assert_eq!(r.status, 403, "{r:?}");
    let r = request(
        &s.addr,
        "POST",
        "/actions/build",
        &[("Cookie", &cookie), form[0]],
        Some("csrf=wrong".into()),
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        s.get("/api/history").as_array().unwrap().is_empty(),
        "a refused request started something"
    );
    // The OpenAPI document describes every API route.
    let doc = s.get("/api/openapi.json");
    assert_eq!(doc["openapi"], "3.0.3");
    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/api/builds",
            "/api/environments",
            "/api/environments/{env}",
            "/api/environments/{env}/apply",
            "/api/environments/{env}/deploy",
            "/api/environments/{env}/rollback",
            "/api/history",
            "/api/openapi.json",
            "/api/releases",
            "/api/releases/{release}",
            "/api/runs/{id}",
            "/api/runs/{id}/logs",
            "/api/system",
        ]
    );
    // Logging out ends the session.
    let out = request(
        &s.addr,
        "POST",
        "/logout",
        &[("Cookie", &cookie), form[0], ("Origin", &own)],
        Some(format!("csrf={csrf}")),
    );
    assert_eq!(out.status, 303, "{out:?}");
    assert_eq!(
        request(&s.addr, "GET", "/api/system", &[("Cookie", &cookie)], None).status,
        401
    );
}

#[test]
fn build_through_the_api_while_a_follower_drops_the_log() {
    let ctx = Ctx::new();
    let name = unique("srv-build");
    let _images = image_cleanup(&name);
    system(&ctx, &name, 30, "0.05", &[], stretch_test::free_port());
    let s = Serve::start(&ctx);
    let run = start_build(&s);
    // One follower reads a few lines and hangs up; the build goes on.
    let mut quitter = Sse::open(&s.addr, run);
    let mut read = 0;
    while read < 3 {
        match quitter.next().unwrap().0.as_str() {
            "line" => read += 1,
            kind => assert_eq!(kind, "progress"),
        }
    }
    drop(quitter);
    let mut sse = Sse::open(&s.addr, run);
    let mut progress = Vec::new();
    let (lines, end) = sse.until_end_with(&mut progress);
    assert_eq!(end["status"], "succeeded", "{end}");
    // The bars of the running stage came along: the image's build steps at least.
    let rows: Vec<&Value> = progress
        .iter()
        .flat_map(|p| p["rows"].as_array().unwrap())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r["label"] == "image web" && r["text"].as_str().unwrap().starts_with("step ")),
        "no image steps in {progress:#?}"
    );
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    for want in [
        "==> pull",
        "==> images",
        "plugin line 1",
        "plugin line 30",
        "<== plugins done",
    ] {
        assert!(
            texts.iter().any(|t| t.starts_with(want)),
            "no {want:?} in {texts:#?}"
        );
    }
    let seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "lines out of order or missing: {seqs:?}"
    );
    let releases = s.get("/api/releases");
    assert_eq!(releases.as_array().unwrap().len(), 1);
    assert_eq!(end["release"], releases[0]["id"]);
    let detail = s.get(&format!("/api/runs/{run}"));
    assert_eq!(detail["status"], "succeeded");
    let stages: Vec<&str> = detail["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["pull", "decrypt", "archive", "images", "push", "plugins"]
    );
    assert!(
        detail["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "done")
    );
    // A client resuming after a seq gets the rest only.
    let (rest, _) = Sse::open_after(&s.addr, run, 5).until_end();
    assert_eq!(rest[0]["seq"], 6);
    assert_eq!(rest.len(), lines.len() - 5);
    // A finished run's stream is its whole log, then the end.
    let (again, end) = Sse::open(&s.addr, run).until_end();
    assert_eq!(
        (again.len(), &end["status"]),
        (lines.len(), &json!("succeeded"))
    );
    // The same sources again: the same release, reused.
    let run2 = start_build(&s);
    let (_, end) = Sse::open(&s.addr, run2).until_end();
    assert_eq!(end["status"], "succeeded");
    assert_eq!(s.get(&format!("/api/runs/{run2}"))["reused"], true);
}

#[test]
fn a_run_started_by_the_cli_streams_through_the_server() {
    let ctx = Ctx::new();
    let name = unique("srv-clirun");
    let _images = image_cleanup(&name);
    system(&ctx, &name, 30, "0.05", &[], stretch_test::free_port());
    let s = Serve::start(&ctx);
    std::thread::scope(|scope| {
        let build = scope.spawn(|| ctx.run(&["build"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        let run = loop {
            if let Some(id) = s.get("/api/history")[0]["id"].as_i64() {
                break id;
            }
            assert!(Instant::now() < deadline, "the CLI's run never showed up");
            std::thread::sleep(Duration::from_millis(20));
        };
        let (lines, end) = Sse::open(&s.addr, run).until_end();
        assert_eq!(end["status"], "succeeded", "{end}");
        let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
        assert!(texts.contains(&"plugin line 30"), "{texts:#?}");
        build.join().unwrap().ok();
    });
}

#[test]
fn unknown_things_are_404_with_a_message() {
    let ctx = Ctx::new();
    let name = unique("srv-404");
    system(&ctx, &name, 1, "0", &[], stretch_test::free_port());
    let s = Serve::start(&ctx);
    let cases = [
        (
            "POST",
            "/api/environments/staging/deploy",
            "unknown environment `staging`",
        ),
        (
            "POST",
            "/api/environments/staging/rollback",
            "unknown environment `staging`",
        ),
        (
            "POST",
            "/api/environments/staging/apply",
            "unknown environment `staging`",
        ),
        (
            "GET",
            "/api/environments/staging",
            "unknown environment `staging`",
        ),
        (
            "GET",
            "/api/releases/brave-otter",
            "unknown release `brave-otter`",
        ),
        ("GET", "/api/runs/4242", "unknown run `4242`"),
        ("GET", "/api/runs/4242/logs?follow=1", "unknown run `4242`"),
        ("GET", "/api/nothing-here", "no such page"),
    ];
    for (method, path, want) in cases {
        let r = s.call(method, path, None);
        assert_eq!(r.status, 404, "{method} {path}: {r:?}");
        assert!(
            r.json()["error"].as_str().unwrap().contains(want),
            "{method} {path}: {r:?}"
        );
    }
    let r = s.call(
        "POST",
        "/api/environments/production/deploy",
        Some(&json!({"release": "brave-otter"})),
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("unknown release `brave-otter`")
    );
    // Bad bodies are 400, and nothing was recorded.
    let r = s.call("POST", "/api/builds", Some(&json!({"sourcez": {}})));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `sourcez`")
    );
    let r = s.call("POST", "/api/environments/production/deploy", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.json()["error"].as_str().unwrap().contains("no releases"),
        "{r:?}"
    );
    assert!(s.get("/api/history").as_array().unwrap().is_empty());
}

#[test]
fn a_deploy_while_the_environment_is_busy_is_409_naming_the_holder() {
    let ctx = Ctx::new();
    let name = unique("srv-busy");
    let _images = image_cleanup(&name);
    system(&ctx, &name, 1, "0", &[], stretch_test::free_port());
    ctx.run(&["build"]).ok();
    let s = Serve::start(&ctx);
    // Hold the environment's lock as a deploy in another process would.
    std::fs::create_dir_all(ctx.home().join("locks")).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(ctx.home().join("locks/production.lock"))
        .unwrap();
    lock.lock().unwrap();
    let holder = json!({"pid": std::process::id(), "what": "deploy of test-holder (0123)", "since": "2026-01-01T00:00:00.000Z"});
    std::fs::write(ctx.home().join("locks/production.lock"), holder.to_string()).unwrap();
    for kind in ["deploy", "apply"] {
        let r = s.call(
            "POST",
            &format!("/api/environments/production/{kind}"),
            None,
        );
        assert_eq!(r.status, 409, "{kind}: {r:?}");
        let body = r.json();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("locked by deploy of test-holder (0123)"),
            "{body}"
        );
        assert_eq!(body["holder"]["what"], "deploy of test-holder (0123)");
    }
    let history = s.get("/api/history");
    assert_eq!(
        history.as_array().unwrap().len(),
        1,
        "only the build: {history}"
    );
    drop(lock);
}

/// A deploy refused because the environment is busy, and one of an unknown release:
/// through `--server` the CLI prints the same error, stage and help, and exits with the
/// same code, as it does on the server's own home.
#[test]
fn busy_and_unknown_release_read_the_same_through_the_server() {
    let ctx = Ctx::new();
    let name = unique("srv-same");
    let _images = image_cleanup(&name);
    system(&ctx, &name, 1, "0", &[], stretch_test::free_port());
    ctx.run(&["build"]).ok();
    let s = Serve::start(&ctx);
    let mut remote = Ctx::new();
    remote
        .env
        .push(("STRETCH_SERVER_TOKEN".into(), TOKEN.into()));
    let url = s.url();
    let both = |args: &[&str]| {
        let local = ctx.run(args);
        let mut through = vec!["--server", url.as_str()];
        through.extend_from_slice(args);
        (local, remote.run(&through))
    };

    let (local, through) = both(&["deploy", "production", "no-such-release"]);
    for out in [&local, &through] {
        assert_eq!(out.code, 2, "{out}");
        assert!(
            out.stderr.contains("unknown release `no-such-release`")
                && out.stderr.contains("`stretch releases` lists them"),
            "{out}"
        );
    }
    assert_eq!(
        local.stderr, through.stderr,
        "local:\n{local}\nthrough:\n{through}"
    );

    // Hold the environment's lock as a deploy in another process would.
    std::fs::create_dir_all(ctx.home().join("locks")).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(ctx.home().join("locks/production.lock"))
        .unwrap();
    lock.lock().unwrap();
    let holder = json!({"pid": std::process::id(), "what": "deploy of test-holder (0123)", "since": "2026-01-01T00:00:00.000Z"});
    std::fs::write(ctx.home().join("locks/production.lock"), holder.to_string()).unwrap();
    let (local, through) = both(&["deploy", "production"]);
    for out in [&local, &through] {
        assert_eq!(out.code, 1, "{out}");
        assert!(
            out.stderr.contains(
                "lock failed: environment `production` is locked by deploy of test-holder (0123)"
            ) && out.stderr.contains("pass `--wait`"),
            "{out}"
        );
    }
    assert_eq!(
        local.stderr, through.stderr,
        "local:\n{local}\nthrough:\n{through}"
    );
    // The answer itself says what kind of error it is.
    let r = s.call("POST", "/api/environments/production/deploy", None);
    assert_eq!(r.status, 409, "{r:?}");
    let body = r.json();
    assert_eq!(
        (&body["kind"], &body["stage"]),
        (&json!("busy"), &json!("lock")),
        "{body}"
    );
    let r = s.call("GET", "/api/releases/no-such-release", None);
    assert_eq!(
        (r.status, &r.json()["kind"]),
        (404, &json!("not_found")),
        "{r:?}"
    );
    drop(lock);
}

#[test]
fn deploy_through_the_api_and_the_environment_view() {
    let ctx = Ctx::new();
    let name = unique("srv-deploy");
    let _images = image_cleanup(&name);
    let agent = AgentProc::start(&ctx.path().join("agent"), AGENT_TOKEN, &name);
    system(&ctx, &name, 1, "0", &[&agent], stretch_test::free_port());
    let s = Serve::start(&ctx);
    let (_, end) = Sse::open(&s.addr, start_build(&s)).until_end();
    assert_eq!(end["status"], "succeeded", "{end}");
    let release = end["release"].as_str().unwrap().to_string();
    let r = s.call(
        "POST",
        "/api/environments/production/deploy",
        Some(&json!({"release": &release[..8]})),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let run = r.json()["run"].as_i64().unwrap();
    let (lines, end) = Sse::open(&s.addr, run).until_end();
    assert_eq!(end["status"], "succeeded", "{end} {lines:#?}");
    let env = s.get("/api/environments/production");
    assert_eq!(env["release"]["id"], release.as_str(), "{env}");
    let host = &env["hosts"][0];
    assert_eq!(
        (&host["reachable"], &host["groups"][0]["healthy"]),
        (&json!(true), &json!(true)),
        "{env}"
    );
    assert_eq!(host["groups"][0]["release"], release.as_str());
    let history = s.get("/api/history?environment=production");
    assert_eq!(history[0]["kind"], "deploy");
    assert_eq!(history[0]["status"], "succeeded");
    // Nothing changed in system.yml: apply has nothing to do.
    let r = s.call(
        "POST",
        "/api/environments/production/apply",
        Some(&json!({"dry_run": true})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["applied"], false);
}

#[test]
fn the_cli_with_server_builds_and_lists_releases() {
    let ctx = Ctx::new();
    let name = unique("srv-cli");
    let _images = image_cleanup(&name);
    system(&ctx, &name, 3, "0", &[], stretch_test::free_port());
    let s = Serve::start(&ctx);
    // From an empty folder: everything goes through the server.
    let mut remote = Ctx::new();
    remote
        .env
        .push(("STRETCH_SERVER_TOKEN".into(), TOKEN.into()));
    let url = s.url();
    let built = remote.run(&["--server", &url, "build", "--json"]).ok();
    let b = built.json();
    assert_eq!(b["reused"], false);
    assert!(
        built.stderr.contains("==> images") && built.stderr.contains("plugin line 3"),
        "{built}"
    );
    let releases = remote
        .run(&["--server", &url, "releases", "--json"])
        .ok()
        .json();
    assert_eq!(releases[0]["id"], b["id"]);
    assert_eq!(releases[0]["name"], b["name"]);
    let text = remote.run(&["--server", &url, "releases"]).ok();
    assert!(text.stdout.contains(b["name"].as_str().unwrap()), "{text}");
    let history = remote
        .run(&["--server", &url, "history", "--json"])
        .ok()
        .json();
    assert_eq!(
        (&history[0]["kind"], &history[0]["status"]),
        (&json!("build"), &json!("succeeded"))
    );
    let id = history[0]["id"].to_string();
    let logs = remote.run(&["--server", &url, "logs", &id]).ok();
    assert!(logs.stdout.contains("plugin line 2"), "{logs}");
    let logs = remote
        .run(&["--server", &url, "logs", &id, "--follow"])
        .ok();
    assert!(logs.stdout.contains("<== plugins done"), "{logs}");
    // The local home of the empty folder was never made.
    assert!(!remote.home().exists());
    // Errors keep their exit codes.
    remote
        .run(&["--server", &url, "deploy", "nowhere"])
        .fails(2, &["unknown environment `nowhere`"]);
    remote.env.clear();
    remote
        .env
        .push(("STRETCH_SERVER_TOKEN".into(), "wrong".into()));
    remote
        .run(&["--server", &url, "releases"])
        .fails(2, &["the server rejected the token"]);
}

// ---------------------------------------------------------------------------------------
// transport security: TLS, the plain-HTTP guard, slowed wrong tokens, idle connections

/// A strong token (64 hex), as operators are told to make them.
const STRONG: &str = "4f8a1c2e9b7d6053a1e4c8f2b9d07e6a5c3f1b8d2e4a6c9f0b7e5d3a1c8f6b2e";

/// A `stretch serve` started with `args` (after `serve`), its stderr kept in a file;
/// `addr` is a loopback address to reach it, from its ready line.
struct Server {
    addr: String,
    url: String,
    log: PathBuf,
    child: Child,
}

impl Server {
    fn launch(ctx: &Ctx, args: &[&str]) -> Server {
        let token_file = ctx.write("strong-token", format!("{STRONG}\n"));
        let log = ctx.path().join(format!("serve-{}.log", unique("log")));
        let child = Command::new(env!("CARGO_BIN_EXE_stretch"))
            .arg("serve")
            .args(args)
            .arg("--token-file")
            .arg(&token_file)
            .current_dir(ctx.path())
            .env_remove("STRETCH_HOME")
            .env_remove("STRETCH_SERVER")
            .env_remove("STRETCH_SERVER_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start stretch serve");
        let mut s = Server {
            addr: String::new(),
            url: String::new(),
            log,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let prefix = "stretch serve: listening on ";
        loop {
            let log = s.log();
            if let Some(line) = log.lines().find(|l| l.starts_with(prefix)) {
                s.url = line[prefix.len()..].trim().to_string();
                let hostport = s.url.split("://").nth(1).unwrap().to_string();
                s.addr = hostport
                    .replace("0.0.0.0:", "127.0.0.1:")
                    .replace("[::]:", "127.0.0.1:");
                return s;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("stretch serve ended ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "no ready line:\n{log}");
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The certificate fingerprint the server announced.
    fn fingerprint(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.starts_with("stretch serve: certificate sha256:"))
            .unwrap_or_else(|| panic!("no fingerprint line:\n{log}"));
        line.split_whitespace().nth(3).unwrap().to_string()
    }

    /// One request over TLS, trusting only the certificate `fingerprint`.
    fn https(
        &self,
        fingerprint: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Resp {
        use stretch_core::net::tls::{Expect, PeerCheck};
        let check = PeerCheck::new(Expect::Pinned(fingerprint.to_string())).unwrap();
        let config = std::sync::Arc::new(check.client_config().unwrap());
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = rustls::ClientConnection::new(config, name).unwrap();
        let tcp = TcpStream::connect(&self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        exchange(
            rustls::StreamOwned::new(tls, tcp),
            &self.addr,
            method,
            path,
            headers,
            body,
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files of a test CA and a certificate it signed for 127.0.0.1 and localhost:
/// `(ca.pem, cert.pem, key.pem, the certificate's fingerprint)`.
fn ca_signed_cert(ctx: &Ctx) -> (PathBuf, PathBuf, PathBuf, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "stretch test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (
        ctx.write("tls/ca.pem", ca_cert.pem()),
        ctx.write("tls/cert.pem", leaf.pem()),
        ctx.write("tls/key.pem", key.serialize_pem()),
        stretch_core::net::tls::fingerprint(leaf.der()),
    )
}

/// A self-signed certificate marked as an authority, as `openssl req -x509` makes them:
/// `(cert.pem, key.pem)`.
fn self_signed_ca_flagged(ctx: &Ctx) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.self_signed(&key).unwrap();
    (
        ctx.write("tls/self.pem", cert.pem()),
        ctx.write("tls/self-key.pem", key.serialize_pem()),
    )
}

#[test]
fn serve_over_tls_and_the_cli_trusts_it_by_ca_or_fingerprint() {
    let ctx = Ctx::new();
    let name = unique("srv-tls");
    system(&ctx, &name, 1, "0", &[], stretch_test::free_port());
    let (ca, cert, key, fp) = ca_signed_cert(&ctx);
    let port = stretch_test::free_port();
    let listen = format!("127.0.0.1:{port}");
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let s = Server::launch(
        &ctx,
        &[
            "--listen",
            &listen,
            "--tls-cert",
            cert_s,
            "--tls-key",
            key_s,
        ],
    );
    assert_eq!(s.url, format!("https://{listen}"));
    assert_eq!(s.fingerprint(), fp);
    let bearer = format!("Bearer {STRONG}");
    let r = s.https(
        &fp,
        "GET",
        "/api/releases",
        &[("Authorization", &bearer)],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!([]));
    // Plain HTTP to the TLS port gets no answer.
    let mut plain = TcpStream::connect(&s.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(plain, "GET /api/releases HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = String::new();
    let _ = plain.read_to_string(&mut got);
    assert!(!got.contains("200 OK"), "{got}");
    // The login cookie only travels over TLS.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let ok = s.https(
        &fp,
        "POST",
        "/login",
        &form,
        Some(format!("token={STRONG}")),
    );
    assert_eq!(ok.status, 303, "{ok:?}");
    let cookie = ok.header("set-cookie").unwrap();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );

    // The CLI, from an empty folder.
    let url = s.url.clone();
    let cli = |env: &[(&str, &str)], extra: &[&str]| {
        let mut remote = Ctx::new();
        remote
            .env
            .push(("STRETCH_SERVER_TOKEN".into(), STRONG.into()));
        for (k, v) in env {
            remote.env.push((k.to_string(), v.to_string()));
        }
        let mut args = vec!["--server", &url];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["releases", "--json"]);
        remote.run(&args)
    };
    let ca_s = ca.to_str().unwrap();
    assert_eq!(cli(&[], &["--server-ca", ca_s]).ok().json(), json!([]));
    assert_eq!(
        cli(&[("STRETCH_SERVER_CA", ca_s)], &[]).ok().json(),
        json!([])
    );
    assert_eq!(
        cli(&[("STRETCH_SERVER_FINGERPRINT", &fp)], &[]).ok().json(),
        json!([])
    );
    // As openssl prints it: upper case, colons.
    let openssl_style = format!(
        "SHA256:{}",
        fp["sha256:".len()..]
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":")
    );
    cli(&[("STRETCH_SERVER_FINGERPRINT", &openssl_style)], &[]).ok();
    // A pin wins over a CA: a wrong pin is refused, naming both fingerprints.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = cli(
        &[("STRETCH_SERVER_FINGERPRINT", &wrong)],
        &["--server-ca", ca_s],
    );
    out.fails(1, &[&url, &wrong, &fp, "STRETCH_SERVER_FINGERPRINT"]);
    // Neither: the test CA is nobody's.
    cli(&[], &[]).fails(1, &[&url, "not trusted", "--server-ca"]);
    cli(&[("STRETCH_SERVER_FINGERPRINT", "sha256:abc")], &[])
        .fails(2, &["STRETCH_SERVER_FINGERPRINT", "64 hex"]);
    let missing = ctx.path().join("nope.pem");
    cli(&[], &["--server-ca", missing.to_str().unwrap()]).fails(2, &["nope.pem"]);
    // The token never reaches the server's log.
    assert!(!s.log().contains(STRONG), "{}", s.log());
    drop(s);

    // `--server-ca` may also be the server's own self-signed certificate, even marked
    // as an authority (as `openssl req -x509` makes it).
    let (own, own_key) = self_signed_ca_flagged(&ctx);
    let listen = format!("127.0.0.1:{}", stretch_test::free_port());
    let own_s = own.to_str().unwrap();
    let s = Server::launch(
        &ctx,
        &[
            "--listen",
            &listen,
            "--tls-cert",
            own_s,
            "--tls-key",
            own_key.to_str().unwrap(),
        ],
    );
    let mut remote = Ctx::new();
    remote
        .env
        .push(("STRETCH_SERVER_TOKEN".into(), STRONG.into()));
    remote
        .run(&[
            "--server",
            &s.url,
            "--server-ca",
            own_s,
            "releases",
            "--json",
        ])
        .ok();
    remote
        .run(&[
            "--server",
            &s.url,
            "--server-ca",
            ca_s,
            "releases",
            "--json",
        ])
        .fails(1, &["not trusted"]);
}

#[test]
fn plain_http_only_on_loopback_unless_insecure_http() {
    let ctx = Ctx::new();
    let name = unique("srv-plain");
    system(&ctx, &name, 1, "0", &[], stretch_test::free_port());
    let token_file = ctx.write("strong-token", format!("{STRONG}\n"));
    let tf = token_file.to_str().unwrap();
    for listen in ["0.0.0.0:0", "[::]:0"] {
        ctx.run(&["serve", "--listen", listen, "--token-file", tf])
            .fails(2, &["without TLS", "--tls-cert", "--insecure-http"]);
    }
    let (_, cert, key, _) = ca_signed_cert(&ctx);
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    for half in [["--tls-cert", cert], ["--tls-key", key]] {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--token-file", tf];
        args.extend_from_slice(&half);
        ctx.run(&args).fails(2, &["--tls-"]);
    }
    // A key that is not the certificate's.
    let other = Ctx::new();
    let (_, _, other_key, _) = ca_signed_cert(&other);
    ctx.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        tf,
        "--tls-cert",
        cert,
        "--tls-key",
        other_key.to_str().unwrap(),
    ])
    .fails(2, &["do not fit"]);
    // Refused listens created nothing.
    assert!(!ctx.home().exists(), "a refused serve made the home");
    // `localhost` is loopback; `--insecure-http` opens the rest.
    let s = Server::launch(&ctx, &["--listen", "localhost:0"]);
    assert!(s.url.starts_with("http://"), "{}", s.url);
    drop(s);
    let port = stretch_test::free_port();
    let s = Server::launch(
        &ctx,
        &["--listen", &format!("0.0.0.0:{port}"), "--insecure-http"],
    );
    assert_eq!(s.url, format!("http://0.0.0.0:{port}"));
    let bearer = format!("Bearer {STRONG}");
    let r = request(
        &s.addr,
        "GET",
        "/api/releases",
        &[("Authorization", &bearer)],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    // Over plain HTTP the cookie cannot be `Secure` (browsers would drop it).
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let ok = request(
        &s.addr,
        "POST",
        "/login",
        &form,
        Some(format!("token={STRONG}")),
    );
    assert_eq!(ok.status, 303, "{ok:?}");
    assert!(!ok.header("set-cookie").unwrap().contains("Secure"));
}

#[test]
fn wrong_tokens_are_answered_slower_and_never_logged() {
    let ctx = Ctx::new();
    let name = unique("srv-backoff");
    system(&ctx, &name, 1, "0", &[], stretch_test::free_port());
    let s = Server::launch(&ctx, &["--listen", "127.0.0.1:0"]);
    let wrong = "0e1d2c3b4a5968778695a4b3c2d1e0f00e1d2c3b4a5968778695a4b3c2d1e0f0";
    let timed = |token: &str| {
        let t = Instant::now();
        let bearer = format!("Bearer {token}");
        let r = request(
            &s.addr,
            "GET",
            "/api/releases",
            &[("Authorization", &bearer)],
            None,
        );
        (r.status, t.elapsed())
    };
    let mut times = Vec::new();
    for _ in 0..4 {
        let (status, took) = timed(wrong);
        assert_eq!(status, 401);
        times.push(took);
    }
    assert!(
        times[3] >= Duration::from_millis(400),
        "the 4th wrong token was answered in {:?} ({times:?})",
        times[3]
    );
    assert!(times[3] > times[0], "{times:?}");
    // A right token right after is answered at once, and forgives the address.
    let (status, took) = timed(STRONG);
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_millis(300),
        "the right token took {took:?}"
    );
    // The login form counts too.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let t = Instant::now();
    let bad = request(
        &s.addr,
        "POST",
        "/login",
        &form,
        Some(format!("token={wrong}")),
    );
    assert_eq!(bad.status, 401);
    assert!(bad.body.contains("wrong token"), "{bad:?}");
    assert!(t.elapsed() >= Duration::from_millis(100));
    // No credentials at all (a browser before logging in) costs nothing.
    let t = Instant::now();
    assert_eq!(request(&s.addr, "GET", "/", &[], None).status, 401);
    assert!(t.elapsed() < Duration::from_millis(300));
    let log = s.log();
    assert!(
        log.contains("stretch serve: failed authentication from 127.0.0.1 (4 in a row)"),
        "{log}"
    );
    assert_eq!(
        log.matches("failed authentication from 127.0.0.1 (1 in a row)")
            .count(),
        2,
        "the right token did not reset the count, or the form failure was not counted:\n{log}"
    );
    assert!(!log.contains(wrong) && !log.contains(STRONG), "{log}");
}

#[test]
fn idle_connections_do_not_starve_an_authenticated_request() {
    let ctx = Ctx::new();
    let name = unique("srv-idle");
    system(&ctx, &name, 1, "0", &[], stretch_test::free_port());
    let s = Server::launch(&ctx, &["--listen", "127.0.0.1:0"]);
    let held: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&s.addr).unwrap())
        .collect();
    // One more trickles half a request head.
    let mut slow = TcpStream::connect(&s.addr).unwrap();
    slow.write_all(b"GET /api/releases HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let bearer = format!("Bearer {STRONG}");
    let r = request(
        &s.addr,
        "GET",
        "/api/releases",
        &[("Authorization", &bearer)],
        None,
    );
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        took < Duration::from_secs(1),
        "answered in {took:?} with {} idle connections",
        held.len()
    );
    drop(held);
}

// ---------------------------------------------------------------------------------------
// the browser

/// A `chromedriver` process in its own process group, which is killed (with the
/// browsers it started) on drop.
struct Driver {
    addr: String,
    child: Child,
    session: Option<String>,
}

impl Driver {
    fn start() -> Driver {
        use std::os::unix::process::CommandExt;
        let port = stretch_test::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver (`scripts/install-test-deps` installs Debian's chromium-driver)");
        let mut d = Driver {
            addr: format!("127.0.0.1:{port}"),
            child,
            session: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&d.addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"],
            },
        }}});
        let r = d.cmd("POST", "/session", Some(caps));
        d.session = Some(
            r["sessionId"]
                .as_str()
                .unwrap_or_else(|| panic!("no session: {r}"))
                .to_string(),
        );
        d
    }

    /// One WebDriver command: the `value` of its answer.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = match &self.session {
            Some(s) if path != "/session" => format!("/session/{s}{path}"),
            _ => path.to_string(),
        };
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let r = request(&self.addr, method, &path, &[], body.map(|b| b.to_string()));
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|_| panic!("webdriver {method} {path}: {r:?}"));
        assert_eq!(r.status, 200, "webdriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    /// Run a script in the page: its result.
    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn element(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.cmd("POST", &format!("/element/{e}/click"), None);
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        );
    }

    /// Wait until `script` returns true.
    fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.js(script) != json!(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        use base64_png::decode;
        let data = self.cmd("GET", "/screenshot", None);
        let png = decode(data.as_str().unwrap());
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.cmd("DELETE", "", None)
            }));
        }
        // chromedriver and every browser process it started share its process group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots")
}

/// The screenshot comes as base64: a small decoder, to need no crate for it.
mod base64_png {
    pub fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        let bytes: Vec<u8> = s
            .bytes()
            .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
            .map(val)
            .collect();
        let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
        for chunk in bytes.chunks(4) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, v)| n | (u32::from(*v) << (18 - 6 * i)));
            out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
        }
        out
    }
}

#[test]
fn the_browser_logs_in_builds_and_watches_the_log_arrive() {
    let ctx = Ctx::new();
    let name = unique("srv-web");
    let _images = image_cleanup(&name);
    let agent = AgentProc::start(&ctx.path().join("agent"), AGENT_TOKEN, &name);
    system(&ctx, &name, 40, "0.1", &[&agent], stretch_test::free_port());
    let s = Serve::start(&ctx);
    let d = Driver::start();
    d.go(&s.url());
    d.wait_for(
        "the login form",
        "return !!document.getElementById('token')",
    );
    d.screenshot("login.png");
    d.type_into("#token", TOKEN);
    d.click("#login");
    d.wait_for(
        "the system page",
        "return !!document.getElementById('build')",
    );
    assert_eq!(
        d.js("return document.querySelectorAll('tr.release').length"),
        json!(0)
    );
    d.click("#build");
    d.wait_for("the run page", "return !!document.getElementById('log')");
    assert!(
        d.js("return location.pathname")
            .as_str()
            .unwrap()
            .starts_with("/runs/")
    );
    // Lines arrive while the build runs.
    d.wait_for(
        "plugin lines",
        "return document.getElementById('log').textContent.includes('plugin line 5')",
    );
    let running = d.js("return [document.getElementById('status').textContent, document.querySelectorAll('#log .line').length]");
    assert_eq!(
        running[0], "running",
        "the build ended before its lines were watched: {running}"
    );
    d.screenshot("run-live.png");
    d.wait_for(
        "the end of the build",
        "return document.getElementById('status').textContent !== 'running'",
    );
    let status = d.js("return document.getElementById('status').textContent");
    assert_eq!(status, "succeeded");
    let after = d
        .js("return document.querySelectorAll('#log .line').length")
        .as_u64()
        .unwrap();
    assert!(
        after > running[1].as_u64().unwrap(),
        "no line arrived after the first look"
    );
    let stages = d.js("return Array.from(document.querySelectorAll('#stages li')).map(l => l.dataset.name + ':' + l.className)");
    assert_eq!(
        stages,
        json!([
            "pull:done",
            "decrypt:done",
            "archive:done",
            "images:done",
            "push:done",
            "plugins:done"
        ])
    );
    assert!(
        d.js("return document.getElementById('log').textContent")
            .as_str()
            .unwrap()
            .contains("plugin line 40")
    );
    d.screenshot("run.png");
    // The release is on the system page; deploy it from there and watch that too.
    d.go(&s.url());
    d.wait_for(
        "the release",
        "return document.querySelectorAll('tr.release').length === 1",
    );
    let release = s.get("/api/releases")[0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        d.js("return document.getElementById('releases').textContent")
            .as_str()
            .unwrap()
            .contains(&release)
    );
    d.click("#deploy");
    d.wait_for("the deploy's end", "return !!document.getElementById('status') && document.getElementById('status').textContent !== 'running'");
    assert_eq!(
        d.js("return document.getElementById('status').textContent"),
        "succeeded"
    );
    d.screenshot("run-deploy.png");
    d.go(&s.url());
    d.wait_for(
        "the system page",
        "return !!document.getElementById('build')",
    );
    let env = d
        .js("return document.getElementById('env-production').textContent")
        .as_str()
        .unwrap()
        .to_string();
    assert!(env.contains(&release), "{env}");
    let badges = d.js("return ['reachable', 'healthy', 'unreachable', 'unhealthy'].map(c => document.querySelectorAll('#env-production .badge.' + c).length)");
    assert_eq!(badges, json!([1, 1, 0, 0]), "{env}");
    d.screenshot("system.png");
}
