//! `stretch serve`: the HTTP API and web view over this home folder (SPEC §9), until
//! SIGTERM/SIGINT. The first line on stderr says where it listens.

use stretch_core::{Error, Result};

use crate::cli::ServeArgs;
use crate::settings::Settings;

/// The environment variable that may hold the token(s).
const TOKEN_ENV: &str = "STRETCH_SERVER_TOKEN";

pub async fn run(args: ServeArgs, settings: &Settings) -> Result<()> {
    let tokens = tokens(&args)?;
    crate::serve::serve(crate::serve::Options {
        listen: args.listen,
        tokens,
        system_file: settings.system_file.clone(),
        home: settings.home.clone(),
        identity: args.identity,
        release_identity: settings.release_identity.clone(),
        // clap makes sure both or neither are given.
        tls: args.tls_cert.zip(args.tls_key),
        insecure_http: args.insecure_http,
    })
    .await
}

/// Tokens from `--token-file` (one a line), else `STRETCH_SERVER_TOKEN`; at least one,
/// and none weak.
fn tokens(args: &ServeArgs) -> Result<Vec<String>> {
    let text = super::token_text(args.token_file.as_deref(), TOKEN_ENV)?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let token = line.trim();
        if token.is_empty() {
            continue;
        }
        let what = match &args.token_file {
            Some(path) => format!("the token on line {} of `{}`", i + 1, path.display()),
            None => format!("the token in {TOKEN_ENV}"),
        };
        stretch_core::token::check(&what, token)?;
        tokens.push(token.to_string());
    }
    if tokens.is_empty() {
        return Err(Error::invalid_with_help(
            "`stretch serve` needs a token",
            format!("pass `--token-file FILE` (one token a line) or set {TOKEN_ENV}"),
        ));
    }
    Ok(tokens)
}
