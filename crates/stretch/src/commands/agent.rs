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
    let operator = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => {
            return Err(Error::invalid(
                "`--tls-cert` and `--tls-key` go together: give both or neither",
            ));
        }
    };
    if args.print_fingerprint {
        let (identity, _) = server::tls_identity(&args.data_dir, operator)?;
        println!("{}", identity.fingerprint());
        return Ok(());
    }
    let Some(listen) = args.listen.clone() else {
        return Err(Error::invalid_with_help(
            "`stretch agent` needs `--listen ADDR`",
            "e.g. `--listen 0.0.0.0:7420`",
        ));
    };
    let token = token(&args)?;
    let log = Log::new(vec![Arc::new(Stderr)]);
    let (tls, made) = server::tls_identity(&args.data_dir, operator)?;
    if made {
        log.line(format!(
            "made a TLS key and self-signed certificate in `{}`",
            args.data_dir.join("tls").display()
        ));
    }
    raise_open_files_limit(&log);
    server::run(AgentConfig {
        listen,
        data_dir: args.data_dir,
        token,
        proxy_bind: args.proxy_bind,
        http_port: (args.http_port != 0).then_some(args.http_port),
        acme_renew_before: args.acme_renew_before,
        acme_check_every: args.acme_check_every,
        tls,
        docker_config: args.docker_config,
        log,
    })
    .await
}

/// Every connection costs a file descriptor and the agent's listeners are bounded by
/// connection caps, not by the soft limit (often 1024): raise it to the hard limit.
fn raise_open_files_limit(log: &Log) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), Some(max)) = (limit.current, limit.maximum) else {
        return;
    };
    let want = max.min(65_536);
    if current < want {
        let raised = rustix::process::Rlimit {
            current: Some(want),
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_err() {
            log.line(format!(
                "warning: open files limited to {current}; connections past it are refused"
            ));
        }
    }
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
