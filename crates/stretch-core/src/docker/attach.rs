//! Streams into and out of containers, for the agent's `logs` and `exec`: an
//! instance's output as timestamped lines, a command run with its streams attached
//! (optionally on a terminal), and a one-off container of an instance's image.

use std::pin::Pin;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, LogsOptions, ResizeContainerTTYOptions,
    WaitContainerOptions,
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWrite;

use super::{ContainerSpec, Docker, describe};
use crate::{Error, Result};

fn docker_error(what: String, e: &bollard::errors::Error) -> Error {
    Error::failed("docker", format!("{what}: {}", describe(e)))
}

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Stdout,
    Stderr,
}

/// One line of a container's log: the engine's timestamp (RFC 3339, nanoseconds) and
/// the text without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub out: Out,
    pub time: String,
    pub text: String,
}

/// Output as it comes, each piece with the stream it came from.
pub type OutputStream = Pin<Box<dyn Stream<Item = Result<(Out, Bytes)>> + Send>>;

/// A command's or container's attached streams.
pub struct Attached {
    pub output: OutputStream,
    pub input: Pin<Box<dyn AsyncWrite + Send>>,
}

fn attached(
    output: Pin<
        Box<dyn Stream<Item = std::result::Result<LogOutput, bollard::errors::Error>> + Send>,
    >,
    input: Pin<Box<dyn AsyncWrite + Send>>,
    what: String,
) -> Attached {
    let output = output.filter_map(move |item| {
        let r = match item {
            // On a terminal both streams arrive as one (`Console`).
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                Some(Ok((Out::Stdout, message)))
            }
            Ok(LogOutput::StdErr { message }) => Some(Ok((Out::Stderr, message))),
            Ok(LogOutput::StdIn { .. }) => None,
            Err(e) => Some(Err(docker_error(what.clone(), &e))),
        };
        std::future::ready(r)
    });
    Attached {
        output: Box::pin(output),
        input,
    }
}

/// Split `2026-12-04T09:00:00.123456789Z text` into its time and text.
fn split_entry(out: Out, message: &[u8], max: usize) -> LogEntry {
    let text = String::from_utf8_lossy(message);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    let (time, text) = text.split_once(' ').unwrap_or(("", text));
    let mut text = text.to_string();
    if text.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    LogEntry {
        out,
        time: time.to_string(),
        text,
    }
}

impl Docker {
    /// A container's log as lines (each at most `max_line` bytes): those since
    /// `since` (unix seconds, 0 for all), only the last `tail` of them when given, and
    /// with `follow` every new one until the container stops.
    pub fn log_lines(
        &self,
        id: &str,
        follow: bool,
        since: i64,
        tail: Option<usize>,
        max_line: usize,
    ) -> impl Stream<Item = Result<LogEntry>> + Send + use<> {
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            since: since.clamp(0, i32::MAX as i64) as i32,
            timestamps: true,
            tail: tail.map_or("all".to_string(), |n| n.to_string()),
            ..Default::default()
        };
        let what = format!("reading the log of container {id}");
        self.inner.logs(id, Some(options)).filter_map(move |item| {
            let r = match item {
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    Some(Ok(split_entry(Out::Stdout, &message, max_line)))
                }
                Ok(LogOutput::StdErr { message }) => {
                    Some(Ok(split_entry(Out::Stderr, &message, max_line)))
                }
                Ok(LogOutput::StdIn { .. }) => None,
                Err(e) => Some(Err(docker_error(what.clone(), &e))),
            };
            std::future::ready(r)
        })
    }

    /// Start `cmd` in the running container `id` with its output attached (and its
    /// input with `stdin`; on a terminal with `tty`). Returns the exec's id and streams.
    pub async fn exec_attached(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<(String, Attached)> {
        let what = || format!("running `{}` in container {id}", cmd.join(" "));
        let config = CreateExecOptions {
            cmd: Some(cmd.to_vec()),
            attach_stdin: Some(stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(tty),
            ..Default::default()
        };
        let exec = self
            .inner
            .create_exec(id, config)
            .await
            .map_err(|e| docker_error(what(), &e))?;
        let options = StartExecOptions {
            detach: false,
            tty,
            output_capacity: Some(64 * 1024),
        };
        match self.inner.start_exec(&exec.id, Some(options)).await {
            Ok(StartExecResults::Attached { output, input }) => {
                Ok((exec.id, attached(output, input, what())))
            }
            Ok(StartExecResults::Detached) => Err(Error::failed(
                "docker",
                format!("{}: the engine did not attach", what()),
            )),
            Err(e) => Err(docker_error(what(), &e)),
        }
    }

    /// The exit code of an exec whose output ended (waits a little for the engine to
    /// record it).
    pub async fn exec_exit_code(&self, exec_id: &str) -> Result<i64> {
        for _ in 0..100 {
            let inspect = self
                .inner
                .inspect_exec(exec_id)
                .await
                .map_err(|e| docker_error(format!("inspecting exec {exec_id}"), &e))?;
            if inspect.running != Some(true) {
                return Ok(inspect.exit_code.unwrap_or(-1));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Err(Error::failed(
            "docker",
            format!("exec {exec_id}: the command did not end"),
        ))
    }

    /// Resize an exec's terminal (best effort: a command may end first).
    pub async fn resize_exec(&self, exec_id: &str, width: u16, height: u16) {
        let _ = self
            .inner
            .resize_exec(exec_id, ResizeExecOptions { height, width })
            .await;
    }

    /// Resize a container's terminal (best effort).
    pub async fn resize_container(&self, id: &str, width: u16, height: u16) {
        let options = ResizeContainerTTYOptions {
            h: i32::from(height),
            w: i32::from(width),
        };
        let _ = self.inner.resize_container_tty(id, options).await;
    }

    /// Create a one-off container running `spec.cmd` with `spec`'s image, environment,
    /// labels and mount: no published port, no restart policy, attached streams.
    pub async fn create_oneshot(
        &self,
        spec: &ContainerSpec,
        tty: bool,
        stdin: bool,
    ) -> Result<String> {
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            env: Some(spec.env.clone()),
            cmd: spec.cmd.clone(),
            tty: Some(tty),
            open_stdin: Some(stdin),
            stdin_once: Some(stdin),
            attach_stdin: Some(stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                mounts: Some(vec![spec.mount()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        self.inner
            .create_container(Some(options), body)
            .await
            .map(|c| c.id)
            .map_err(|e| {
                docker_error(
                    format!("creating container {} from {}", spec.name, spec.image),
                    &e,
                )
            })
    }

    /// Attach to a created container's streams (before starting it, so that no output
    /// is missed).
    pub async fn attach(&self, id: &str, stdin: bool) -> Result<Attached> {
        let options = AttachContainerOptions {
            stdin,
            stdout: true,
            stderr: true,
            stream: true,
            // Attached before the start: nothing to replay, and a replay could repeat
            // output written while the stream is being attached.
            logs: false,
            detach_keys: None,
        };
        let what = format!("attaching to container {id}");
        let r = self
            .inner
            .attach_container(id, Some(options))
            .await
            .map_err(|e| docker_error(what.clone(), &e))?;
        Ok(attached(r.output, r.input, what))
    }

    /// Wait until container `id` stops; its exit code.
    pub async fn wait_exit(&self, id: &str) -> Result<i64> {
        let options = WaitContainerOptions {
            condition: "not-running".to_string(),
        };
        let mut stream = self.inner.wait_container(id, Some(options));
        match stream.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            // The client library reports a non-zero exit as an error carrying it.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(docker_error(format!("waiting for container {id}"), &e)),
            None => Err(Error::failed(
                "docker",
                format!("waiting for container {id}: no answer"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_split_time_and_text() {
        let e = split_entry(
            Out::Stdout,
            b"2026-12-04T09:00:00.123456789Z hello world\n",
            100,
        );
        assert_eq!(e.time, "2026-12-04T09:00:00.123456789Z");
        assert_eq!(e.text, "hello world");
        let e = split_entry(Out::Stderr, b"2026-12-04T09:00:00.1Z \r\n", 100);
        assert_eq!(e.text, "");
        let e = split_entry(Out::Stdout, "2026-12-04T09:00:00Z ééé".as_bytes(), 3);
        assert_eq!(e.text, "é…");
    }
}
