//! The one error type of the core, and how it maps to the CLI's exit codes.
//!
//! `Config`, `Invalid` and `NotFound` are bad input (exit 2, nothing changed); `Busy`
//! (an environment's lock is held) and `Failed` mean a stage could not go on (exit 1).
//!
//! [`ErrorBody`] is the same error as the server's API sends it: the CLI's `--server`
//! mode turns it back into the `Error` the command would have given locally.

use miette::{Diagnostic, NamedSource, SourceSpan};
use serde::{Deserialize, Serialize};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum Error {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Config(Box<ConfigError>),

    #[error("{message}")]
    #[diagnostic()]
    Invalid {
        message: String,
        #[help]
        help: Option<String>,
    },

    /// Something named does not exist: an environment, a release, a run.
    #[error("{message}")]
    #[diagnostic()]
    NotFound {
        message: String,
        #[help]
        help: Option<String>,
    },

    /// The stage could not start because another run holds what it needs (an
    /// environment's lock). Shown like a failed stage.
    #[error("{stage} failed: {message}")]
    #[diagnostic()]
    Busy {
        stage: String,
        message: String,
        #[help]
        help: Option<String>,
    },

    #[error("{stage} failed: {message}")]
    #[diagnostic()]
    Failed {
        stage: String,
        message: String,
        #[help]
        help: Option<String>,
    },
}

/// An error inside a file, pointing at a line and column.
#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("{file}:{line}:{column}: {message}")]
#[diagnostic()]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    #[help]
    pub help: Option<String>,
    #[source_code]
    pub src: NamedSource<String>,
    #[label("here")]
    pub span: Option<SourceSpan>,
}

impl Error {
    /// Bad input without a position (a missing file, a bad argument).
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid {
            message: message.into(),
            help: None,
        }
    }

    pub fn invalid_with_help(message: impl Into<String>, help: impl Into<String>) -> Self {
        Error::Invalid {
            message: message.into(),
            help: Some(help.into()),
        }
    }

    /// Something named does not exist (`unknown release `x``, …).
    pub fn not_found(message: impl Into<String>, help: impl Into<String>) -> Self {
        Error::NotFound {
            message: message.into(),
            help: Some(help.into()),
        }
    }

    /// A run id the store does not hold (the same words from the CLI and the API).
    pub fn unknown_run(id: i64) -> Self {
        Error::not_found(
            format!("unknown run `{id}`"),
            "`stretch history` (`GET /api/history`) lists the runs",
        )
    }

    /// `stage` cannot start: another run holds what it needs.
    pub fn busy(
        stage: impl Into<String>,
        message: impl Into<String>,
        help: Option<String>,
    ) -> Self {
        Error::Busy {
            stage: stage.into(),
            message: message.into(),
            help,
        }
    }

    /// A stage of the pipeline failed.
    pub fn failed(stage: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Failed {
            stage: stage.into(),
            message: message.into(),
            help: None,
        }
    }

    /// An error at `line`/`column` (1-based) of `file`, whose text is `src`.
    pub fn config(
        file: impl Into<String>,
        src: &str,
        line: usize,
        column: usize,
        message: impl Into<String>,
        help: Option<String>,
    ) -> Self {
        let file = file.into();
        let span =
            offset_of(src, line, column).map(|o| SourceSpan::from((o, 1.min(src.len() - o))));
        Error::Config(Box::new(ConfigError {
            src: NamedSource::new(file.clone(), src.to_string()),
            file,
            line,
            column,
            message: message.into(),
            help,
            span,
        }))
    }

    /// Exit code of the CLI for this error: 2 for bad input, 1 for a failed stage.
    pub fn exit_code(&self) -> u8 {
        match self.kind() {
            ErrorKind::Invalid | ErrorKind::NotFound => 2,
            ErrorKind::Busy | ErrorKind::Failed => 1,
        }
    }

    /// What kind of error this is (the API's status follows it).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) | Error::Invalid { .. } => ErrorKind::Invalid,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Failed { .. } => ErrorKind::Failed,
        }
    }

    /// The hint shown under the error, if any.
    pub fn help(&self) -> Option<&str> {
        match self {
            Error::Config(c) => c.help.as_deref(),
            Error::Invalid { help, .. }
            | Error::NotFound { help, .. }
            | Error::Busy { help, .. }
            | Error::Failed { help, .. } => help.as_deref(),
        }
    }

    /// The stage that failed (or could not start), for `Busy` and `Failed`.
    pub fn stage(&self) -> Option<&str> {
        match self {
            Error::Busy { stage, .. } | Error::Failed { stage, .. } => Some(stage),
            Error::Config(_) | Error::Invalid { .. } | Error::NotFound { .. } => None,
        }
    }

    /// Prefix the message with the context it happened in (e.g. the source's name).
    pub fn context(self, what: &str) -> Self {
        match self {
            Error::Invalid { message, help } => Error::Invalid {
                message: format!("{what}: {message}"),
                help,
            },
            Error::NotFound { message, help } => Error::NotFound {
                message: format!("{what}: {message}"),
                help,
            },
            Error::Busy {
                stage,
                message,
                help,
            } => Error::Busy {
                stage,
                message: format!("{what}: {message}"),
                help,
            },
            Error::Failed {
                stage,
                message,
                help,
            } => Error::Failed {
                stage,
                message: format!("{what}: {message}"),
                help,
            },
            other => other,
        }
    }
}

/// The kinds of [`Error`] as the API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad input (exit 2).
    Invalid,
    /// An environment, release or run that does not exist (exit 2).
    NotFound,
    /// The environment's lock is held by another run (exit 1).
    Busy,
    /// A stage failed (exit 1).
    Failed,
}

/// An error as the server's API answers it, and as the CLI reads it back:
/// `{"kind", "stage", "message", "help"}`. `stage` is set for `busy` and `failed`.
/// An error at a file position travels as `invalid` with the position in its message,
/// and in `at` with the lines around it, so a client shows it as the CLI would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub stage: Option<String>,
    pub message: String,
    pub help: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Box<ErrorAt>>,
}

/// Where in a file an error is: the position and the lines around it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAt {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The error's message without the position.
    pub message: String,
    /// Lines `first_line` and on, up to one past the error's line.
    pub excerpt: String,
    pub first_line: usize,
}

/// Lines around an error shown with it: one before and one after.
const CONTEXT_LINES: usize = 1;

impl ErrorAt {
    fn of(c: &ConfigError) -> ErrorAt {
        let src = c.src.inner();
        let first_line = c.line.saturating_sub(CONTEXT_LINES).max(1);
        let excerpt: String = src
            .split_inclusive('\n')
            .skip(first_line - 1)
            .take(c.line + CONTEXT_LINES + 1 - first_line)
            .collect();
        ErrorAt {
            file: c.file.clone(),
            line: c.line,
            column: c.column,
            message: c.message.clone(),
            excerpt,
            first_line,
        }
    }
}

impl ErrorBody {
    /// The error on one line, as the CLI shows it.
    pub fn text(&self) -> String {
        match (self.kind, &self.stage) {
            (ErrorKind::Busy | ErrorKind::Failed, Some(stage)) => {
                format!("{stage} failed: {}", self.message)
            }
            _ => self.message.clone(),
        }
    }
}

impl From<&Error> for ErrorBody {
    fn from(e: &Error) -> ErrorBody {
        let message = match e {
            // The position is part of the message: `file:line:column: message`.
            Error::Config(c) => c.to_string(),
            Error::Invalid { message, .. }
            | Error::NotFound { message, .. }
            | Error::Busy { message, .. }
            | Error::Failed { message, .. } => message.clone(),
        };
        ErrorBody {
            kind: e.kind(),
            stage: e.stage().map(String::from),
            message,
            help: e.help().map(String::from),
            at: match e {
                Error::Config(c) => Some(Box::new(ErrorAt::of(c))),
                _ => None,
            },
        }
    }
}

impl From<ErrorBody> for Error {
    /// The error a body stands for. A `busy` or `failed` body without a stage (not
    /// one written by [`From<&Error>`]) reads as a failure of stage `server`.
    fn from(b: ErrorBody) -> Error {
        let ErrorBody {
            kind,
            stage,
            message,
            help,
            at,
        } = b;
        if let (ErrorKind::Invalid, Some(at)) = (kind, at) {
            // Blank lines before the excerpt keep its line numbers.
            let src = "\n".repeat(at.first_line.saturating_sub(1)) + &at.excerpt;
            let ErrorAt {
                file,
                line,
                column,
                message,
                ..
            } = *at;
            return Error::config(file, &src, line, column, message, help);
        }
        let stage = || stage.unwrap_or_else(|| "server".to_string());
        match kind {
            ErrorKind::Invalid => Error::Invalid { message, help },
            ErrorKind::NotFound => Error::NotFound { message, help },
            ErrorKind::Busy => Error::Busy {
                stage: stage(),
                message,
                help,
            },
            ErrorKind::Failed => Error::Failed {
                stage: stage(),
                message,
                help,
            },
        }
    }
}

/// Byte offset of a 1-based line and column in `src`.
fn offset_of(src: &str, line: usize, column: usize) -> Option<usize> {
    let mut offset = 0;
    for (i, l) in src.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            let col = column.saturating_sub(1).min(l.len());
            return Some(offset + col).filter(|o| *o < src.len());
        }
        offset += l.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_survives_the_trip_through_the_api() {
        let src = "system: x\nsources:\n- path ./app\n- path: ./b\nenvironments: {}\n";
        let e = Error::config(
            "system.yml",
            src,
            3,
            3,
            "expected a map",
            Some("see docs".into()),
        );
        let body = ErrorBody::from(&e);
        let json = serde_json::to_string(&body).unwrap();
        let back = Error::from(serde_json::from_str::<ErrorBody>(&json).unwrap());
        assert_eq!(back.to_string(), e.to_string());
        assert_eq!(back.help(), Some("see docs"));
        let Error::Config(c) = back else {
            panic!("not a config error: {back:?}")
        };
        // The same lines, at the same numbers, the same spot marked.
        assert_eq!(c.src.inner(), "\nsources:\n- path ./app\n- path: ./b\n");
        assert_eq!((c.line, c.column), (3, 3));
        let at = c.span.map(|s| &c.src.inner()[s.offset()..]);
        assert_eq!(at.map(|t| &t[..9]), Some("path ./ap"));
    }

    #[test]
    fn offsets() {
        let src = "a: 1\nbb: 2\n";
        assert_eq!(offset_of(src, 1, 1), Some(0));
        assert_eq!(offset_of(src, 2, 2), Some(6));
        assert_eq!(offset_of(src, 3, 1), None);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Error::invalid("x").exit_code(), 2);
        assert_eq!(Error::failed("build", "x").exit_code(), 1);
        assert_eq!(Error::config("f", "a\n", 1, 1, "m", None).exit_code(), 2);
        assert_eq!(Error::not_found("unknown run `1`", "h").exit_code(), 2);
        assert_eq!(Error::busy("lock", "held", None).exit_code(), 1);
    }

    /// Every kind survives the trip through the API's body: same text, stage, help,
    /// exit code, and the same JSON.
    #[test]
    fn error_body_round_trip() {
        let errors = [
            Error::invalid("bad"),
            Error::invalid_with_help("bad", "fix it"),
            Error::config("f.yml", "a: 1\n", 1, 3, "m", Some("h".into())),
            Error::not_found("unknown release `x`", "`stretch releases` lists them"),
            Error::busy(
                "lock",
                "environment `prod` is locked by deploy of a",
                Some("wait".into()),
            ),
            Error::failed("pull release", "no such file"),
        ];
        let kinds = [
            "invalid",
            "invalid",
            "invalid",
            "not_found",
            "busy",
            "failed",
        ];
        for (e, kind) in errors.iter().zip(kinds) {
            let body = ErrorBody::from(e);
            let json = serde_json::to_value(&body).unwrap();
            assert_eq!(json["kind"], kind, "{json}");
            let fields = if matches!(e, Error::Config(_)) { 5 } else { 4 };
            assert_eq!(json.as_object().unwrap().len(), fields, "{json}");
            assert_eq!(body.text(), e.to_string());
            let back: ErrorBody = serde_json::from_value(json).unwrap();
            assert_eq!(back, body);
            let again = Error::from(back);
            assert_eq!(again.to_string(), e.to_string());
            assert_eq!(again.help(), e.help());
            assert_eq!(again.stage(), e.stage());
            assert_eq!(again.exit_code(), e.exit_code());
            assert_eq!(again.kind(), e.kind());
            assert_eq!(ErrorBody::from(&again), body);
        }
        let body: ErrorBody = serde_json::from_str(
            r#"{"kind": "failed", "stage": null, "message": "m", "help": null}"#,
        )
        .unwrap();
        assert_eq!(Error::from(body).to_string(), "server failed: m");
        assert!(
            serde_json::from_str::<ErrorBody>(
                r#"{"kind": "odd", "stage": null, "message": "m", "help": null}"#
            )
            .is_err()
        );
    }
}
