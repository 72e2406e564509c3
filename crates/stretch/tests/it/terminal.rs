//! Output on a terminal: the binary runs on a pseudo-terminal, a terminal emulator
//! (vt100) reads what it drew, and the final screen is snapshotted — the live bars
//! gone, the lines left. Elsewhere (pipes, CI, `TERM=dumb`, `--json`, `-q`) nothing
//! is drawn: the plain lines of the `commands` snapshot.

use std::io::Read;
use std::num::NonZeroU16;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use super::common::Ctx;
use super::deploy::World;
use super::serve::{Serve, TOKEN as SERVER_TOKEN};
use super::snapshots::{fixed_times, hex_runs, is_engine_build_line};

/// The emulated screen: wide enough that no line wraps, tall enough that nothing
/// scrolls away. The program is told the same width (bars fill the width, and the
/// terminal wraps them), and fewer rows.
const COLS: NonZeroU16 = NonZeroU16::new(200).unwrap();
const ROWS: NonZeroU16 = NonZeroU16::new(1000).unwrap();

/// What a command wrote on a pseudo-terminal (stdout and stderr both), raw.
struct Drawn {
    code: i32,
    raw: Vec<u8>,
}

impl Drawn {
    /// The screen once the command ended, trailing blanks cut.
    fn screen(&self) -> String {
        let mut parser = vt100::Parser::new(ROWS, COLS, 0);
        parser.process(&self.raw);
        let text = parser.screen().contents();
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        lines.join("\n").trim_end().to_string() + "\n"
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    /// Whether bars were drawn: lines erased and the cursor moved back over them.
    fn drew_bars(&self) -> bool {
        self.text().contains("\x1b[2K")
    }
}

/// Run `cmd` with stdout and stderr on a new pseudo-terminal of 40 rows by [`COLS`]
/// columns, as a terminal of type `term`.
fn on_a_terminal(mut cmd: Command, term: &str) -> Drawn {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().expect("pts path"))
        .expect("open the pty")
        .into();
    rustix::termios::tcsetwinsize(
        &slave,
        rustix::termios::Winsize {
            ws_row: 40,
            ws_col: COLS.get(),
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .expect("window size");
    cmd.env_remove("CI")
        .env_remove("NO_COLOR")
        .env("TERM", term)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave));
    let mut child = cmd.spawn().expect("run stretch");
    // Our copies of the slave are gone with `cmd`: reading ends when the child's do.
    drop(cmd);
    let mut raw = Vec::new();
    let mut master = std::fs::File::from(master);
    let mut buf = [0u8; 8192];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // EIO: every writer closed the terminal.
            Err(_) => break,
        }
    }
    let code = child.wait().expect("wait").code().unwrap_or(-1);
    Drawn { code, raw }
}

/// What differs from one run to the next made fixed, as in the `commands` snapshot.
fn normalized(w: &World, text: &str) -> String {
    let mut text = text.to_string();
    let releases = w.ctx.run(&["releases", "--json"]).ok().json();
    for (i, r) in releases.as_array().unwrap().iter().rev().enumerate() {
        let id = r["id"].as_str().unwrap();
        let name = r["name"].as_str().unwrap();
        text = text.replace(id, &format!("<R{}>", i + 1));
        text = text.replace(&id[..12], &format!("<R{}>", i + 1));
        text = text.replace(name, &format!("<name{}>", i + 1));
    }
    text = text.replace(&w.system, "<system>");
    for (i, a) in w.agents.iter().enumerate() {
        text = text.replace(&a.addr, &format!("<agent{i}>"));
    }
    text = text.replace(&format!(":{}", w.listen), ":<listen>");
    text = text.replace(&w.ctx.path().display().to_string(), "<dir>");
    let text: Vec<String> = fixed_times(&hex_runs(&text))
        .lines()
        .filter(|l| !is_engine_build_line(l))
        .map(|l| {
            // Sizes follow the system's (unique) name.
            let words: Vec<String> = l
                .split(' ')
                .collect::<Vec<_>>()
                .windows(2)
                .map(|w| match w {
                    [n, "bytes:"] if n.bytes().all(|b| b.is_ascii_digit()) => "<n>".into(),
                    [n, "not"] if n.bytes().all(|b| b.is_ascii_digit()) => "<n>".into(),
                    [n, _] => n.to_string(),
                    _ => String::new(),
                })
                .chain(l.split(' ').next_back().map(String::from))
                .collect();
            words.join(" ")
        })
        .collect();
    text.join("\n") + "\n"
}

#[test]
fn a_build_and_a_deploy_on_a_terminal_leave_the_lines_and_no_bars() {
    let w = World::new("tty", 2, false);
    let build = on_a_terminal(w.ctx.command(&["build"]), "xterm-256color");
    assert_eq!(build.code, 0, "{}", build.text());
    assert!(build.drew_bars(), "no bars drawn:\n{:?}", build.text());
    // Colour on a terminal: the stage marks are painted.
    assert!(build.text().contains("\x1b[1;34m==>"), "{:?}", build.text());
    let deploy = on_a_terminal(w.ctx.command(&["deploy", "production"]), "xterm-256color");
    assert_eq!(deploy.code, 0, "{}", deploy.text());
    assert!(deploy.drew_bars(), "no bars drawn:\n{:?}", deploy.text());
    let screens = format!(
        "$ stretch build\n{}$ stretch deploy production\n{}",
        build.screen(),
        deploy.screen()
    );
    let screens = normalized(&w, &screens);
    // The bars are gone: every line left is a line of the plain output, or a
    // finished batch's.
    for l in screens.lines() {
        assert!(!l.contains("[==="), "a bar was left: {l}");
    }
    insta::assert_snapshot!("terminal", screens);
}

#[test]
fn a_failed_deploy_on_a_terminal_leaves_the_failed_host_in_place() {
    let w = World::new("tty-fail", 2, false);
    // Never healthy on h1: batch 1 (h0) switches, batch 2 (h1) fails, h0 goes back.
    w.ctx.write(
        "app/templates/mode.jinja",
        "{% if host.name == 'h1' %}broken{% else %}ok{% endif %}\n",
    );
    w.ctx.write(
        "app/container.yml",
        "port: 8080\nhealth: {path: /health.txt, interval: 100ms, timeout: 2s}\nstop_timeout: 1s\n",
    );
    w.ctx.run(&["build"]).ok();
    let deploy = on_a_terminal(w.ctx.command(&["deploy", "production"]), "xterm-256color");
    assert_eq!(deploy.code, 1, "{}", deploy.text());
    let screen = normalized(&w, &deploy.screen());
    let stage = &screen[screen.find("==> change release").unwrap()..];
    let stage = &stage[..stage.find("failed change release").unwrap()];
    let lines: Vec<&str> = stage.lines().map(str::trim).collect();
    for want in [
        "group `web` batch 1/2 done: 1 host(s) switched",
        "group `web` batch 2/2: failed on h1",
        "host `h0`: switched back",
    ] {
        assert!(lines.contains(&want), "no {want:?} in:\n{stage}");
    }
    // The failed host's row stays as a line, with why.
    assert!(
        lines.iter().any(|l| l.starts_with("h1 (web): failed: ")),
        "no failed row in:\n{stage}"
    );
    for l in &lines {
        assert!(!l.contains("[==="), "a bar was left: {l}");
    }
}

#[test]
fn a_build_through_a_server_draws_the_servers_bars() {
    let w = World::new("tty-srv", 1, false);
    let serve = Serve::start(&w.ctx);
    let mut remote = Ctx::new();
    remote
        .env
        .push(("STRETCH_SERVER_TOKEN".into(), SERVER_TOKEN.into()));
    let url = serve.url();
    let build = on_a_terminal(remote.command(&["--server", &url, "build"]), "xterm");
    assert_eq!(build.code, 0, "{}", build.text());
    assert!(build.drew_bars(), "no bars drawn:\n{:?}", build.text());
    // The image's steps came from the server's progress events.
    assert!(
        build.text().contains("image web"),
        "no image row:\n{:?}",
        build.text()
    );
    let screen = build.screen();
    assert!(screen.contains("==> images\n"), "{screen}");
    assert!(!screen.contains("[==="), "a bar was left:\n{screen}");
}

#[test]
fn nothing_is_drawn_in_ci_for_a_dumb_terminal_with_json_or_quiet() {
    let w = World::new("tty-off", 1, false);
    let ci = on_a_terminal_with(w.ctx.command(&["build"]), &[("CI", "true")]);
    assert_eq!(ci.code, 0, "{}", ci.text());
    assert!(!ci.drew_bars(), "bars in CI:\n{:?}", ci.text());
    let dumb = on_a_terminal(w.ctx.command(&["build"]), "dumb");
    assert_eq!(dumb.code, 0);
    assert!(
        !dumb.text().contains('\x1b'),
        "escape codes for a dumb terminal:\n{:?}",
        dumb.text()
    );
    for args in [["build", "--json"], ["-q", "build"]] {
        let d = on_a_terminal(w.ctx.command(&args), "xterm");
        assert_eq!(d.code, 0);
        assert!(!d.drew_bars(), "bars with {args:?}:\n{:?}", d.text());
    }
    // Piped, as always: no escape code at all.
    let mut piped = w.ctx.command(&["build"]);
    piped.env_remove("NO_COLOR").env("TERM", "xterm");
    let out = piped.output().unwrap();
    assert!(out.status.success());
    assert!(!out.stderr.contains(&0x1b) && !out.stdout.contains(&0x1b));
}

/// [`on_a_terminal`] with `env` set after the defaults.
fn on_a_terminal_with(cmd: Command, env: &[(&str, &str)]) -> Drawn {
    // `on_a_terminal` takes `CI` away; `env` sets it again just before stretch runs.
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut wrapped = Command::new("env");
    for (k, v) in env {
        wrapped.arg(format!("{k}={v}"));
    }
    wrapped.arg(program).args(args);
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    drop(cmd);
    on_a_terminal(wrapped, "xterm")
}
