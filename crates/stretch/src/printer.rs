//! All output goes through the printer: data on stdout (human text or `--json`),
//! progress and errors on stderr. Colour and live stage lines only on a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use stretch_core::Error;
use stretch_core::log::{Event, Sink};

use crate::settings::{Settings, Verbosity};

#[derive(Clone)]
pub struct Printer {
    pub json: bool,
    verbosity: Verbosity,
    color: bool,
}

impl Printer {
    pub fn new(settings: &Settings) -> Printer {
        let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
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
        Printer {
            json: settings.json,
            verbosity: settings.verbosity,
            color,
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
            eprintln!("{}", text.as_ref());
        }
    }

    pub fn error(&self, e: Error) {
        let report = miette::Report::new(e);
        eprintln!("{report:?}");
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// The sink that shows a pipeline's progress.
    pub fn progress(&self) -> Arc<dyn Sink> {
        Arc::new(self.clone())
    }
}

impl Sink for Printer {
    fn event(&self, event: &Event) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        let line = match event {
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
            Event::RunStarted { .. } => return,
        };
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}
