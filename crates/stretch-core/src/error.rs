//! The one error type of the core, and how it maps to the CLI's exit codes.
//!
//! `Config` and `Invalid` are bad input (exit 2, nothing changed); `Failed` means the
//! pipeline ran and a stage failed (exit 1).

use miette::{Diagnostic, NamedSource, SourceSpan};

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
        match self {
            Error::Config(_) | Error::Invalid { .. } => 2,
            Error::Failed { .. } => 1,
        }
    }

    /// Prefix the message with the context it happened in (e.g. the source's name).
    pub fn context(self, what: &str) -> Self {
        match self {
            Error::Invalid { message, help } => Error::Invalid {
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
    }
}
