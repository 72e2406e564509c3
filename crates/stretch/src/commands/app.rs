//! `stretch app logs|exec|restart`: day-two operations on a deployed environment,
//! through its agents.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;

use stretch_core::agent::api::{ExecRequest, LogLine, LogQuery, MAX_LOG_TAIL, exec};
use stretch_core::log::Log;
use stretch_core::{Error, Result, app};
use tokio::io::AsyncWriteExt;

use crate::cli::{AppCommand, AppExecArgs, AppLogsArgs};
use crate::printer::Printer;
use crate::render;
use crate::settings::Settings;

/// Lines of each instance shown when neither `-n` nor `--since` says.
const DEFAULT_LINES: usize = 100;

/// Run one `app` command; its exit status (exec: the command's).
pub async fn run(cmd: AppCommand, settings: &Settings, printer: &Printer) -> Result<u8> {
    match cmd {
        AppCommand::Logs(a) => logs(a, settings, printer).await.map(|()| 0),
        AppCommand::Exec(a) => exec_cmd(a, settings, printer).await,
        AppCommand::Restart {
            environment,
            group,
            wait,
        } => {
            let system = super::load_system(settings)?;
            let (home, store) = super::open_home(settings)?;
            let log = Log::new(vec![printer.progress()]);
            let done = app::restart(
                &system,
                &home,
                &store,
                &environment,
                group.as_deref(),
                wait,
                &log,
            )
            .await?;
            render::show(printer, &done);
            Ok(0)
        }
    }
}

async fn logs(a: AppLogsArgs, settings: &Settings, printer: &Printer) -> Result<()> {
    let system = super::load_system(settings)?;
    let home = stretch_core::home::Home::open(&settings.home)?;
    let targets = app::targets(
        &system,
        &a.environment,
        a.group.as_deref(),
        a.host.as_deref(),
    )?;
    let since = a.since.as_deref().map(parse_since).transpose()?;
    if a.lines.is_some_and(|n| n > MAX_LOG_TAIL) {
        return Err(Error::invalid(format!(
            "`-n` is at most {MAX_LOG_TAIL} lines"
        )));
    }
    let query = LogQuery {
        since,
        tail: a.lines.or((since.is_none()).then_some(DEFAULT_LINES)),
        follow: a.follow,
    };
    let log = Log::new(vec![printer.progress()]);
    let mut printed = 0usize;
    let print = |l: LogLine| {
        printed += 1;
        render::app_log_line(printer, &l);
    };
    let read = app::logs(
        &system,
        &home,
        &a.environment,
        &targets,
        &query,
        &log,
        print,
    );
    if !a.follow {
        read.await?;
        if printed == 0 {
            printer.info("no lines: the instances wrote nothing in that window");
        }
        return Ok(());
    }
    // Following ends on Ctrl-C (or when every agent ends its stream).
    tokio::select! {
        r = read => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// `10s`, `5m`, `2h`, `1d` ago, or a unix time in seconds; as unix seconds.
fn parse_since(s: &str) -> Result<i64> {
    let bad = || {
        Error::invalid_with_help(
            format!("`--since {s}` is not a duration"),
            "give a duration like `30s`, `10m`, `2h`, `1d` (or unix seconds)",
        )
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let s = s.trim();
    if let Ok(unix) = s.parse::<i64>() {
        return Ok(unix);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    if n < 0 {
        return Err(bad());
    }
    Ok(now - secs)
}

async fn exec_cmd(a: AppExecArgs, settings: &Settings, printer: &Printer) -> Result<u8> {
    let system = super::load_system(settings)?;
    let home = stretch_core::home::Home::open(&settings.home)?;
    let targets = app::targets(
        &system,
        &a.environment,
        Some(a.group.as_str()),
        a.host.as_deref(),
    )?;
    let stdin_tty = std::io::stdin().is_terminal();
    if a.tty && !stdin_tty {
        return Err(Error::invalid(
            "`-t` needs a terminal on stdin (drop `-t`, keep `-i` to pipe input)",
        ));
    }
    let size = if a.tty {
        rustix::termios::tcgetwinsize(std::io::stdout().as_fd())
            .ok()
            .map(|w| (w.ws_col, w.ws_row))
    } else {
        None
    };
    let req = ExecRequest {
        cmd: a.command.clone(),
        instance: a.instance,
        new: a.new,
        stdin: a.interactive,
        tty: a.tty,
        size,
    };
    let log = Log::new(vec![printer.progress()]);
    let (host, io) = app::exec(&system, &home, &a.environment, &targets, &req, &log).await?;
    log.line(format!(
        "exec on host `{host}`{}",
        if a.new { " (new container)" } else { "" }
    ));
    let raw = if a.tty { RawMode::enter() } else { None };
    let code = session(io, a.interactive, a.tty).await;
    drop(raw);
    code
}

/// Carry the frames of one session: output to stdout and stderr, stdin (with `-i`)
/// and terminal resizes (with `-t`) to the agent. The command's exit status.
async fn session<IO>(io: IO, interactive: bool, tty: bool) -> Result<u8>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    let wr = std::sync::Arc::new(tokio::sync::Mutex::new(wr));
    let mut feeders = Vec::new();
    if interactive {
        // Input is read on a thread of its own (blocking reads; it may outlive the
        // session, blocked on a read, until the process exits).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = std::io::Read::read(&mut stdin, &mut buf).unwrap_or(0);
                if tx.blocking_send(buf[..n].to_vec()).is_err() || n == 0 {
                    break;
                }
            }
        });
        let wr = wr.clone();
        feeders.push(tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                let frame = if data.is_empty() {
                    exec::frame(exec::STDIN_END, &[])
                } else {
                    exec::frame(exec::STDIN, &data)
                };
                let mut w = wr.lock().await;
                if w.write_all(&frame).await.is_err() || w.flush().await.is_err() || data.is_empty()
                {
                    break;
                }
            }
        }));
    } else {
        let mut w = wr.lock().await;
        let _ = w.write_all(&exec::frame(exec::STDIN_END, &[])).await;
        let _ = w.flush().await;
    }
    if tty {
        let wr = wr.clone();
        feeders.push(tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                let Ok(w) = rustix::termios::tcgetwinsize(std::io::stdout().as_fd()) else {
                    continue;
                };
                let mut size = w.ws_col.to_be_bytes().to_vec();
                size.extend_from_slice(&w.ws_row.to_be_bytes());
                let mut out = wr.lock().await;
                if out
                    .write_all(&exec::frame(exec::RESIZE, &size))
                    .await
                    .is_err()
                {
                    break;
                }
                let _ = out.flush().await;
            }
        }));
    }
    let lost = |e: String| Error::failed("exec", format!("the connection to the agent broke: {e}"));
    let result = loop {
        let frame = match exec::read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break Err(lost("it closed before the command's exit status".into())),
            Err(e) => break Err(lost(e.to_string())),
        };
        match frame {
            (exec::STDOUT, data) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&data);
                let _ = out.flush();
            }
            (exec::STDERR, data) => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(&data);
                let _ = err.flush();
            }
            (exec::EXIT, data) if data.len() == 4 => {
                let code = i32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                // Exit statuses are 0–255; a signal's death is reported as 128+N.
                break Ok(code.clamp(0, 255) as u8);
            }
            (exec::ERROR, data) => {
                break Err(Error::failed(
                    "exec",
                    String::from_utf8_lossy(&data).to_string(),
                ));
            }
            _ => {}
        }
    };
    for f in feeders {
        f.abort();
    }
    result
}

/// The local terminal in raw mode for `-t` (keys go to the remote command as typed),
/// restored when dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_unix_seconds() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((parse_since("10m").unwrap() - (now - 600)).abs() <= 2);
        assert!((parse_since("2h").unwrap() - (now - 7200)).abs() <= 2);
        assert!((parse_since("1d").unwrap() - (now - 86_400)).abs() <= 2);
        assert_eq!(parse_since("1700000000").unwrap(), 1_700_000_000);
        for bad in ["", "m", "10x", "ten minutes", "-5m"] {
            let e = parse_since(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }
}
