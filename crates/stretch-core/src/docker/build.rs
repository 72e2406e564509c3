//! `docker build` with the classic builder: the context is streamed as a tar, every
//! output line goes to the log, and a failing step is named in the error together with
//! the last lines of output.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::Path;

use bollard::query_parameters::{BuildImageOptions, BuilderVersion};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::context::{self, ChannelWriter};
use super::{Docker, describe};
use crate::log::{Log, Meter, Unit};
use crate::{Error, Result};

/// How many lines of output a build failure quotes.
const TAIL: usize = 12;

/// What to build; see [`Docker::build`].
pub struct BuildRequest<'a> {
    /// The folder sent as the build context.
    pub context: &'a Path,
    /// The Dockerfile's text (not a path): written into the context as
    /// `.stretch.Dockerfile`, so callers can rewrite it (e.g. prepend a `FROM`).
    pub dockerfile: String,
    /// Every reference the image gets (`REGISTRY/SYSTEM/NODE:RELEASE_ID`, …).
    pub tags: Vec<String>,
    pub build_args: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Paths relative to `context` to leave out; a skipped folder is left out whole.
    /// `Sync` so that the build future is `Send` (it holds this across awaits).
    pub skip: &'a (dyn Fn(&Path) -> bool + Sync),
}

impl<'a> BuildRequest<'a> {
    /// A request with no tags, args, labels or skipped files.
    pub fn new(context: &'a Path, dockerfile: impl Into<String>) -> Self {
        BuildRequest {
            context,
            dockerfile: dockerfile.into(),
            tags: Vec::new(),
            build_args: BTreeMap::new(),
            labels: BTreeMap::new(),
            skip: &|_| false,
        }
    }
}

impl Docker {
    /// Build an image from `req.context` with the classic builder (no BuildKit), without
    /// pulling (`pull=false`, so local-only base images work) and always removing
    /// intermediate containers (`rm`, and `forcerm` so a failed step leaves none
    /// behind either). Every output line goes to `log`. Returns the image id
    /// (`sha256:…`), tagged with every `req.tags`.
    pub async fn build(&self, req: BuildRequest<'_>, log: &Log) -> Result<String> {
        let entries = context::collect(req.context, req.skip)?;
        let mut tags = req.tags.iter();
        let options = BuildImageOptions {
            dockerfile: context::DOCKERFILE.to_string(),
            // The API takes one `t` here; the other tags are added after the build.
            t: tags.next().cloned(),
            // `None` = the engine's default, false: never pull the base image.
            pull: None,
            rm: true,
            forcerm: true,
            buildargs: Some(to_map(&req.build_args)),
            labels: Some(to_map(&req.labels)),
            version: BuilderVersion::BuilderV1,
            ..Default::default()
        };

        // The tar is written on a blocking thread into a small channel; the request body
        // reads from it. A read error is also sent down the body so that the engine sees
        // a failed upload, never a silently truncated (and valid-looking) context.
        let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(4);
        let dockerfile = req.dockerfile.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let err_tx = tx.clone();
            let result = context::write_tar(ChannelWriter::new(tx), &entries, &dockerfile)
                .and_then(|mut w| io::Write::flush(&mut w));
            if let Err(e) = &result {
                let _ = err_tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
            }
            result
        });
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk.map(Into::into), rx))
        });

        let mut transcript = Transcript::default();
        let steps = log.meter(image_task(&req.tags), Unit::Steps, None);
        let mut failure = None;
        let mut stream =
            self.inner
                .build_image(options, None, Some(bollard::body_try_stream(body)));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = info.stream.as_deref() {
                        for line in transcript.push(text) {
                            count_step(&steps, &line);
                            log.line(line);
                        }
                    }
                    // Status messages (a pull's progress) are whole lines without `\n`.
                    if let Some(status) = info.status.as_deref() {
                        for line in transcript.push(&format!("{status}\n")) {
                            log.line(line);
                        }
                    }
                    if let Some(id) = info.aux.and_then(|aux| aux.id) {
                        transcript.image_id = Some(id);
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(stream);
        if let Some(line) = transcript.finish() {
            log.line(line);
        }

        let upload = writer
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        match (upload, failure) {
            // Our side failed (a context file could not be read): that is the cause, and
            // the engine's error about the aborted upload is only a consequence.
            (Err(e), _) if e.kind() != io::ErrorKind::BrokenPipe => {
                return Err(Error::failed(
                    "build",
                    format!("sending the build context {}: {e}", req.context.display()),
                ));
            }
            // The engine failed (and may have hung up on the upload: `BrokenPipe`).
            (_, Some(e)) => return Err(Error::failed("build", transcript.failure(&describe(&e)))),
            (Err(e), None) => {
                return Err(Error::failed(
                    "build",
                    format!("sending the build context: {e}"),
                ));
            }
            (Ok(()), None) => {}
        }
        if let Some(total) = steps.progress().total {
            steps.set(total);
        }
        steps.finish();

        let id = match (transcript.image_id.take(), req.tags.first()) {
            (Some(id), _) => id,
            // Older engines report no id; the first tag points at the image.
            (None, Some(tag)) => self.image_id(tag).await?.ok_or_else(|| {
                Error::failed("build", format!("the built image {tag} is missing"))
            })?,
            (None, None) => {
                return Err(Error::failed(
                    "build",
                    "the engine did not report the built image's id",
                ));
            }
        };
        for tag in tags {
            self.tag(&id, tag).await?;
        }
        Ok(id)
    }
}

fn to_map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Turns the engine's output chunks into lines, and remembers what a failure message
/// needs: the current step and the last lines.
#[derive(Default)]
struct Transcript {
    partial: String,
    step: Option<String>,
    tail: VecDeque<String>,
    image_id: Option<String>,
}

impl Transcript {
    /// Feed a chunk (which may hold part of a line, or several); returns the complete
    /// lines.
    fn push(&mut self, text: &str) -> Vec<String> {
        self.partial.push_str(text);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.find('\n') {
            let raw: String = self.partial.drain(..=end).collect();
            lines.push(self.keep(&raw[..end]));
        }
        lines.retain(|l| !l.is_empty());
        lines
    }

    /// The unterminated last line, if any.
    fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.partial);
        Some(self.keep(&rest)).filter(|l| !l.is_empty())
    }

    fn keep(&mut self, raw: &str) -> String {
        // Progress bars redraw with `\r`: only the last state is a line. The engine
        // colours a step's stderr with ANSI codes, which mean nothing in a log.
        let last = raw.trim_end_matches('\r').rsplit('\r').next().unwrap_or("");
        let line = strip_ansi(last).trim_end().to_string();
        if line.is_empty() {
            return line;
        }
        if line.starts_with("Step ") && line.contains(" : ") {
            self.step = Some(line.clone());
        }
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line.clone());
        line
    }

    /// The message of a failed build: the failing step, the engine's error, the tail.
    fn failure(&self, error: &str) -> String {
        let mut msg = match self.step.as_deref().and_then(parse_step) {
            Some((n, instruction)) => format!("step {n} `{instruction}`: {error}"),
            None => error.to_string(),
        };
        if !self.tail.is_empty() {
            msg.push_str("\nlast lines of output:");
            for l in &self.tail {
                msg.push_str("\n  ");
                msg.push_str(l);
            }
        }
        msg
    }
}

/// `text` without ANSI escape sequences (`ESC [ … final-byte`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.clone().next() == Some('[') {
            chars.next();
            // Parameters and intermediates, up to the final byte (`@` to `~`).
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// `image NAME` for the progress of building `tags`: the first's last path segment,
/// its tag left out.
pub(crate) fn image_task(tags: &[String]) -> String {
    let name = tags
        .first()
        .map(|t| {
            let last = t.rsplit('/').next().unwrap_or(t);
            last.split(':').next().unwrap_or(last).to_string()
        })
        .unwrap_or_default();
    format!("image {name}").trim_end().to_string()
}

/// A line `Step N/M : …` means step N of M began: N-1 are done.
fn count_step(meter: &Meter, line: &str) {
    if let Some((n, _)) = parse_step(line)
        && let Some((n, m)) = n.split_once('/')
        && let (Ok(n), Ok(m)) = (n.parse::<u64>(), m.parse::<u64>())
    {
        meter.set_total(m);
        meter.set(n.saturating_sub(1));
        // Steps are few and far between: each is worth a report.
        meter.flush();
    }
}

/// `Step 2/5 : RUN make` => (`2/5`, `RUN make`).
fn parse_step(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("Step ")?;
    let (n, instruction) = rest.split_once(" : ")?;
    Some((n.trim(), instruction.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_joins_partial_lines_and_drops_progress_redraws() {
        let mut t = Transcript::default();
        assert_eq!(
            t.push("Step 1/2 : FROM x\n ---> ab"),
            vec!["Step 1/2 : FROM x"]
        );
        assert_eq!(
            t.push("c\n\nStep 2/2 : RUN false\n"),
            vec![" ---> abc", "Step 2/2 : RUN false"]
        );
        assert_eq!(t.push("10%\r50%\r100%\r\n"), vec!["100%"]);
        assert_eq!(t.push("no newline"), Vec::<String>::new());
        assert_eq!(t.finish().as_deref(), Some("no newline"));
        assert_eq!(t.finish(), None);
        let msg = t.failure("The command '/bin/sh -c false' returned a non-zero code: 1");
        assert!(
            msg.starts_with("step 2/2 `RUN false`: The command"),
            "{msg}"
        );
        assert!(msg.contains("\n  100%\n  no newline"), "{msg}");
    }

    #[test]
    fn transcript_keeps_only_the_last_lines() {
        let mut t = Transcript::default();
        for i in 0..100 {
            t.push(&format!("line {i}\n"));
        }
        let msg = t.failure("boom");
        assert!(msg.starts_with("boom\n"), "{msg}");
        assert!(
            !msg.contains("line 87\n") && msg.contains("line 88") && msg.ends_with("line 99"),
            "{msg}"
        );
    }

    #[test]
    fn ansi_codes_are_dropped() {
        assert_eq!(strip_ansi("\u{1b}[91moops"), "oops");
        assert_eq!(
            strip_ansi("\u{1b}[0mRemoving \u{1b}[1;32mx\u{1b}[0m"),
            "Removing x"
        );
        assert_eq!(strip_ansi("plain [x]"), "plain [x]");
        let mut t = Transcript::default();
        assert_eq!(
            t.push("\u{1b}[91moops\n\u{1b}[0mRemoving intermediate container 1\n"),
            vec!["oops", "Removing intermediate container 1"]
        );
    }

    #[test]
    fn steps() {
        assert_eq!(
            parse_step("Step 2/5 : RUN make all"),
            Some(("2/5", "RUN make all"))
        );
        assert_eq!(parse_step("Stepping"), None);
    }
}
