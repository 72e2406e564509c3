//! `stretch agent`: run the agent daemon on this host (SPEC §8) until SIGTERM/SIGINT.
//! Its log goes to stderr, one line per event; the first line says where it listens.

use std::io::Write;
use std::sync::Arc;

use stretch_core::agent::server::{self, AgentConfig};
use stretch_core::log::{Event, Log, Sink};
use stretch_core::{Error, Result};

use crate::cli::AgentArgs;

/// The environment variable that may hold the token.
const TOKEN_ENV: &str = "STRETCH_AGENT_TOKEN";

pub async fn run(args: AgentArgs) -> Result<()> {
    let token = token(&args)?;
    let log = Log::new(vec![Arc::new(Stderr)]);
    server::run(AgentConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        token,
        proxy_bind: args.proxy_bind,
        log,
    })
    .await
}

/// The token from `--token-file`, else `STRETCH_AGENT_TOKEN`; never empty, never weak.
fn token(args: &AgentArgs) -> Result<String> {
    let token = super::token_text(args.token_file.as_deref(), TOKEN_ENV)?;
    let token = token.trim().to_string();
    if token.is_empty() {
        let source = match &args.token_file {
            Some(path) => format!("the token file `{}` is empty", path.display()),
            None => "no agent token".to_string(),
        };
        return Err(Error::invalid_with_help(
            source,
            format!("give `--token-file FILE` or set {TOKEN_ENV}"),
        ));
    }
    let what = match &args.token_file {
        Some(path) => format!("the agent token in `{}`", path.display()),
        None => format!("the agent token in {TOKEN_ENV}"),
    };
    stretch_core::token::check(&what, &token)?;
    Ok(token)
}

/// The agent's log: plain lines on stderr (a daemon's log, so no stage decoration).
struct Stderr;

impl Sink for Stderr {
    fn event(&self, event: &Event) {
        if let Event::Line { text, .. } = event {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{text}");
        }
    }
}
