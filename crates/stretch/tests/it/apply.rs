//! `stretch apply`: config-only deploys against real agents and the real Docker engine
//! — changed services reload in place, hosts and groups come and go, instances change,
//! and every fault the issue names.

use std::time::Duration;

use super::common::*;
use super::deploy::{Hammer, World};

/// Rewrite system.yml: `hosts` are agent indexes; `groups` is YAML for the groups map.
fn system(w: &World, greeting: &str, hosts: &[usize], groups: &str) {
    let hosts: String = hosts
        .iter()
        .map(|i| format!("      h{i}: {{agent: {}}}\n", w.agents[*i].addr))
        .collect();
    w.ctx.write(
        "system.yml",
        format!(
            "system: {}\nregistry: local\nsources:\n  - path: ./app\nenvironments:\n  production:\n    agent_token_file: ./token\n    services: {{greeting: {greeting}}}\n    hosts:\n{hosts}    groups:\n{groups}",
            w.system
        ),
    );
}

fn web(w: &World, hosts: &str, extra: &str) -> String {
    format!(
        "      web: {{node: web, hosts: [{hosts}], listen: {}{extra}}}\n",
        w.listen
    )
}

/// Puts the rendered page in place atomically: a plain `cp` truncates the file that
/// httpd is serving, which answers some requests with a short body.
const INSTALL_PAGE: &str =
    "cp /stretch/templates/index.html /www/.new && mv /www/.new /www/index.html";

/// A world whose node reloads by copying its rendered page into place.
fn reloading_world(prefix: &str, hosts: usize) -> World {
    let w = World::new(prefix, hosts, false);
    w.ctx.write(
        "app/container.yml",
        format!("port: 8080\nhealth: {{path: /health.txt, interval: 100ms, timeout: 8s}}\nstop_timeout: 1s\nreload: [sh, -c, 'grep -qx ok /stretch/templates/mode && {INSTALL_PAGE}']\n"),
    );
    w.ctx.write(
        "app/templates/mode.jinja",
        "{% if config.greeting == 'fail-reload' %}broken{% else %}ok{% endif %}\n",
    );
    w
}

fn page(w: &World, i: usize) -> String {
    http_get(&w.proxy(i), "/index.html")
        .map(|(_, b)| b)
        .unwrap_or_else(|e| e)
}

fn containers(w: &World) -> Vec<String> {
    let mut c = AgentProc::containers(&w.system);
    c.sort();
    c
}

#[test]
fn apply_converges_services_hosts_groups_and_instances() {
    let w = reloading_world("apply", 3);
    system(&w, "hello", &[0, 1], &web(&w, "h0, h1", ""));
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();

    // Nothing changed: nothing to do.
    let out = w.ctx.run(&["apply", "production"]).ok();
    assert!(out.stdout.contains("no changes"), "{out}");

    // A service value: the plan shows it, a dry run changes nothing.
    system(&w, "hi", &[0, 1], &web(&w, "h0, h1", ""));
    let plan = w
        .ctx
        .run(&["apply", "production", "--dry-run", "--json"])
        .ok()
        .json();
    assert_eq!(plan["plan"]["changes"][0]["path"], "services.greeting");
    assert_eq!(plan["plan"]["changes"][0]["new"], "hi");
    let kinds: Vec<&str> = plan["plan"]["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["reload", "reload"]);
    assert_eq!(page(&w, 0), format!("release {r1} hello on h0\n"));

    // Applied: reloaded in the running instances (same containers), no downtime.
    let before = containers(&w);
    let hammer = Hammer::start(vec![w.proxy(0), w.proxy(1)]);
    let out = w.ctx.run(&["apply", "production"]).ok();
    hammer.finish_without_failures();
    assert!(
        out.stdout
            .contains("~ services.greeting: \"hello\" -> \"hi\""),
        "{out}"
    );
    for i in 0..2 {
        assert_eq!(page(&w, i), format!("release {r1} hi on h{i}\n"));
    }
    assert_eq!(containers(&w), before, "reload must not replace instances");
    let history = w.ctx.run(&["history", "production", "--json"]).ok().json();
    assert_eq!(history[0]["kind"], "config");
    assert_eq!(history[0]["release"], r1.as_str());
    let status = w.ctx.run(&["status", "production", "--json"]).ok().json();
    assert_eq!(status["release"]["id"], r1.as_str());

    // A host joins the group: it pulls and serves the running release.
    system(&w, "hi", &[0, 1, 2], &web(&w, "h0, h1, h2", ""));
    let out = w.ctx.run(&["apply", "production"]).ok();
    assert!(out.stdout.contains("+ web/h2"), "{out}");
    assert_eq!(page(&w, 2), format!("release {r1} hi on h2\n"));

    // Two instances per host: replaced without downtime, same image.
    system(
        &w,
        "hi",
        &[0, 1, 2],
        &web(&w, "h0, h1, h2", ", instances: 2"),
    );
    let hammer = Hammer::start(vec![w.proxy(0)]);
    w.ctx.run(&["apply", "production"]).ok();
    hammer.finish_without_failures();
    assert_eq!(containers(&w).len(), 6);

    // A host leaves, and a second group comes on h0.
    let api_port = stretch_test::free_port();
    let groups = format!(
        "{}      api: {{node: web, hosts: [h0], listen: {api_port}}}\n",
        web(&w, "h0, h2", ", instances: 2")
    );
    system(&w, "hi", &[0, 1, 2], &groups);
    let out = w.ctx.run(&["apply", "production"]).ok();
    assert!(
        out.stdout.contains("- web/h1") && out.stdout.contains("+ api/h0"),
        "{out}"
    );
    assert!(
        http_get(&w.proxy(1), "/index.html").is_err(),
        "h1's proxy must be closed"
    );
    let api = format!("{}:{api_port}", w.agents[0].proxy_ip);
    assert_eq!(
        http_get(&api, "/index.html"),
        Ok((200, format!("release {r1} hi on h0\n")))
    );
    // …and goes again.
    system(&w, "hi", &[0, 1, 2], &web(&w, "h0, h2", ", instances: 2"));
    w.ctx.run(&["apply", "production"]).ok();
    assert!(
        http_get(&api, "/index.html").is_err(),
        "api's proxy must be closed"
    );
    assert_eq!(containers(&w).len(), 4);

    // A rollback later keeps the current service values (services are unversioned).
    let r2 = w.next_release(2);
    w.ctx.run(&["deploy", "production", &r2]).ok();
    w.ctx.run(&["rollback", "production"]).ok();
    assert_eq!(page(&w, 0), format!("release {r1} hi on h0\n"));
}

#[test]
fn reload_signal_reloads_in_place() {
    let w = World::new("sigreload", 1, false);
    w.ctx.write(
        "app/container.yml",
        "port: 8080\nhealth: {path: /health.txt, interval: 100ms, timeout: 8s}\nstop_timeout: 1s\nreload_signal: hup\n",
    );
    // The app copies its rendered page into place at start and on SIGHUP.
    w.ctx.write(
        "app/Dockerfile",
        format!(
            "{}COPY www/ /www/\nCMD [\"sh\", \"-c\", \"{INSTALL_PAGE}; httpd -f -p 8080 -h /www & p=$!; trap '{INSTALL_PAGE}' HUP; trap 'kill $p; exit 0' TERM; while kill -0 $p; do wait $p; done\"]\n",
            from_base(&w.system)
        ),
    );
    system(&w, "hello", &[0], &web(&w, "h0", ""));
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    assert_eq!(page(&w, 0), format!("release {r1} hello on h0\n"));

    let before = containers(&w);
    system(&w, "hi", &[0], &web(&w, "h0", ""));
    let hammer = Hammer::start(vec![w.proxy(0)]);
    let out = w.ctx.run(&["apply", "production"]).ok();
    hammer.finish_without_failures();
    assert!(out.stdout.contains("~ web/h0"), "{out}");
    assert_eq!(page(&w, 0), format!("release {r1} hi on h0\n"));
    assert_eq!(containers(&w), before, "a signal reload keeps the instance");
}

#[test]
fn apply_on_a_never_deployed_environment_does_nothing() {
    let w = reloading_world("neverdep", 1);
    system(&w, "hello", &[0], &web(&w, "h0", ""));
    w.build();
    let out = w.ctx.run(&["apply", "production"]).ok();
    assert!(
        out.stderr
            .contains("has never been deployed: nothing to apply"),
        "{out}"
    );
    assert!(containers(&w).is_empty());
    assert_eq!(
        w.ctx.run(&["history", "production", "--json"]).ok().json(),
        serde_json::json!([])
    );
}

#[test]
fn apply_bad_definitions() {
    let w = reloading_world("applybad", 2);
    system(&w, "hello", &[0, 1], &web(&w, "h0, h1", ""));
    w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    let groups = format!(
        "{}      jobs: {{node: cron, hosts: [h0]}}\n",
        web(&w, "h0, h1", "")
    );
    system(&w, "hello", &[0, 1], &groups);
    w.ctx
        .run(&["apply", "production"])
        .fails(2, &["group `jobs` runs node `cron`", "does not have"]);
    let groups = format!(
        "{}      ghost: {{node: web, hosts: [h9]}}\n",
        web(&w, "h0, h1", "")
    );
    system(&w, "hello", &[0, 1], &groups);
    w.ctx
        .run(&["apply", "production"])
        .fails(2, &["system.yml", "group `ghost`", "unknown host `h9`"]);
    let groups = format!(
        "{}      api: {{node: web, hosts: [h1], listen: {}}}\n",
        web(&w, "h0, h1", ""),
        w.listen
    );
    system(&w, "hello", &[0, 1], &groups);
    w.ctx
        .run(&["apply", "production"])
        .fails(2, &["system.yml", "both listen on port"]);
}

#[test]
fn failing_reload_and_unreachable_agent() {
    let mut w = reloading_world("applyfault", 2);
    system(&w, "hello", &[0, 1], &web(&w, "h0, h1", ""));
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();

    // A reload that fails: that host keeps its old configuration, the command fails.
    system(&w, "fail-reload", &[0, 1], &web(&w, "h0, h1", ""));
    w.ctx
        .run(&["apply", "production"])
        .fails(1, &["apply failed", "host `h0`", "host `h1`"]);
    for i in 0..2 {
        assert_eq!(page(&w, i), format!("release {r1} hello on h{i}\n"));
    }
    for c in AgentProc::containers(&w.system) {
        let config = stretch_test::docker(&["exec", &c, "cat", "/stretch/config.json"]);
        assert!(
            config.contains("hello") && !config.contains("fail-reload"),
            "old config not restored: {config}"
        );
    }

    // An agent down during apply: the others converge; re-running converges it.
    w.agents[1].kill();
    system(&w, "bonjour", &[0, 1], &web(&w, "h0, h1", ""));
    w.ctx.run(&["apply", "production"]).fails(
        1,
        &[
            "host `h1`",
            &w.agents[1].addr,
            "run `stretch apply production` again",
        ],
    );
    assert_eq!(page(&w, 0), format!("release {r1} bonjour on h0\n"));
    w.agents[1].restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while page(&w, 1) != format!("release {r1} hello on h1\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "h1 does not serve after restart: {}",
            page(&w, 1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let plan = w
        .ctx
        .run(&["apply", "production", "--dry-run", "--json"])
        .ok()
        .json();
    let targets: Vec<&str> = plan["plan"]["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["web/h1"]);
    w.ctx.run(&["apply", "production"]).ok();
    assert_eq!(page(&w, 1), format!("release {r1} bonjour on h1\n"));
}
