//! `stretch deploy`, `rollback` and `status` against real agents on loopback, the real
//! Docker engine and a real registry: zero downtime, switch-back, and every fault the
//! deploy issue names.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stretch_test::Registry;

use super::common::*;

pub const TOKEN: &str = "96dc05bbd29f807ffddd8124d811063231bc048a8ab074ad0084e1110357a941";

/// A system with one web node served by busybox httpd, and `hosts` agents.
pub struct World {
    pub ctx: Ctx,
    pub system: String,
    pub agents: Vec<AgentProc>,
    pub listen: u16,
    _registry: Option<Registry>,
    _images: stretch_test::PrefixGuard,
}

impl World {
    pub fn new(prefix: &str, hosts: usize, use_registry: bool) -> World {
        let system = unique(prefix);
        let images = image_cleanup(&system);
        let registry = use_registry.then(Registry::start);
        let ctx = Ctx::new();
        let agents: Vec<AgentProc> = (0..hosts)
            .map(|i| AgentProc::start(&ctx.path().join(format!("agent{i}")), TOKEN, &system))
            .collect();
        let listen = stretch_test::free_port();
        let w = World {
            ctx,
            system,
            agents,
            listen,
            _registry: None,
            _images: images,
        };
        let reg = registry
            .as_ref()
            .map(|r| r.addr.clone())
            .unwrap_or_else(|| "local".into());
        w.write_system(&reg, "batch: 1", "");
        w.ctx.write("token", TOKEN);
        w.ctx.write("app/stretch.yml", "name: web\n");
        w.ctx
            .write("app/config.yml", "greeting: \"{{ services.greeting }}\"\n");
        w.ctx.write("app/container.yml", "port: 8080\nhealth: {path: /health.txt, interval: 100ms, timeout: 8s}\nstop_timeout: 2s\n");
        w.ctx.write(
            "app/Dockerfile",
            format!(
                "{}COPY www/ /www/\nCMD [\"sh\", \"-c\", \"if grep -q broken /stretch/templates/mode; then exec sleep 3600; fi; sleep $(cat /www/delay); cp /stretch/templates/index.html /www/; exec httpd -f -p 8080 -h /www\"]\n",
                from_base(&w.system)
            ),
        );
        w.ctx.write("app/www/health.txt", "ok\n");
        w.ctx.write("app/www/delay", "0\n");
        w.ctx.write("app/www/version.txt", "1\n");
        w.ctx.write(
            "app/templates/index.html.jinja",
            "release {{ release.id }} {{ config.greeting }} on {{ host.name }}\n",
        );
        w.ctx.write("app/templates/mode.jinja", "ok\n");
        World {
            _registry: registry,
            ..w
        }
    }

    pub fn write_system(&self, registry: &str, group_extra: &str, env_extra: &str) {
        let hosts: String = self
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| format!("      h{i}: {{agent: {}}}\n", a.addr))
            .collect();
        let names: Vec<String> = (0..self.agents.len()).map(|i| format!("h{i}")).collect();
        self.ctx.write(
            "system.yml",
            format!(
                "system: {}\nregistry: {registry}\n{}sources:\n  - path: ./app\nenvironments:\n  production:\n    agent_token_file: ./token\n    services: {{greeting: hello}}\n{env_extra}    hosts:\n{hosts}    groups:\n      web: {{node: web, hosts: [{}], listen: {}, {group_extra}}}\n",
                self.system,
                self.ctx.recipients(registry),
                names.join(", "),
                self.listen
            ),
        );
    }

    pub fn registry(&self) -> Option<&Registry> {
        self._registry.as_ref()
    }

    pub fn build(&self) -> String {
        self.ctx.run(&["build", "--json"]).ok().json()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The next release: bump a file and build.
    pub fn next_release(&self, v: u32) -> String {
        self.ctx.write("app/www/version.txt", format!("{v}\n"));
        self.build()
    }

    pub fn proxy(&self, i: usize) -> String {
        format!("{}:{}", self.agents[i].proxy_ip, self.listen)
    }

    pub fn body(&self, release: &str, i: usize) -> String {
        format!("release {release} hello on h{i}\n")
    }

    /// Every host serves `release`.
    #[track_caller]
    pub fn assert_serving(&self, release: &str) {
        for i in 0..self.agents.len() {
            let got = http_get(&self.proxy(i), "/index.html");
            assert_eq!(got, Ok((200, self.body(release, i))), "host h{i}");
        }
    }
}

/// What a hammer saw: requests, failures, distinct bodies.
pub type Tally = (u64, Vec<String>, std::collections::BTreeSet<String>);

/// Hammers every host's proxy until stopped.
pub struct Hammer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

impl Hammer {
    pub fn start(addrs: Vec<String>) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = addrs
            .into_iter()
            .map(|addr| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut n, mut failures, mut bodies) =
                        (0u64, Vec::new(), std::collections::BTreeSet::new());
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        match http_get(&addr, "/index.html") {
                            Ok((200, body)) => {
                                bodies.insert(body);
                            }
                            other => failures.push(format!("{addr}: {other:?}")),
                        }
                    }
                    (n, failures, bodies)
                })
            })
            .collect();
        Hammer { stop, threads }
    }

    /// Stop, and fail the test if any request failed.
    #[track_caller]
    pub fn finish_without_failures(self) -> Tally {
        let tally = self.finish();
        let (requests, failures, _) = &tally;
        assert!(
            failures.is_empty(),
            "{} of {requests} failed, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        tally
    }

    pub fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = (0, Vec::new(), std::collections::BTreeSet::new());
        for t in self.threads {
            let (n, f, b) = t.join().unwrap();
            total.0 += n;
            total.1.extend(f);
            total.2.extend(b);
        }
        total
    }
}

#[test]
fn deploy_and_rollback_three_hosts_without_downtime() {
    let w = World::new("zdt", 3, true);
    let r1 = w.build();
    let out = w.ctx.run(&["deploy", "production"]).ok();
    assert!(out.stdout.contains(&r1), "{out}");
    w.assert_serving(&r1);
    let r2 = w.next_release(2);

    let hammer = Hammer::start((0..3).map(|i| w.proxy(i)).collect());
    std::thread::sleep(Duration::from_millis(300));
    w.ctx.run(&["deploy", "production", &r2]).ok();
    w.assert_serving(&r2);
    let back = w.ctx.run(&["rollback", "production", "--json"]).ok().json();
    assert_eq!(back["release"]["id"], r1.as_str());
    std::thread::sleep(Duration::from_millis(300));
    let (requests, failures, bodies) = hammer.finish();
    w.assert_serving(&r1);

    eprintln!(
        "zero downtime: {requests} requests, {} failed, {} distinct bodies",
        failures.len(),
        bodies.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let allowed: std::collections::BTreeSet<String> = (0..3)
        .flat_map(|i| [w.body(&r1, i), w.body(&r2, i)])
        .collect();
    assert!(
        bodies.is_subset(&allowed),
        "unexpected bodies: {:?}",
        bodies.difference(&allowed).collect::<Vec<_>>()
    );
    assert!(requests > 100, "only {requests} requests");

    // Status and history.
    let status = w.ctx.run(&["status", "production", "--json"]).ok().json();
    assert_eq!(status["release"]["id"], r1.as_str());
    for h in status["hosts"].as_array().unwrap() {
        assert_eq!(h["reachable"], true);
        assert_eq!(h["groups"][0]["release"], r1.as_str());
        assert_eq!(h["groups"][0]["healthy"], true);
    }
    let history = w.ctx.run(&["history", "production", "--json"]).ok().json();
    let kinds: Vec<(&str, &str)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["kind"].as_str().unwrap(), h["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("rollback", "succeeded"),
            ("deploy", "succeeded"),
            ("deploy", "succeeded")
        ]
    );
    assert_eq!(history[0]["existing_release"], r2.as_str());
    // The deploy log is kept, stage by stage.
    let id = history[1]["id"].to_string();
    let log = w.ctx.run(&["logs", &id]).ok();
    for stage in [
        "pull release",
        "pre-deploy plugins",
        "configuration",
        "push",
        "change release",
        "switch buffers",
        "post-deploy plugins",
    ] {
        assert!(
            log.stdout.contains(&format!("[{stage}] ==> {stage}")),
            "{stage} missing:\n{log}"
        );
    }
}

#[test]
fn unknown_environment_or_release() {
    let w = World::new("unknown", 1, false);
    w.build();
    w.ctx
        .run(&["deploy", "staging"])
        .fails(2, &["unknown environment `staging`", "production"]);
    w.ctx
        .run(&["deploy", "production", "no-such-release"])
        .fails(2, &["unknown release `no-such-release`"]);
    w.ctx
        .run(&["rollback", "production"])
        .fails(2, &["no earlier release to roll back to"]);
    let history = w.ctx.run(&["history", "production", "--json"]).ok().json();
    assert_eq!(history, serde_json::json!([]));
}

#[test]
fn unreachable_agent_fails_before_switching() {
    let w = World::new("unreach", 2, false);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    let r2 = w.next_release(2);
    // Host h1's agent is gone: nothing is switched anywhere.
    let dead = format!("127.0.0.1:{}", stretch_test::free_port());
    let text = std::fs::read_to_string(w.ctx.path().join("system.yml"))
        .unwrap()
        .replace(&w.agents[1].addr, &dead);
    w.ctx.write("system.yml", text);
    w.ctx.run(&["deploy", "production", &r2]).fails(
        1,
        &[
            "pull release failed",
            "nothing was changed on any host",
            "host `h1`",
            &dead,
        ],
    );
    assert_eq!(
        http_get(&w.proxy(0), "/index.html"),
        Ok((200, w.body(&r1, 0)))
    );
    let status = w.ctx.run(&["status", "production", "--json"]).ok().json();
    assert_eq!(status["release"]["id"], r1.as_str());
    assert_eq!(status["hosts"][1]["reachable"], false);
}

#[test]
fn a_tampered_archive_fails_before_any_host_is_touched() {
    let w = World::new("tamper", 1, false);
    let r1 = w.build();
    // The archive's biggest chunk gets one byte flipped.
    let home = w.ctx.home();
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.join("releases").join(format!("{r1}.index"))).unwrap(),
    )
    .unwrap();
    let chunk = index["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|c| c["stored"].as_u64().unwrap())
        .unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let path = home
        .join("chunks")
        .join(&chunk[..2])
        .join(format!("{chunk}.zst"));
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&path, bytes).unwrap();
    w.ctx
        .run(&["deploy", "production"])
        .fails(1, &["pull release", "tampered with or corrupted", &r1]);
    assert!(AgentProc::containers(&w.system).is_empty());
    let history = w.ctx.run(&["history", "production", "--json"]).ok().json();
    assert_eq!(history[0]["status"], "failed");
}

#[test]
fn wrong_token_changes_nothing() {
    let w = World::new("token", 1, false);
    w.build();
    w.ctx.write("token", "not-the-token");
    w.ctx
        .run(&["deploy", "production"])
        .fails(1, &["host `h0`", "rejected the token"]);
    w.ctx.write("token", TOKEN);
    let status = w.ctx.run(&["status", "production", "--json"]).ok().json();
    assert_eq!(
        status["hosts"][0]["groups"][0]["release"],
        serde_json::Value::Null
    );
    assert!(AgentProc::containers(&w.system).is_empty());
}

#[test]
fn unhealthy_release_switches_back_and_keeps_serving() {
    let w = World::new("unhealthy", 2, false);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    // r2 never becomes healthy on h1 only: h0 switches, h1 fails, h0 goes back.
    w.ctx.write(
        "app/templates/mode.jinja",
        "{% if host.name == 'h1' %}broken{% else %}ok{% endif %}\n",
    );
    w.ctx.write(
        "app/container.yml",
        "port: 8080\nhealth: {path: /health.txt, interval: 100ms, timeout: 2s}\nstop_timeout: 1s\n",
    );
    let r2 = w.build();
    let hammer = Hammer::start(vec![w.proxy(0), w.proxy(1)]);
    w.ctx
        .run(&["deploy", "production", &r2])
        .fails(1, &["change release failed", "host `h1`", "switched back"]);
    hammer.finish_without_failures();
    w.assert_serving(&r1);
    let status = w.ctx.run(&["status", "production", "--json"]).ok().json();
    assert_eq!(status["release"]["id"], r1.as_str());
    let history = w.ctx.run(&["history", "production", "--json"]).ok().json();
    assert_eq!(history[0]["status"], "failed");
}

#[test]
fn failing_pre_deploy_plugin_touches_no_host() {
    let w = World::new("predeploy", 1, false);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    w.ctx.write("app/stretch.yml", "name: web\nplugins:\n  exec: {pre_deploy: 'echo checking $STRETCH_ENVIRONMENT $STRETCH_KIND; exit 5'}\n");
    let r2 = w.build();
    let before = AgentProc::containers(&w.system);
    w.ctx.run(&["deploy", "production", &r2]).fails(
        1,
        &[
            "pre_deploy plugins failed",
            "exited with status 5",
            "checking production deploy",
        ],
    );
    assert_eq!(AgentProc::containers(&w.system), before);
    w.assert_serving(&r1);
}

#[test]
fn undefined_template_variable_names_file_and_variable() {
    let w = World::new("undef", 1, false);
    w.ctx
        .write("app/config.yml", "greeting: \"{{ services.nope }}\"\n");
    w.build();
    w.ctx
        .run(&["deploy", "production"])
        .fails(2, &["config.yml", "undefined variable `services.nope`"]);
    w.ctx.write("app/config.yml", "greeting: hi\n");
    w.ctx.write(
        "app/templates/index.html.jinja",
        "{{ config.missing.deeper }}\n",
    );
    w.build();
    w.ctx.run(&["deploy", "production"]).fails(
        2,
        &[
            "templates/index.html.jinja",
            "undefined variable `config.missing.deeper`",
        ],
    );
    assert!(AgentProc::containers(&w.system).is_empty());
}

#[test]
fn two_deploys_at_once_and_agent_killed_mid_deploy() {
    let mut w = World::new("lock", 1, false);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    // r2 takes a while to become healthy.
    w.ctx.write("app/www/delay", "3\n");
    let r2 = w.build();
    let slow = std::process::Command::new(env!("CARGO_BIN_EXE_stretch"))
        .args(["deploy", "production", &r2])
        .current_dir(w.ctx.path())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // A second deploy fails at once, naming the holder.
    w.ctx.run(&["deploy", "production", &r1]).fails(
        1,
        &["environment `production` is locked by deploy of", "since"],
    );
    // Kill the agent mid-switch; the deploy fails; after a restart the host serves r1.
    w.agents[0].kill();
    let out = slow.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.agents[0].restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(&w.proxy(0), "/index.html") != Ok((200, w.body(&r1, 0))) {
        assert!(
            std::time::Instant::now() < deadline,
            "h0 does not serve r1 after restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = w.ctx.run(&["status", "production", "--json"]).ok().json();
    assert_eq!(status["release"]["id"], r1.as_str());
    // Deploying again converges; `--wait` queues behind a running deploy.
    w.ctx.write("app/www/delay", "1\n");
    let r3 = w.build();
    let first = std::process::Command::new(env!("CARGO_BIN_EXE_stretch"))
        .args(["deploy", "production", &r3])
        .current_dir(w.ctx.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    w.ctx.run(&["deploy", "production", &r3, "--wait"]).ok();
    assert!(first.wait_with_output().unwrap().status.success());
    w.assert_serving(&r3);
}

#[test]
fn plugins_migrations_and_auto_deploy() {
    let mut w = World::new("plugins", 1, false);
    w.write_system("local", "batch: 1", "    auto_deploy: true\n");
    let log = w.ctx.path().join("plugins.log");
    w.ctx.env.push(("LOG".into(), log.display().to_string()));
    w.ctx.write(
        "app/stretch.yml",
        "name: web\nplugins:\n  - migrations: {path: migrations, up: 'echo up $STRETCH_MIGRATIONS_TARGET >> $LOG', down: 'echo down to $STRETCH_MIGRATIONS_TARGET with $(ls | tail -n 1) >> $LOG', env: [LOG]}\n  - audit: {level: 1, env: [LOG]}\n",
    );
    w.ctx
        .write("app/migrations/0001-init.sql", "create table t;\n");
    let audit = w.ctx.write(
        "app/plugins/audit",
        "#!/bin/sh\nin=$(cat)\necho \"$STRETCH_HOOK ${STRETCH_KIND:-none} ${STRETCH_ENVIRONMENT:-none} $STRETCH_RELEASE_ID ${STRETCH_EXISTING_RELEASE_ID:-none}\" >> \"$LOG\"\necho \"$in\" > \"$LOG.$STRETCH_HOOK.json\"\n",
    );
    std::fs::set_permissions(&audit, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // A build deploys by itself to the auto_deploy environment.
    let out = w.ctx.run(&["build", "--json"]).ok();
    let r1 = out.json()["id"].as_str().unwrap().to_string();
    w.assert_serving(&r1);
    w.ctx
        .write("app/migrations/0002-more.sql", "alter table t;\n");
    let r2 = w.build();
    w.assert_serving(&r2);
    w.ctx.run(&["rollback", "production"]).ok();
    w.assert_serving(&r1);

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            format!("build none none {r1} none").as_str(),
            "up 0001",
            format!("pre_deploy deploy production {r1} none").as_str(),
            format!("post_deploy deploy production {r1} none").as_str(),
            format!("build none none {r2} none").as_str(),
            "up 0002",
            format!("pre_deploy deploy production {r2} {r1}").as_str(),
            format!("post_deploy deploy production {r2} {r1}").as_str(),
            format!("pre_deploy rollback production {r1} {r2}").as_str(),
            "down to 0001 with 0002-more.sql",
            format!("post_deploy rollback production {r1} {r2}").as_str(),
        ]
    );
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}.post_deploy.json", log.display())).unwrap(),
    )
    .unwrap();
    assert_eq!(doc["hook"], "post_deploy");
    assert_eq!(doc["plugin"], "audit");
    assert_eq!(
        doc["options"],
        serde_json::json!({"level": 1, "env": ["LOG"]})
    );
    assert_eq!(doc["kind"], "rollback");
    assert_eq!(doc["environment"], "production");
    assert_eq!(doc["node"], "web");
    assert_eq!(doc["release"]["id"], r1.as_str());
    assert_eq!(doc["existing_release"]["id"], r2.as_str());
    w.agents.truncate(1);
}

#[test]
fn plugin_env_holds_no_credentials() {
    let mut w = World::new("plugenv", 1, false);
    w.write_system("local", "batch: 1", "");
    w.ctx
        .run(&["keys", "generate", "-o", "identity-file-xq7.txt"])
        .ok();
    let identity = w.ctx.path().join("identity-file-xq7.txt");
    let server_token = "server-credential-4f1c9a0b7d2e8c6f5a3b";
    for (k, v) in [
        ("STRETCH_AGENT_TOKEN", TOKEN.to_string()),
        ("STRETCH_SERVER_TOKEN", server_token.to_string()),
        ("STRETCH_IDENTITY", identity.display().to_string()),
        (
            "STRETCH_RELEASE_IDENTITY",
            w.ctx
                .path()
                .join("release-key-zr9.txt")
                .display()
                .to_string(),
        ),
        ("DECLARED_VAR", "declared-value-1".to_string()),
        ("UNDECLARED_VAR", "undeclared-value-2".to_string()),
    ] {
        w.ctx.env.push((k.into(), v));
    }
    let dump = |hook: &str| format!("'env | sed s/^/ENV:{hook}:/'");
    w.ctx.write(
        "app/stretch.yml",
        format!(
            "name: web\nplugins:\n  - exec: {{build: {}, pre_deploy: {}, post_deploy: {}, env: [DECLARED_VAR]}}\n  - envdump: {{env: [DECLARED_VAR]}}\n",
            dump("build"),
            dump("pre"),
            dump("post")
        ),
    );
    let ext = w.ctx.write(
        "app/plugins/envdump",
        "#!/bin/sh\ncat >/dev/null\nenv | sed \"s/^/EXT:$STRETCH_HOOK:/\"\n",
    );
    std::fs::set_permissions(&ext, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let build = w.ctx.run(&["build"]).ok();
    let deploy = w.ctx.run(&["deploy", "production"]).ok();
    for (out, hooks) in [
        (&build, &["ENV:build:", "EXT:build:"][..]),
        (
            &deploy,
            &[
                "ENV:pre:",
                "ENV:post:",
                "EXT:pre_deploy:",
                "EXT:post_deploy:",
            ][..],
        ),
    ] {
        let text = &out.stderr;
        for hook in hooks {
            for wanted in [
                "DECLARED_VAR=declared-value-1",
                "PATH=",
                "STRETCH_RELEASE_ID=",
            ] {
                assert!(
                    text.contains(&format!("{hook}{wanted}")),
                    "{hook}{wanted} missing:\n{out}"
                );
            }
        }
        for unwanted in [
            "UNDECLARED_VAR",
            "undeclared-value-2",
            "STRETCH_AGENT_TOKEN",
            TOKEN,
            "STRETCH_SERVER_TOKEN",
            server_token,
            "STRETCH_IDENTITY",
            "identity-file-xq7",
            "STRETCH_RELEASE_IDENTITY",
            "release-key-zr9",
        ] {
            assert!(!text.contains(unwanted), "a plugin saw {unwanted}:\n{out}");
        }
    }

    // Declaring a credential is refused, naming the plugin, the variable and the line.
    w.ctx.write(
        "app/stretch.yml",
        "name: web\nplugins:\n  - envdump: {env: [DECLARED_VAR, STRETCH_AGENT_TOKEN]}\n",
    );
    w.ctx.run(&["build"]).fails(
        2,
        &[
            "stretch.yml:3:",
            "plugin `envdump`",
            "`STRETCH_AGENT_TOKEN` is a stretch credential",
        ],
    );
}

#[test]
fn a_looping_template_fails_the_deploy_and_changes_nothing() {
    let w = World::new("fuel", 1, false);
    w.write_system("local", "batch: 1", "");
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    w.assert_serving(&r1);
    w.ctx.write(
        "app/templates/loop.conf.jinja",
        "a: 1\n{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}\n",
    );
    let r2 = w.build();
    w.ctx
        .run(&["deploy", "production", &r2])
        .fails(2, &["templates/loop.conf.jinja:2:", "too much work"]);
    w.assert_serving(&r1);
    // The agent still answers.
    let status = w.ctx.run(&["status", "production", "--json"]).ok();
    assert!(status.stdout.contains(&r1), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_says_how_far_a_switch_got() {
    let w = World::new("activity", 1, false);
    w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    let key = stretch_core::agent::api::GroupKey {
        system: w.system.clone(),
        environment: "production".into(),
        group: "web".into(),
    };
    let client = w.agents[0].client();
    assert_eq!(client.activity(&key).await.unwrap().phase, "idle");

    // The next release takes 2 s to start: the agent reports its health checks.
    w.ctx.write("app/www/delay", "2\n");
    w.next_release(2);
    let mut deploy = w
        .ctx
        .command(&["deploy", "production"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = None;
    for _ in 0..200 {
        let a = client.activity(&key).await.unwrap();
        if a.phase == "checking" {
            seen = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(deploy.wait().unwrap().success());
    let seen = seen.expect("the switch was never seen checking health");
    assert_eq!((seen.instances, seen.healthy), (1, 0));
    assert_eq!(client.activity(&key).await.unwrap().phase, "idle");
}
