//! `stretch dev ENV`: the real binary watching a system's `path:` source, with a real
//! agent on loopback and the real Docker engine: a changed template, a changed app file
//! and Dockerfile, and a broken build file are each served (or not) as they should be,
//! and SIGINT stops the loop with exit 0 and no process left behind.

use std::io::Read;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::*;
use super::deploy::World;

/// A generous bound for one edit to be served (the goal is seconds, see bench-dev).
const DEADLINE: Duration = Duration::from_secs(60);

/// `stretch dev production` running in a world; killed (SIGKILL) if the test fails.
struct Dev {
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Dev {
    fn start(w: &World, extra: &[&str]) -> Dev {
        let mut args = vec!["dev", "production", "--debounce-ms", "100"];
        args.extend_from_slice(extra);
        let mut child = w
            .ctx
            .command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stretch dev");
        let collect = |mut r: Box<dyn Read + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let t = text.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    t.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            text
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Dev {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Wait until the output (stdout and stderr) holds `needle` `times` times.
    #[track_caller]
    fn wait_output(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.output().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} (x{times}) in time:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT; the loop must end with exit 0, leaving no process of its own behind.
    #[track_caller]
    fn interrupt(mut self) -> String {
        let mut child = self.child.take().unwrap();
        let tree = descendants(child.id());
        let ok = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "dev ignored SIGINT:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the reader threads take the last bytes.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(status.code(), Some(0), "dev's exit:\n{}", self.output());
        for pid in tree {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "process {pid} of dev outlived it"
            );
        }
        let out = self.output();
        assert!(out.contains("dev: stopped"), "{out}");
        out
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every process descended from `pid` now (from /proc).
fn descendants(pid: u32) -> Vec<u32> {
    let parent_of = |p: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut out = vec![];
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &c in &all {
            if parent_of(c) == Some(p) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// Poll `path` of host 0's proxy until its body satisfies `want`.
#[track_caller]
fn wait_served(w: &World, dev: &Dev, path: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok((200, body)) = http_get(&w.proxy(0), path)
            && want(&body)
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} not served as expected in time (last: {:?}):\n{}",
            http_get(&w.proxy(0), path),
            dev.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dev_serves_a_changed_template() {
    let w = World::new("devtpl", 1, false);
    let dev = Dev::start(&w, &["--json"]);
    // The first cycle builds and deploys what the sources are.
    wait_served(&w, &dev, "/index.html", |b| b.contains("hello on h0"));
    dev.wait_output("dev: waiting for changes", 1);

    w.ctx.write(
        "app/templates/index.html.jinja",
        "v2 {{ release.id }} {{ config.greeting }} on {{ host.name }}\n",
    );
    wait_served(&w, &dev, "/index.html", |b| b.starts_with("v2 "));
    dev.wait_output("dev: waiting for changes", 2);

    // Only the environment changed: the config-only path.
    let system = std::fs::read_to_string(w.ctx.path().join("system.yml")).unwrap();
    w.ctx.write(
        "system.yml",
        system.replace("greeting: hello", "greeting: bonjour"),
    );
    wait_served(&w, &dev, "/index.html", |b| b.contains("bonjour on h0"));
    dev.wait_output("dev: waiting for changes", 3);

    let out = dev.interrupt();
    let stdout = out
        .split("--- stderr")
        .next()
        .unwrap()
        .trim_start_matches("--- stdout\n");
    let cycles: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{out}")))
        .collect();
    let actions: Vec<&str> = cycles
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["deploy", "deploy", "apply"], "{out}");
    assert!(cycles.iter().all(|c| c["ok"] == true), "{out}");
    assert_eq!(
        cycles[1]["changed"],
        serde_json::json!(["app/templates/index.html.jinja"]),
        "{out}"
    );
}

#[test]
fn dev_serves_a_changed_app_file_and_dockerfile() {
    let w = World::new("devimg", 1, false);
    let dev = Dev::start(&w, &[]);
    wait_served(&w, &dev, "/version.txt", |b| b == "1\n");
    dev.wait_output("dev: waiting for changes", 1);

    w.ctx.write("app/www/version.txt", "2\n");
    wait_served(&w, &dev, "/version.txt", |b| b == "2\n");
    dev.wait_output("dev: waiting for changes", 2);

    let dockerfile = std::fs::read_to_string(w.ctx.path().join("app/Dockerfile")).unwrap();
    w.ctx.write(
        "app/Dockerfile",
        dockerfile.replace(
            "COPY www/ /www/\n",
            "COPY www/ /www/\nRUN echo 3 > /www/version.txt\n",
        ),
    );
    wait_served(&w, &dev, "/version.txt", |b| b == "3\n");
    dev.wait_output("dev: waiting for changes", 3);
    let out = dev.interrupt();
    assert_eq!(out.matches("deployed:").count(), 3, "{out}");
}

#[test]
fn dev_survives_a_broken_file() {
    let w = World::new("devbad", 1, false);
    let dev = Dev::start(&w, &[]);
    let first = wait_served(&w, &dev, "/index.html", |b| b.contains("hello on h0"));
    dev.wait_output("dev: waiting for changes", 1);

    // Invalid YAML in a build file: the build fails naming it, nothing changes.
    w.ctx.write("app/container.yml", "port: [8080\n");
    dev.wait_output("failed after", 1);
    dev.wait_output("dev: waiting for changes", 2);
    assert!(dev.output().contains("container.yml"), "{}", dev.output());
    assert_eq!(
        http_get(&w.proxy(0), "/index.html"),
        Ok((200, first.clone()))
    );

    // A template that does not render: the deploy fails, the old release serves on.
    w.ctx.write(
        "app/container.yml",
        "port: 8080\nhealth: {path: /health.txt, interval: 100ms, timeout: 8s}\nstop_timeout: 2s\n",
    );
    w.ctx
        .write("app/config.yml", "greeting: \"{{ services.greeting \"\n");
    dev.wait_output("failed after", 2);
    dev.wait_output("dev: waiting for changes", 3);
    assert_eq!(http_get(&w.proxy(0), "/index.html"), Ok((200, first)));

    // Fixed: served.
    w.ctx.write(
        "app/config.yml",
        "greeting: \"{{ services.greeting }} again\"\n",
    );
    wait_served(&w, &dev, "/index.html", |b| b.contains("hello again on h0"));
    dev.interrupt();
}
