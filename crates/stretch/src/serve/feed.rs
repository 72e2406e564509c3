//! Live log feeds: one reader per followed run, however many follow it.
//!
//! A run's lines come from the store (by `seq`), so runs started by the CLI in another
//! process stream like the server's own. Each followed run has one [`Feed`]: a task
//! polls the store for new lines, renders each as a Server-Sent Event once, and keeps
//! them in memory; every follower copies what it has not sent yet from there. Twenty
//! followers of one run cost one SQLite query per poll and one rendering per line, not
//! twenty. The feed (and its memory) goes away with its last follower. A run this
//! server runs also has `progress` events (its bars, as rows), latest only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use stretch_core::store::RunStatus;
use tokio::sync::watch;

use super::Shared;

/// How often a feed looks for new lines when the last look found none.
const POLL: Duration = Duration::from_millis(50);
/// The most a follower copies out of a feed at once.
const CHUNK: usize = 256 * 1024;
/// A comment line this often keeps idle connections (and proxies) from timing out.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Default)]
pub struct Feeds {
    runs: Mutex<HashMap<i64, Weak<Feed>>>,
}

struct Feed {
    state: Mutex<FeedState>,
    /// Bumped whenever lines or the end arrive.
    version: watch::Sender<u64>,
}

#[derive(Default)]
struct FeedState {
    /// Every line read so far: its seq and its rendered event.
    lines: Vec<(i64, Bytes)>,
    /// The `end` event, once the run has finished.
    end: Option<Bytes>,
    /// The latest `progress` event of a run this server runs, and its count.
    progress: Option<(u64, Bytes)>,
}

impl Feeds {
    /// The feed of `run`, started if nobody follows it yet.
    fn get(&self, st: &Shared, run: i64) -> Arc<Feed> {
        let mut runs = match self.runs.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        runs.retain(|_, f| f.strong_count() > 0);
        if let Some(feed) = runs.get(&run).and_then(Weak::upgrade) {
            return feed;
        }
        let (version, _) = watch::channel(0);
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState::default()),
            version,
        });
        runs.insert(run, Arc::downgrade(&feed));
        tokio::spawn(poll(st.clone(), run, Arc::downgrade(&feed)));
        feed
    }
}

/// Read new lines of `run` into its feed until the run ends or nobody follows.
async fn poll(st: Shared, run: i64, feed: Weak<Feed>) {
    let mut after = 0;
    let mut progress_seen = 0;
    loop {
        if feed.strong_count() == 0 {
            return;
        }
        let reader = st.clone();
        // The status is read before the lines: a run seen finished has all its lines.
        let read = tokio::task::spawn_blocking(move || -> stretch_core::Result<_> {
            let record = reader.reader.run(run)?;
            let lines = reader.reader.log(run, after)?;
            Ok((record, lines))
        })
        .await;
        let Some(f) = feed.upgrade() else { return };
        let (rendered, end) = match read {
            Ok(Ok((_, lines))) if !lines.is_empty() => {
                after = lines.last().map(|l| l.seq).unwrap_or(after);
                // One buffer per batch; each line is a slice of it (no allocation each).
                let mut text = Vec::with_capacity(lines.len() * 160);
                let mut ends = Vec::with_capacity(lines.len());
                for l in &lines {
                    text.extend_from_slice(
                        format!("event: line\nid: {}\ndata: ", l.seq).as_bytes(),
                    );
                    let _ = serde_json::to_writer(&mut text, l);
                    text.extend_from_slice(b"\n\n");
                    ends.push((l.seq, text.len()));
                }
                let text = Bytes::from(text);
                let mut start = 0;
                let rendered: Vec<(i64, Bytes)> = ends
                    .into_iter()
                    .map(|(seq, end)| {
                        let b = text.slice(start..end);
                        start = end;
                        (seq, b)
                    })
                    .collect();
                (rendered, None)
            }
            // A job of this server ends a moment after its record: the end waits for
            // its outcome, so whoever reads the run after the end finds it.
            Ok(Ok((record, _)))
                if record
                    .as_ref()
                    .is_some_and(|r| r.status == RunStatus::Running)
                    || st.jobs.is_active(run) =>
            {
                (Vec::new(), None)
            }
            Ok(Ok((record, _))) => {
                // Finished, or gone: a build that was bad input is deleted from the
                // history; the server that ran it still knows why.
                let outcome = st.jobs.outcome(run);
                let release = record.as_ref().and_then(|r| r.release.clone());
                let status = match (&record, &outcome) {
                    (Some(r), _) => json!(r.status),
                    (None, Some(o)) => json!(o.status),
                    (None, None) => json!("unknown"),
                };
                let error = outcome.and_then(|o| o.error);
                let body = json!({"status": status, "release": release, "error": error});
                (Vec::new(), Some(end_event(&body)))
            }
            Ok(Err(e)) => {
                let body = json!({"status": "unknown", "error": e.to_string()});
                (Vec::new(), Some(end_event(&body)))
            }
            Err(_) => (Vec::new(), Some(end_event(&json!({"status": "unknown"})))),
        };
        let (got_lines, ended) = (!rendered.is_empty(), end.is_some());
        // Progress lives only in this server's memory, and only the latest counts.
        let progress = st.jobs.progress(run).filter(|(n, _)| *n != progress_seen);
        if let Some((n, _)) = &progress {
            progress_seen = *n;
        }
        let progress = progress
            .map(|(n, rows)| (n, Bytes::from(format!("event: progress\ndata: {rows}\n\n"))));
        if got_lines || ended || progress.is_some() {
            if let Ok(mut s) = f.state.lock() {
                s.lines.extend(rendered);
                s.end = end;
                if progress.is_some() {
                    s.progress = progress;
                }
            }
            f.version.send_modify(|v| *v += 1);
        }
        if ended {
            return;
        }
        drop(f);
        if !got_lines {
            tokio::time::sleep(POLL).await;
        }
    }
}

fn end_event(body: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: end\ndata: {body}\n\n"))
}

/// A follower's place in a feed. Dropped with the connection when a client goes away;
/// the run itself never depends on it.
struct Follower {
    feed: Arc<Feed>,
    changes: watch::Receiver<u64>,
    /// The seq of the last line sent (or to resume after).
    after: i64,
    /// The count of the last progress sent.
    progress: u64,
    done: bool,
}

/// The SSE response following `run` from after seq `after`.
pub fn follow(st: &Shared, run: i64, after: i64) -> Response {
    let feed = st.feeds.get(st, run);
    let changes = feed.version.subscribe();
    let start = Follower {
        feed,
        changes,
        after,
        progress: 0,
        done: false,
    };
    let stream = futures_util::stream::unfold(start, next_chunk);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Everything the follower has not sent yet, as one chunk; the end event last.
async fn next_chunk(mut f: Follower) -> Option<(Result<Bytes, Infallible>, Follower)> {
    if f.done {
        return None;
    }
    loop {
        // Mark the version seen before looking, so nothing added after the look is missed.
        f.changes.borrow_and_update();
        let (chunk, end) = {
            let s = match f.feed.state.lock() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            // A binary search each time: the feed may not yet hold the lines a follower
            // resuming after seq N has already seen.
            let after = f.after;
            let mut i = s.lines.partition_point(|(seq, _)| *seq <= after);
            // At most CHUNK bytes at a time: a follower far behind (one that joins a long
            // log late, or reads slowly) holds one chunk, not the whole log.
            let mut chunk = Vec::new();
            while i < s.lines.len() && chunk.len() < CHUNK {
                chunk.extend_from_slice(&s.lines[i].1);
                f.after = s.lines[i].0;
                i += 1;
            }
            let end = if i == s.lines.len() {
                s.end.clone()
            } else {
                None
            };
            // The latest progress after the lines, once per change.
            if let Some((n, p)) = &s.progress
                && *n != f.progress
                && end.is_none()
            {
                chunk.extend_from_slice(p);
                f.progress = *n;
            }
            (chunk, end)
        };
        if !chunk.is_empty() {
            return Some((Ok(Bytes::from(chunk)), f));
        }
        if let Some(end) = end {
            f.done = true;
            return Some((Ok(end), f));
        }
        match tokio::time::timeout(KEEP_ALIVE, f.changes.changed()).await {
            Ok(Ok(())) => {}
            // The feed's poller is gone without an end: stop.
            Ok(Err(_)) => return None,
            Err(_) => return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), f)),
        }
    }
}
