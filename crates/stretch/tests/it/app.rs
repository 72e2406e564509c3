//! `stretch app logs|exec|restart` against real agents on loopback and the real
//! Docker engine: merged and prefixed logs followed across a deploy, exec's status and
//! streams, `--new` leaving nothing behind, a restart under load dropping nothing.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::*;
use super::deploy::{Hammer, World};

/// A world whose instances say who they are on start, on stdout and stderr.
fn talking_world(prefix: &str, hosts: usize) -> World {
    let w = World::new(prefix, hosts, false);
    w.ctx.write(
        "app/Dockerfile",
        format!(
            "{}COPY www/ /www/\nCMD [\"sh\", \"-c\", \"echo hello from $STRETCH_HOST v$(cat /www/version.txt); echo warn from $STRETCH_HOST >&2; cp /stretch/templates/index.html /www/; exec httpd -f -p 8080 -h /www\"]\n",
            from_base(&w.system)
        ),
    );
    w
}

fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn logs_from_two_hosts_merged_prefixed_and_followed_across_a_deploy() {
    let w = talking_world("applogs", 2);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();

    let out = w.ctx.run(&["app", "logs", "production"]).ok();
    for h in ["h0", "h1"] {
        assert!(
            out.stdout
                .contains(&format!("{h} web/0 | hello from {h} v1")),
            "{out}"
        );
        assert!(
            out.stdout.contains(&format!("{h} web/0 | warn from {h}")),
            "{out}"
        );
    }
    // JSON: one object a line, in time order.
    let out = w.ctx.run(&["app", "logs", "production", "--json"]).ok();
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    let times: Vec<&str> = lines.iter().map(|l| l["time"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted);
    assert!(lines.iter().all(|l| l["release_id"] == r1.as_str()));
    assert!(
        lines
            .iter()
            .any(|l| l["stream"] == "stderr" && l["host"] == "h1")
    );
    // Filters.
    let out = w
        .ctx
        .run(&["app", "logs", "production", "--host", "h1", "-n", "1"])
        .ok();
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    assert!(out.stdout.starts_with("h1 web/0 | "), "{out}");
    // A window with nothing in it says so (on stderr).
    let out = w
        .ctx
        .run(&["app", "logs", "production", "--since", "4102444800"])
        .ok();
    assert_eq!(out.stdout, "", "{out}");
    assert!(out.stderr.contains("no lines"), "{out}");
    w.ctx
        .run(&["app", "logs", "production", "--group", "nope"])
        .fails(2, &["no group `nope`", "groups: web"]);
    w.ctx
        .run(&["app", "logs", "production", "--host", "h9"])
        .fails(2, &["no host `h9`", "hosts: h0, h1"]);
    w.ctx
        .run(&["app", "logs", "production", "--since", "soon"])
        .fails(2, &["--since soon"]);

    // Following: the new instances of a deploy show up.
    let mut follow = w
        .ctx
        .command(&["app", "logs", "production", "-f", "-n", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let seen = seen.clone();
        let stdout = follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                seen.lock().unwrap().push(line);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let r2 = w.next_release(2);
    w.ctx.run(&["deploy", "production", &r2]).ok();
    wait_for("the new instances' lines", Duration::from_secs(60), || {
        let seen = seen.lock().unwrap();
        ["h0", "h1"].iter().all(|h| {
            seen.iter()
                .any(|l| l == &format!("{h} web/0 | hello from {h} v2"))
        })
    });
    // Ctrl-C ends it cleanly.
    rustix_kill(follow.id());
    let status = follow.wait().unwrap();
    assert!(status.success(), "{status:?}");
    reader.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        !seen.iter().any(|l| l.contains("v1")),
        "-n 0 showed old lines: {seen:?}"
    );
}

/// SIGINT to a child, as Ctrl-C would.
fn rustix_kill(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn exec_gives_the_commands_status_and_streams_and_new_leaves_nothing() {
    let w = talking_world("appexec", 1);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();

    let out = w.ctx.run(&[
        "app",
        "exec",
        "production",
        "--group",
        "web",
        "--",
        "sh",
        "-c",
        "echo out $STRETCH_INSTANCE; echo err >&2; exit 7",
    ]);
    assert_eq!(out.code, 7, "{out}");
    assert_eq!(out.stdout, "out 0\n", "{out}");
    assert!(out.stderr.contains("err\n"), "{out}");

    // -i: input passed through, end of input passed on.
    let mut child = w
        .ctx
        .command(&[
            "app",
            "exec",
            "production",
            "--group",
            "web",
            "-i",
            "--",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line one\nline two\n");

    // -t: the command gets a terminal (this side runs under a pseudo-terminal, `script`).
    let line = format!(
        "{} app exec production --group web -it -- sh -c 'tty; exit 4'",
        env!("CARGO_BIN_EXE_stretch")
    );
    let mut script = std::process::Command::new("script");
    script
        .args(["-qec", &line, "/dev/null"])
        .current_dir(w.ctx.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    for (k, v) in &w.ctx.env {
        script.env(k, v);
    }
    let out = script.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(text.contains("/dev/pts/"), "{text}");

    // --new: a fresh container of the release, configured like instance 0, then gone.
    let before = AgentProc::containers(&w.system);
    let out = w.ctx.run(&[
        "app",
        "exec",
        "production",
        "--group",
        "web",
        "--new",
        "--",
        "sh",
        "-c",
        "cat /stretch/templates/index.html; exit 3",
    ]);
    assert_eq!(out.code, 3, "{out}");
    assert_eq!(out.stdout, w.body(&r1, 0), "{out}");
    let exec_containers = stretch_test::docker(&[
        "ps",
        "-aq",
        "--filter",
        "label=stretch.exec=1",
        "--filter",
        &format!("label=stretch.system={}", w.system),
    ]);
    assert_eq!(exec_containers.trim(), "", "a one-off container was left");
    assert_eq!(AgentProc::containers(&w.system), before);
    let leftovers: Vec<_> = std::fs::read_dir(w.ctx.path().join("agent0/data/instances"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stretch-exec-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Bad input names what is wrong.
    w.ctx
        .run(&["app", "exec", "production", "--group", "nope", "--", "true"])
        .fails(2, &["no group `nope`"]);
    w.ctx
        .run(&[
            "app",
            "exec",
            "production",
            "--group",
            "web",
            "--instance",
            "5",
            "--",
            "true",
        ])
        .fails(2, &["no instance 5"]);
    // A program that is not there: the engine's exit status for it, and its words.
    let out = w.ctx.run(&[
        "app",
        "exec",
        "production",
        "--group",
        "web",
        "--",
        "/no/such/program",
    ]);
    assert!(matches!(out.code, 126 | 127), "{out}");
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("/no/such/program"),
        "{out}"
    );
}

#[test]
fn a_restart_under_load_drops_no_request() {
    let w = World::new("apprestart", 2, false);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    let before = AgentProc::containers(&w.system);
    assert_eq!(before.len(), 2);

    let hammer = Hammer::start((0..2).map(|i| w.proxy(i)).collect());
    std::thread::sleep(Duration::from_millis(300));
    let out = w.ctx.run(&["app", "restart", "production", "--json"]).ok();
    std::thread::sleep(Duration::from_millis(300));
    let (requests, _, bodies) = hammer.finish_without_failures();
    assert!(requests > 50, "only {requests} requests");
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    w.assert_serving(&r1);

    let done = out.json();
    assert_eq!(done["release"], r1.as_str());
    assert_eq!(done["groups"].as_array().unwrap().len(), 2, "{out}");
    let after = AgentProc::containers(&w.system);
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|c| !before.contains(c)),
        "not fresh: {before:?} {after:?}"
    );

    let history = w.ctx.run(&["history", "production", "--json"]).ok().json();
    assert_eq!(history[0]["kind"], "restart");
    assert_eq!(history[0]["status"], "succeeded");
    assert_eq!(history[0]["release"], r1.as_str());

    w.ctx
        .run(&["app", "restart", "production", "--group", "nope"])
        .fails(2, &["no group `nope`"]);
}

/// The new endpoints as an attacker sees them: a wrong token gets nothing, a huge
/// command is refused before anything runs, log streams are capped per agent.
#[test]
fn logs_exec_and_restart_are_authenticated_and_bounded() {
    use stretch_core::agent::api::{ExecRequest, GroupKey, LogQuery};
    use stretch_core::agent::client::AgentError;
    let w = talking_world("appbounds", 1);
    w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    let key = GroupKey {
        system: w.system.clone(),
        environment: "production".into(),
        group: "web".into(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let good = w.agents[0].client();
        let spec = good.current_spec(&key).await.unwrap().unwrap();
        let bad = w.agents[0].client_with_token(&"0".repeat(64));
        let req = |cmd: Vec<String>| ExecRequest {
            cmd,
            instance: None,
            new: false,
            stdin: false,
            tty: false,
            size: None,
        };
        let follow = LogQuery {
            follow: true,
            ..Default::default()
        };
        assert!(matches!(
            bad.logs(&key, &follow).await,
            Err(AgentError::Unauthorized { .. })
        ));
        assert!(matches!(
            bad.exec(&key, &req(vec!["true".into()])).await,
            Err(AgentError::Unauthorized { .. })
        ));
        assert!(matches!(
            bad.restart(&spec).await,
            Err(AgentError::Unauthorized { .. })
        ));
        // Over 1024 arguments: refused before the upgrade, nothing run.
        let huge = vec!["x".to_string(); 1025];
        match good.exec(&key, &req(huge)).await {
            Err(AgentError::Failed { status: 400, .. }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        // A group this agent does not run.
        let other = GroupKey {
            group: "nope".into(),
            ..key.clone()
        };
        assert!(matches!(
            good.logs(&other, &follow).await,
            Err(AgentError::Failed { status: 404, .. })
        ));
        // 32 followed streams at once; the 33rd is refused, and a slot freed is reusable.
        let mut open = Vec::new();
        for _ in 0..32 {
            open.push(good.logs(&key, &follow).await.unwrap());
        }
        match good.logs(&key, &follow).await {
            Err(AgentError::Failed { status: 503, .. }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        drop(open.pop());
        let mut again = None;
        for _ in 0..50 {
            if let Ok(r) = good.logs(&key, &follow).await {
                again = Some(r);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(again.is_some(), "a freed log slot was not reused");
    });
    // The agent logged the refusals without the token.
    assert!(!w.agents[0].log().contains(&"0".repeat(64)));
}
