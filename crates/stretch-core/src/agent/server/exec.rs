//! `POST …/{group}/exec`: a command in a running instance, or in a one-off container
//! of the group's current release (`new`), with its streams carried over the upgraded
//! connection as [`crate::agent::api::exec`] frames.
//!
//! Bounded: at most [`MAX_SESSIONS`] at once per agent, frames of at most
//! [`exec::MAX_FRAME`] bytes, and a session with no byte either way for
//! [`SESSION_IDLE`] ends. A one-off container is removed when its session ends, however
//! it ends (and, were the agent killed first, as an orphan at its next start: it
//! carries the agent's label).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::files::{self, MOUNT_TARGET};
use super::groups::Agent;
use super::instances::{display, environment};
use super::state::random_hex;
use super::{ApiError, ApiResult};
use crate::agent::api::{EXEC_UPGRADE, ExecRequest, GroupKey, GroupSpec, exec};
use crate::docker::ContainerSpec;
use crate::docker::attach::{Attached, Out};
use crate::{Error, Result};

/// Exec sessions one agent serves at once.
pub const MAX_SESSIONS: usize = 16;
/// A session with no byte either way for this long ends.
const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// Most arguments, and bytes of them, a command may have.
const MAX_ARGS: usize = 1024;
const MAX_ARG_BYTES: usize = 256 * 1024;

/// Where the command runs.
enum Target {
    Instance { container: String, name: String },
    New { spec: Box<GroupSpec> },
}

/// Check the request, pick the target, answer `101` and run the session once the
/// connection is upgraded. Errors before the upgrade are ordinary error answers.
pub async fn start(
    agent: Arc<Agent>,
    key: GroupKey,
    req: ExecRequest,
    upgrade: Option<OnUpgrade>,
) -> ApiResult<Response> {
    let Some(upgrade) = upgrade else {
        return Err(ApiError::bad_request(format!(
            "exec needs `Connection: upgrade` and `Upgrade: {EXEC_UPGRADE}`"
        )));
    };
    if req.cmd.is_empty() || req.cmd[0].is_empty() {
        return Err(ApiError::bad_request("exec needs a command"));
    }
    let bytes: usize = req.cmd.iter().map(String::len).sum();
    if req.cmd.len() > MAX_ARGS || bytes > MAX_ARG_BYTES {
        return Err(ApiError::bad_request(format!(
            "a command has at most {MAX_ARGS} arguments and {MAX_ARG_BYTES} bytes"
        )));
    }
    let Some(spec) = agent.record(&key).and_then(|r| r.current) else {
        return Err(ApiError::not_found(format!(
            "group `{}` of `{}/{}` runs nothing here",
            key.group, key.system, key.environment
        )));
    };
    let permit = agent
        .exec_sessions
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::unavailable(format!(
                "this agent already runs {MAX_SESSIONS} exec sessions; try again later"
            ))
        })?;
    let target = if req.new {
        Target::New {
            spec: Box::new(spec),
        }
    } else {
        pick_instance(&agent, &key, req.instance).await?
    };
    let what = match &target {
        Target::Instance { name, .. } => format!("instance {name}"),
        Target::New { .. } => "a new container".to_string(),
    };
    agent.log.line(format!(
        "{}: exec `{}` in {what}",
        display(&key),
        req.cmd.join(" ")
    ));
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        session(agent, req, target, TokioIo::new(upgraded), permit).await;
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(EXEC_UPGRADE));
    Ok(resp)
}

/// The instance asked for, else the first healthy one, else the first running one.
async fn pick_instance(agent: &Agent, key: &GroupKey, index: Option<u32>) -> ApiResult<Target> {
    let status = agent.status(key).await;
    let record = agent.record(key).map(|r| r.instances).unwrap_or_default();
    let name_of = |container: &str| {
        record
            .iter()
            .find(|r| r.container == container)
            .map_or(container.to_string(), |r| r.name.clone())
    };
    let chosen = match index {
        Some(i) => status
            .instances
            .iter()
            .find(|s| s.index == i)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "group {} has no instance {i} on this host",
                    display(key)
                ))
            })?,
        None => status
            .instances
            .iter()
            .find(|s| s.healthy && s.state == "running")
            .or_else(|| status.instances.iter().find(|s| s.state == "running"))
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "group {} has no running instance on this host",
                    display(key)
                ))
            })?,
    };
    Ok(Target::Instance {
        container: chosen.container.clone(),
        name: name_of(&chosen.container),
    })
}

/// What the agent sends: output, then one last frame (exit status or error).
async fn session<IO>(
    agent: Arc<Agent>,
    req: ExecRequest,
    target: Target,
    io: IO,
    _permit: OwnedSemaphorePermit,
) where
    IO: tokio::io::AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    // Frames from the client, read by their own task: reading a frame cannot be
    // cancelled half way by the select below.
    let (frames_tx, mut frames) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let reader = tokio::spawn(async move {
        while let Ok(Some(f)) = exec::read_frame(&mut rd).await {
            if frames_tx.send(f).await.is_err() {
                break;
            }
        }
    });
    let last = match &target {
        Target::Instance { container, .. } => {
            run_in_instance(&agent, container, &req, &mut frames, &mut wr).await
        }
        Target::New { spec } => run_new(&agent, spec, &req, &mut frames, &mut wr).await,
    };
    let frame = match last {
        Ok(code) => exec::frame(
            exec::EXIT,
            &(code.clamp(i32::MIN.into(), i32::MAX.into()) as i32).to_be_bytes(),
        ),
        Err(e) => exec::frame(exec::ERROR, e.to_string().as_bytes()),
    };
    let _ = wr.write_all(&frame).await;
    let _ = wr.shutdown().await;
    reader.abort();
}

async fn run_in_instance<W: AsyncWrite + Unpin>(
    agent: &Agent,
    container: &str,
    req: &ExecRequest,
    frames: &mut mpsc::Receiver<(u8, Vec<u8>)>,
    wr: &mut W,
) -> Result<i64> {
    let (exec_id, attached) = agent
        .docker
        .exec_attached(container, &req.cmd, req.tty, req.stdin)
        .await?;
    if let (true, Some((w, h))) = (req.tty, req.size) {
        agent.docker.resize_exec(&exec_id, w, h).await;
    }
    let docker = agent.docker.clone();
    let id = exec_id.clone();
    let resize = move |w, h| {
        let docker = docker.clone();
        let id = id.clone();
        async move { docker.resize_exec(&id, w, h).await }
    };
    pump(attached, frames, wr, resize).await?;
    agent.docker.exec_exit_code(&exec_id).await
}

async fn run_new<W: AsyncWrite + Unpin>(
    agent: &Agent,
    spec: &GroupSpec,
    req: &ExecRequest,
    frames: &mut mpsc::Receiver<(u8, Vec<u8>)>,
    wr: &mut W,
) -> Result<i64> {
    let name = format!(
        "stretch-exec-{}-{}",
        spec.key
            .group
            .replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
        random_hex(6)?
    );
    let dir = agent.data.instance_dir(&name);
    // Configured as instance 0 is: the same files, environment and image.
    let result = async {
        files::write_instance_blocking(dir.clone(), spec, 0).await?;
        let container = ContainerSpec {
            name: name.clone(),
            image: spec.image.clone(),
            labels: [
                ("stretch.agent", agent.data.agent_id.as_str()),
                ("stretch.exec", "1"),
                ("stretch.system", &spec.key.system),
                ("stretch.environment", &spec.key.environment),
                ("stretch.group", &spec.key.group),
                ("stretch.release", &spec.release.id),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            env: environment(spec, 0),
            cmd: Some(req.cmd.clone()),
            port: None,
            mount_source: dir.clone(),
            mount_target: MOUNT_TARGET.to_string(),
            stop_timeout: None,
        };
        let id = agent
            .docker
            .create_oneshot(&container, req.tty, req.stdin)
            .await?;
        let run = async {
            let attached = agent.docker.attach(&id, req.stdin).await?;
            agent.docker.start_container(&id).await?;
            if let (true, Some((w, h))) = (req.tty, req.size) {
                agent.docker.resize_container(&id, w, h).await;
            }
            let docker = agent.docker.clone();
            let cid = id.clone();
            let resize = move |w, h| {
                let docker = docker.clone();
                let cid = cid.clone();
                async move { docker.resize_container(&cid, w, h).await }
            };
            pump(attached, frames, wr, resize).await?;
            agent.docker.wait_exit(&id).await
        };
        let r = run.await;
        if let Err(e) = agent.docker.remove_container(&id).await {
            agent.log.line(format!("exec: removing {name}: {e}"));
        }
        r
    }
    .await;
    let _ = files::remove_instance(&dir);
    result
}

/// Carry output to the client and the client's frames to the command until the
/// output ends (the command did) or the client goes.
async fn pump<W, F, Fut>(
    mut attached: Attached,
    frames: &mut mpsc::Receiver<(u8, Vec<u8>)>,
    wr: &mut W,
    resize: F,
) -> Result<()>
where
    W: AsyncWrite + Unpin,
    F: Fn(u16, u16) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let gone = |e: std::io::Error| Error::failed("exec", format!("the client went away: {e}"));
    let mut input_open = true;
    loop {
        tokio::select! {
            out = attached.output.next() => match out {
                Some(Ok((out, bytes))) => {
                    let kind = match out {
                        Out::Stdout => exec::STDOUT,
                        Out::Stderr => exec::STDERR,
                    };
                    for piece in bytes.chunks(exec::MAX_FRAME) {
                        wr.write_all(&exec::frame(kind, piece)).await.map_err(gone)?;
                    }
                    wr.flush().await.map_err(gone)?;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            frame = frames.recv() => match frame {
                Some((exec::STDIN, data)) if input_open => {
                    if attached.input.write_all(&data).await.is_err() {
                        input_open = false;
                    }
                    let _ = attached.input.flush().await;
                }
                Some((exec::STDIN_END, _)) if input_open => {
                    input_open = false;
                    let _ = attached.input.shutdown().await;
                }
                Some((exec::RESIZE, data)) if data.len() == 4 => {
                    let w = u16::from_be_bytes([data[0], data[1]]);
                    let h = u16::from_be_bytes([data[2], data[3]]);
                    resize(w, h).await;
                }
                Some(_) => {}
                None => {
                    return Err(Error::failed("exec", "the client went away"));
                }
            },
            () = tokio::time::sleep(SESSION_IDLE) => {
                return Err(Error::failed(
                    "exec",
                    format!("nothing moved for {} minutes", SESSION_IDLE.as_secs() / 60),
                ));
            }
        }
    }
}
