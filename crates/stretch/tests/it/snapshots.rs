//! The human output of the main commands, snapshotted (insta), run locally and through
//! `stretch serve` with `--server`: one snapshot serves both, so the two front ends
//! cannot drift apart.

use super::common::*;
use super::deploy::World;
use super::serve::{Serve, TOKEN as SERVER_TOKEN};

/// How a command reaches the home: directly, or through a server over it.
enum Via {
    Local,
    Server {
        _serve: Serve,
        remote: Ctx,
        url: String,
    },
}

struct Session {
    w: World,
    via: Via,
    transcript: String,
}

impl Session {
    fn new(via_server: bool) -> Session {
        let w = World::new("snap", 1, false);
        let via = if via_server {
            let serve = Serve::start(&w.ctx);
            let mut remote = Ctx::new();
            remote
                .env
                .push(("STRETCH_SERVER_TOKEN".into(), SERVER_TOKEN.into()));
            let url = serve.url();
            Via::Server {
                _serve: serve,
                remote,
                url,
            }
        } else {
            Via::Local
        };
        Session {
            w,
            via,
            transcript: String::new(),
        }
    }

    /// Run `stretch ARGS` and add what it printed to the transcript.
    fn run(&mut self, args: &[&str]) -> Out {
        let out = match &self.via {
            Via::Local => self.w.ctx.run(args),
            Via::Server { remote, url, .. } => {
                let mut all = vec!["--server", url.as_str()];
                all.extend_from_slice(args);
                remote.run(&all)
            }
        };
        self.transcript += &format!(
            "$ stretch {}\nexit {}\n--- stdout\n{}--- stderr\n{}\n",
            args.join(" "),
            out.code,
            out.stdout,
            out.stderr
        );
        out
    }

    /// The transcript with what differs from one run to the next made fixed: release
    /// ids and names, the system's name, addresses, paths, times and durations.
    fn normalized(&self) -> String {
        let releases = self.w.ctx.run(&["releases", "--json"]).ok().json();
        let mut text = self.transcript.clone();
        // Oldest first, so the first release built is R1.
        for (i, r) in releases.as_array().unwrap().iter().rev().enumerate() {
            let id = r["id"].as_str().unwrap();
            let name = r["name"].as_str().unwrap();
            text = text.replace(id, &format!("<R{}>", i + 1));
            text = text.replace(&id[..12], &format!("<R{}>", i + 1));
            text = text.replace(name, &format!("<name{}>", i + 1));
        }
        text = text.replace(&self.w.system, "<system>");
        text = text.replace(&self.w.agents[0].addr, "<agent>");
        text = text.replace(&format!(":{}", self.w.listen), ":<listen>");
        text = text.replace(&self.w.ctx.path().display().to_string(), "<dir>");
        // Padding follows the width of names and ids: keep words, not columns. The
        // engine's own build lines are its words, not ours.
        let text: Vec<String> = fixed_times(&hex_runs(&text))
            .lines()
            .filter(|l| !is_engine_build_line(l))
            .map(|l| {
                let body = l.trim_start();
                let indent = &l[..l.len() - body.len()];
                // Sizes follow the system's (unique) name.
                let words: Vec<&str> = body
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .map(|w| match w {
                        [n, "bytes:"] if n.bytes().all(|b| b.is_ascii_digit()) => "<n>",
                        // Files written in the last seconds are read whatever the cache says.
                        [n, "not"] if n.bytes().all(|b| b.is_ascii_digit()) => "<n>",
                        [n, _] => n,
                        _ => "",
                    })
                    .chain(body.split_whitespace().last())
                    .collect();
                format!("{indent}{}", words.join(" "))
            })
            .collect();
        text.join("\n") + "\n"
    }
}

pub fn is_engine_build_line(line: &str) -> bool {
    let l = line.trim_start();
    [
        "Step ",
        "---> ",
        "Removing intermediate container",
        "Successfully ",
    ]
    .iter()
    .any(|p| l.starts_with(p))
}

/// Replace runs of 12 or more hex digits (image and config versions, fingerprints)
/// with `<hex>`.
pub fn hex_runs(text: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
            continue;
        }
        if run.len() >= 12 {
            out.push_str("<hex>");
        } else {
            out.push_str(&run);
        }
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// RFC 3339 times become `<time>`, durations like `1.23s` become `<secs>`.
pub fn fixed_times(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let digits = |from: usize, n: usize| {
        b.len() >= from + n && b[from..from + n].iter().all(u8::is_ascii_digit)
    };
    while i < b.len() {
        let start_of_token = i == 0 || !b[i - 1].is_ascii_alphanumeric();
        // 2026-12-03T17:59:01Z or …+00:00, with optional fractions.
        if start_of_token
            && digits(i, 4)
            && b.get(i + 4) == Some(&b'-')
            && digits(i + 5, 2)
            && b.get(i + 10) == Some(&b'T')
        {
            let mut j = i + 19;
            while j < b.len() && (b[j].is_ascii_digit() || b"+-:.Z".contains(&b[j])) {
                j += 1;
            }
            out.push_str("<time>");
            i = j;
            continue;
        }
        // 0.12s
        if start_of_token && b[i].is_ascii_digit() {
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if b.get(j) == Some(&b'.') && digits(j + 1, 2) && b.get(j + 3) == Some(&b's') {
                out.push_str("<secs>");
                i = j + 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Build, deploy, a second release, rollback, apply (plan and result), status,
/// releases, history, and the main errors.
fn scenario(via_server: bool) -> String {
    let mut s = Session::new(via_server);
    s.run(&["build"]).ok();
    s.run(&["build"]).ok();
    s.run(&["deploy", "production"]).ok();
    s.w.ctx.write("app/www/version.txt", "2\n");
    s.run(&["build"]).ok();
    s.run(&["deploy", "production"]).ok();
    s.run(&["rollback", "production"]).ok();
    s.run(&["releases"]).ok();
    let yml = std::fs::read_to_string(s.w.ctx.path().join("system.yml")).unwrap();
    s.w.ctx
        .write("system.yml", yml.replace("greeting: hello", "greeting: hi"));
    s.run(&["apply", "production", "--dry-run"]).ok();
    s.run(&["apply", "production"]).ok();
    s.run(&["status", "production"]).ok();
    s.run(&["history"]).ok();
    s.run(&["deploy", "staging"]).fails(2, &[]);
    s.run(&["deploy", "production", "no-such-release"])
        .fails(2, &[]);
    s.run(&["logs", "999"]).fails(2, &[]);
    s.w.ctx.write(
        "system.yml",
        yml.replace("sources:", "sources:\n  - path ./app"),
    );
    s.run(&["build"]).fails(2, &[]);
    s.normalized()
}

#[test]
fn human_output_is_the_same_locally_and_through_a_server() {
    let local = scenario(false);
    let remote = scenario(true);
    if local != remote {
        // Both in files beside the test's target, for `diff`.
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::write(dir.join("snapshot-local.txt"), &local).unwrap();
        std::fs::write(dir.join("snapshot-remote.txt"), &remote).unwrap();
        panic!(
            "local and --server output differ: diff {}/snapshot-{{local,remote}}.txt",
            dir.display()
        );
    }
    insta::assert_snapshot!("commands", local);
}
