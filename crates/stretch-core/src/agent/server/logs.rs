//! `GET …/{group}/logs`: the output of a group's instances as JSON lines, streamed.
//!
//! Bounded: at most [`MAX_STREAMS`] streams at once per agent, lines cut at
//! [`MAX_LOG_LINE`], and a buffer of [`BUFFER_LINES`] lines between the engine and the
//! client, so a slow reader slows the engine's stream instead of growing the agent's
//! memory. A followed stream sends an empty line every [`LOG_KEEPALIVE_SECS`] while
//! nothing is said, so that a vanished client is noticed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;

use super::groups::Agent;
use super::state::InstanceRecord;
use super::{ApiError, ApiResult};
use crate::agent::api::{
    GroupKey, LOG_KEEPALIVE_SECS, LogLine, LogQuery, MAX_LOG_LINE, MAX_LOG_TAIL,
};
use crate::docker::attach::Out;

/// Log streams one agent serves at once.
pub const MAX_STREAMS: usize = 32;
/// Lines held between the engine and a slow client.
const BUFFER_LINES: usize = 256;
/// How often a followed stream looks for new instances.
const POLL: Duration = Duration::from_millis(250);

/// Answer a logs request: the stream starts at once; its lines follow.
pub async fn logs(agent: Arc<Agent>, key: GroupKey, query: LogQuery) -> ApiResult<Response> {
    if query.tail.is_some_and(|t| t > MAX_LOG_TAIL) {
        return Err(ApiError::bad_request(format!(
            "tail is at most {MAX_LOG_TAIL} lines"
        )));
    }
    let Some(record) = agent.record(&key) else {
        return Err(ApiError::not_found(format!(
            "group `{}` of `{}/{}` runs nothing here",
            key.group, key.system, key.environment
        )));
    };
    let permit = agent.log_streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::unavailable(format!(
            "this agent already serves {MAX_STREAMS} log streams; try again later"
        ))
    })?;
    let host = record
        .current
        .as_ref()
        .map(|s| s.host.clone())
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFER_LINES);
    let pump = tokio::spawn(pump(agent, key, host, query.clone(), tx));
    let body = Body::from_stream(lines(
        rx,
        query.follow,
        Guard {
            pump,
            _permit: permit,
        },
    ));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

/// Ends the pump when the response is dropped (client gone) and frees the slot.
struct Guard {
    pump: tokio::task::JoinHandle<()>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// The body: lines as they come, keepalives while a followed stream is quiet.
fn lines(
    rx: mpsc::Receiver<Bytes>,
    follow: bool,
    guard: Guard,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures_util::stream::unfold((rx, guard), move |(mut rx, guard)| async move {
        let next = if follow {
            match tokio::time::timeout(Duration::from_secs(LOG_KEEPALIVE_SECS), rx.recv()).await {
                Ok(line) => line,
                Err(_) => Some(Bytes::from_static(b"\n")),
            }
        } else {
            rx.recv().await
        };
        next.map(|line| (Ok(line), (rx, guard)))
    })
}

/// Stream every current instance (and, following, every later one) into `tx`.
async fn pump(
    agent: Arc<Agent>,
    key: GroupKey,
    host: String,
    query: LogQuery,
    tx: mpsc::Sender<Bytes>,
) {
    let mut seen: HashSet<String> = HashSet::new();
    let mut readers = JoinSet::new();
    let mut first = true;
    loop {
        let instances = agent.record(&key).map(|r| r.instances).unwrap_or_default();
        for inst in instances {
            if !seen.insert(inst.container.clone()) {
                continue;
            }
            // Instances there from the start get the query's window; later ones
            // (a deploy's) are read from their first line.
            let (since, tail) = if first {
                (query.since.unwrap_or(0), query.tail)
            } else {
                (0, None)
            };
            let reader = Reader {
                agent: agent.clone(),
                host: host.clone(),
                group: key.group.clone(),
                inst,
            };
            readers.spawn(reader.run(query.follow, since, tail, tx.clone()));
        }
        first = false;
        if !query.follow {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = tx.closed() => break,
        }
        // Reap readers of stopped instances.
        while readers.try_join_next().is_some() {}
    }
    while readers.join_next().await.is_some() {}
}

struct Reader {
    agent: Arc<Agent>,
    host: String,
    group: String,
    inst: InstanceRecord,
}

impl Reader {
    async fn run(self, follow: bool, since: i64, tail: Option<usize>, tx: mpsc::Sender<Bytes>) {
        let mut stream = Box::pin(self.agent.docker.log_lines(
            &self.inst.container,
            follow,
            since,
            tail,
            MAX_LOG_LINE,
        ));
        while let Some(item) = stream.next().await {
            let line = match item {
                Ok(e) => LogLine {
                    time: e.time,
                    host: self.host.clone(),
                    group: self.group.clone(),
                    instance: self.inst.index,
                    container: self.inst.name.clone(),
                    release_id: self.inst.release_id.clone(),
                    stream: match e.out {
                        Out::Stdout => "stdout",
                        Out::Stderr => "stderr",
                    }
                    .to_string(),
                    line: e.text,
                },
                // A container removed while read: its stream just ends.
                Err(_) => return,
            };
            let Ok(mut bytes) = serde_json::to_vec(&line) else {
                continue;
            };
            bytes.push(b'\n');
            if tx.send(Bytes::from(bytes)).await.is_err() {
                return;
            }
        }
    }
}
