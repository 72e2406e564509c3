//! All output goes through the printer: data on stdout (human text or `--json`),
//! progress and errors on stderr. Colour, and live bars under the lines, only on a
//! terminal; elsewhere the same plain lines as always.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use stretch_core::Error;
use stretch_core::log::{Event, Sink, Unit};

use crate::progress::{Board, Row};
use crate::settings::{Settings, Verbosity};

#[derive(Clone)]
pub struct Printer {
    pub json: bool,
    verbosity: Verbosity,
    color: bool,
    /// The bars, when stdout and stderr are a terminal that can draw them.
    live: Option<Arc<Live>>,
}

/// Where the terminal stands: what the output needs, not how it got there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terminal {
    pub stdout: bool,
    pub stderr: bool,
    pub no_color: bool,
    pub dumb: bool,
    pub ci: bool,
}

impl Terminal {
    fn detect() -> Terminal {
        Terminal {
            stdout: std::io::stdout().is_terminal(),
            stderr: std::io::stderr().is_terminal(),
            no_color: std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
            dumb: std::env::var_os("TERM").is_some_and(|t| t == "dumb"),
            ci: std::env::var_os("CI").is_some_and(|v| !v.is_empty()),
        }
    }

    /// Colour on stderr: a terminal that is not dumb, unless `NO_COLOR`.
    pub fn color(self) -> bool {
        self.stderr && !self.no_color && !self.dumb
    }

    /// Live bars: both streams a terminal that can move its cursor, not in CI, and
    /// neither `--json` nor `-q`.
    pub fn bars(self, settings_json: bool, verbosity: Verbosity) -> bool {
        self.stdout
            && self.stderr
            && !self.dumb
            && !self.ci
            && !settings_json
            && verbosity != Verbosity::Quiet
    }
}

impl Printer {
    pub fn new(settings: &Settings) -> Printer {
        let term = Terminal::detect();
        let color = term.color();
        let _ = miette::set_hook(Box::new(move |_| {
            Box::new(
                miette::MietteHandlerOpts::new()
                    .terminal_links(false)
                    .wrap_lines(false)
                    .color(color)
                    .unicode(color)
                    .build(),
            )
        }));
        let live = term
            .bars(settings.json, settings.verbosity)
            .then(|| Arc::new(Live::new()));
        Printer {
            json: settings.json,
            verbosity: settings.verbosity,
            color,
            live,
        }
    }

    /// Write a line on stderr, above the bars when they are drawn.
    fn err_line(&self, text: &str) {
        let write = || {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{text}");
        };
        match &self.live {
            Some(live) => live.bars.suspend(write),
            None => write(),
        }
    }

    /// A line of data on stdout.
    pub fn out(&self, text: impl AsRef<str>) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", text.as_ref());
    }

    /// A JSON document on stdout.
    pub fn json(&self, value: &impl serde::Serialize) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => self.out(s),
            Err(e) => eprintln!("error: cannot encode output: {e}"),
        }
    }

    /// A message for people, on stderr (silent with `-q`).
    pub fn info(&self, text: impl AsRef<str>) {
        if self.verbosity != Verbosity::Quiet {
            self.err_line(text.as_ref());
        }
    }

    pub fn error(&self, e: Error) {
        let report = miette::Report::new(e);
        self.err_line(&format!("{report:?}"));
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// Rows of progress a server sent (`--server` mode): drawn on a terminal, else
    /// nothing.
    pub fn rows(&self, rows: Vec<Row>) {
        if let Some(live) = &self.live
            && self.verbosity != Verbosity::Quiet
        {
            live.sent(rows);
        }
    }

    /// The sink that shows a pipeline's progress.
    pub fn progress(&self) -> Arc<dyn Sink> {
        Arc::new(self.clone())
    }
}

impl Sink for Printer {
    fn wants_progress(&self) -> bool {
        self.live.is_some() && self.verbosity != Verbosity::Quiet
    }

    fn event(&self, event: &Event) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        if let Some(live) = &self.live {
            live.event(self, event);
            return;
        }
        if let Some(line) = self.plain(event) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }
}

impl Printer {
    /// The line an event leaves, as it always did; progress leaves none.
    fn plain(&self, event: &Event) -> Option<String> {
        Some(match event {
            Event::StageStarted { stage } => format!("{} {stage}", self.paint("1;34", "==>")),
            Event::StageFinished {
                stage,
                elapsed,
                ok: true,
            } => {
                format!(
                    "{} {stage} {}",
                    self.paint("1;32", "ok "),
                    self.paint("2", &format!("({:.2}s)", elapsed.as_secs_f64()))
                )
            }
            Event::StageFinished {
                stage,
                elapsed,
                ok: false,
            } => {
                format!(
                    "{} {stage} {}",
                    self.paint("1;31", "failed"),
                    self.paint("2", &format!("({:.2}s)", elapsed.as_secs_f64()))
                )
            }
            Event::Line { text, .. } => format!("    {}", self.paint("2", text)),
            Event::RunStarted { .. } | Event::Progress(_) | Event::Host(_) | Event::Batch(_) => {
                return None;
            }
        })
    }
}

/// The bars under the lines: the stage's spinner, then one bar per row of the board.
/// The lines go above them; when a stage ends its bars go and its lines stay, the same
/// as without a terminal.
struct Live {
    bars: MultiProgress,
    state: Mutex<LiveState>,
}

#[derive(Default)]
struct LiveState {
    board: Board,
    /// Rows as a server sent them (`--server` mode), drawn instead of the board's.
    sent: Option<Vec<Row>>,
    stage: Option<ProgressBar>,
    rows: HashMap<String, (Look, ProgressBar)>,
}

/// A bar says what its row says; the message first, so one redraw shows both.
fn update(bar: &ProgressBar, row: &Row) {
    bar.set_message(row.text.clone());
    if let Some((_, done, total)) = row.counter {
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
    }
}

/// Which template a row's bar has: a change of look makes a new bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    Bytes,
    Count,
    Steps,
    Spinner,
    Text,
}

impl Look {
    fn of(row: &Row) -> Look {
        match row.counter {
            Some((_, _, None)) => Look::Spinner,
            Some((Unit::Bytes, _, Some(_))) => Look::Bytes,
            Some((Unit::Files, _, Some(_))) => Look::Count,
            Some((Unit::Steps | Unit::Layers, _, Some(_))) => Look::Steps,
            None => Look::Text,
        }
    }

    fn style(self) -> ProgressStyle {
        let template = match self {
            Look::Bytes => {
                "  {prefix:<14} [{bar:24}] {percent:>3}% {msg} · {binary_bytes_per_sec} · eta {eta}"
            }
            Look::Count => "  {prefix:<14} [{bar:24}] {percent:>3}% {msg} · {per_sec} · eta {eta}",
            Look::Steps => "  {prefix:<14} [{bar:24}] {msg}",
            Look::Spinner => "  {prefix:<14} {spinner} {msg}",
            Look::Text => "  {prefix:<14} {msg}",
        };
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }
}

impl Live {
    fn new() -> Live {
        Live {
            bars: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            state: Mutex::new(LiveState::default()),
        }
    }

    fn event(&self, printer: &Printer, event: &Event) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        // A failed stage keeps its failed hosts as lines.
        if let Event::StageFinished { ok: false, .. } = event {
            for failed in st.board.failed() {
                self.line(&format!("    {}", printer.paint("2", &failed)));
            }
        }
        let kept = st.board.apply(event);
        match event {
            Event::StageStarted { stage } => {
                self.clear(&mut st);
                if let Some(line) = printer.plain(event) {
                    self.line(&line);
                }
                let spinner = self.bars.add(ProgressBar::new_spinner());
                spinner.set_style(
                    ProgressStyle::with_template("{spinner} {prefix} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                spinner.set_prefix(stage.clone());
                spinner.enable_steady_tick(Duration::from_millis(100));
                st.stage = Some(spinner);
            }
            Event::StageFinished { .. } => {
                self.clear(&mut st);
                if let Some(line) = printer.plain(event) {
                    self.line(&line);
                }
            }
            _ => {
                if let Some(line) = printer.plain(event) {
                    self.line(&line);
                }
            }
        }
        if let Some(line) = kept {
            self.line(&format!("    {}", printer.paint("2", &line)));
        }
        if matches!(event, Event::Progress(_) | Event::Host(_) | Event::Batch(_)) {
            self.draw(&mut st);
        }
    }

    /// Draw the rows a server sent (until its stage ends).
    fn sent(&self, rows: Vec<Row>) {
        if let Ok(mut st) = self.state.lock() {
            st.sent = Some(rows);
            self.draw(&mut st);
        }
    }

    /// Bring the bars in line with the board's rows.
    fn draw(&self, st: &mut LiveState) {
        let rows = st.sent.clone().unwrap_or_else(|| st.board.rows());
        let keys: std::collections::HashSet<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        let gone: Vec<String> = st
            .rows
            .keys()
            .filter(|k| !keys.contains(k.as_str()))
            .cloned()
            .collect();
        for k in gone {
            if let Some((_, bar)) = st.rows.remove(&k) {
                bar.finish_and_clear();
                self.bars.remove(&bar);
            }
        }
        let mut previous = st.stage.clone();
        for row in &rows {
            let look = Look::of(row);
            let bar = match st.rows.get(&row.key) {
                Some((l, bar)) if *l == look => bar.clone(),
                _ => {
                    if let Some((_, old)) = st.rows.remove(&row.key) {
                        old.finish_and_clear();
                        self.bars.remove(&old);
                    }
                    // Filled in before it is shown: no first frame of an empty bar.
                    let bar = ProgressBar::hidden().with_style(look.style());
                    bar.set_prefix(row.label.clone());
                    update(&bar, row);
                    let bar = match &previous {
                        Some(p) => self.bars.insert_after(p, bar),
                        None => self.bars.add(bar),
                    };
                    if look == Look::Spinner {
                        bar.enable_steady_tick(Duration::from_millis(100));
                    }
                    st.rows.insert(row.key.clone(), (look, bar.clone()));
                    bar
                }
            };
            update(&bar, row);
            previous = Some(bar);
        }
    }

    /// Take every bar away (the lines stay).
    fn clear(&self, st: &mut LiveState) {
        st.sent = None;
        for (_, (_, bar)) in st.rows.drain() {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
        if let Some(bar) = st.stage.take() {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
    }

    fn line(&self, text: &str) {
        self.bars.suspend(|| {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{text}");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term() -> Terminal {
        Terminal {
            stdout: true,
            stderr: true,
            no_color: false,
            dumb: false,
            ci: false,
        }
    }

    #[test]
    fn bars_only_on_a_terminal_outside_ci_without_json_or_quiet() {
        assert!(term().bars(false, Verbosity::Normal));
        assert!(term().bars(false, Verbosity::Verbose));
        assert!(!term().bars(true, Verbosity::Normal));
        assert!(!term().bars(false, Verbosity::Quiet));
        let off = [
            Terminal {
                stdout: false,
                ..term()
            },
            Terminal {
                stderr: false,
                ..term()
            },
            Terminal { ci: true, ..term() },
            Terminal {
                dumb: true,
                ..term()
            },
        ];
        for t in off {
            assert!(!t.bars(false, Verbosity::Normal), "{t:?}");
        }
        // NO_COLOR takes the colour away, not the bars.
        let no_color = Terminal {
            no_color: true,
            ..term()
        };
        assert!(no_color.bars(false, Verbosity::Normal));
        assert!(!no_color.color());
        assert!(
            !Terminal {
                dumb: true,
                ..term()
            }
            .color()
        );
        assert!(term().color());
    }
}
