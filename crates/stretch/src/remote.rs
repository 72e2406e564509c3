//! `--server URL` (or `STRETCH_SERVER`): `build`, `deploy`, `rollback`, `apply`,
//! `status`, `releases`, `history` and `logs` go through a `stretch serve`'s API instead of the local home,
//! with the token from `STRETCH_SERVER_TOKEN`. This is transport only: progress comes
//! from the run's log stream (SSE), results as the core's outcome types, printed by
//! `render` like the local commands', so output and exit codes are theirs. Other
//! commands run locally as usual.
//!
//! An `https://` server's certificate must chain to the system's authorities or
//! `--server-ca`'s, or, with `STRETCH_SERVER_FINGERPRINT`, be exactly that one; a
//! refusal names the server (and both fingerprints for a pin). `http://` stays for
//! loopback and tunnels.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::{Value, json};
use stretch_core::deploy::Kind;
use stretch_core::deploy::apply::ApplyOutcome;
use stretch_core::error::ErrorBody;
use stretch_core::net::tls::{
    Expect, PeerCheck, Refusal, fingerprint, parse_fingerprint, roots_from_pem, system_roots,
};
use stretch_core::outcome::{Built, Deployed, Release};
use stretch_core::status::EnvironmentStatus;
use stretch_core::store::{LogLine, RunRecord, RunStatus};
use stretch_core::{Error, Result};

use crate::cli::{BuildArgs, Command, DeployArgs};
use crate::printer::Printer;
use crate::progress::Row;
use crate::render;
use crate::settings::{FINGERPRINT_ENV, Server, TOKEN_ENV};

/// Run `command` through the server; give it back when it is one to run locally.
pub async fn run(server: &Server, command: Command, printer: &Printer) -> Result<Option<Command>> {
    let client = || Client::new(server);
    match command {
        Command::Build(args) => build(&client()?, args, printer).await?,
        Command::Deploy(args) => deploy(&client()?, args, Kind::Deploy, printer).await?,
        Command::Rollback(args) => deploy(&client()?, args, Kind::Rollback, printer).await?,
        Command::Apply {
            environment,
            dry_run,
            wait,
        } => apply(&client()?, &environment, dry_run, wait, printer).await?,
        Command::Releases { remote: false } => releases(&client()?, printer).await?,
        Command::Status { environment } => status(&client()?, &environment, printer).await?,
        Command::History { environment } => {
            history(&client()?, environment.as_deref(), printer).await?
        }
        Command::Logs { id, follow } => logs(&client()?, id, follow, printer).await?,
        other => return Ok(Some(other)),
    }
    Ok(None)
}

struct Client {
    base: String,
    authorization: Option<String>,
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The check of an `https://` server's certificate, asked why after a refusal.
    check: Option<Arc<PeerCheck>>,
}

/// Percent-encode one path segment or query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    fn new(server: &Server) -> Result<Client> {
        let url = server.url.trim().trim_end_matches('/');
        let base = if url.starts_with("http://") || url.starts_with("https://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        if server.token.is_none() {
            return Err(Error::invalid_with_help(
                format!("`--server {url}` needs a token"),
                format!("set {TOKEN_ENV} to one of the server's tokens"),
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        // Needed for https:// URLs to reach the TLS layer.
        connector.enforce_http(false);
        let (check, tls) = if base.starts_with("https://") {
            let (check, tls) = trust(server, &base)?;
            (Some(check), tls)
        } else {
            // Plain http never makes a handshake; a pin nothing matches keeps it so.
            let never = PeerCheck::new(Expect::Pinned(String::new()))?;
            (None, never.client_config()?)
        };
        Ok(Client {
            base,
            authorization: server.token.as_ref().map(|t| format!("Bearer {t}")),
            http: HyperClient::builder(TokioExecutor::new()).build(https_connector(tls, connector)),
            check,
        })
    }

    /// Why a request failed: a refused certificate says which and why; anything else
    /// is an unreachable server.
    fn unreachable(&self, e: impl std::fmt::Display) -> Error {
        let base = &self.base;
        match self.check.as_ref().and_then(|c| c.refusal()) {
            Some(Refusal::Mismatch {
                expected,
                presented,
            }) => Error::Failed {
                stage: "server".into(),
                message: format!(
                    "refused the server at {base}: its certificate is {presented}, not the pinned {expected}"
                ),
                help: Some(format!(
                    "if the server's certificate was replaced on purpose, set {FINGERPRINT_ENV} to the new one (check it on the server first); otherwise something stands between you and the server"
                )),
            },
            Some(Refusal::Untrusted { presented, reason }) => Error::Failed {
                stage: "server".into(),
                message: format!(
                    "refused the server at {base}: its certificate ({presented}) is not trusted: {reason}"
                ),
                help: Some(format!(
                    "pass `--server-ca FILE` (or set STRETCH_SERVER_CA) with the CA that signed it, or pin the certificate with {FINGERPRINT_ENV}=sha256:… (as `stretch serve` prints it)"
                )),
            },
            None => Error::failed("server", format!("cannot reach the server at {base}: {e}")),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(a) = &self.authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        let data = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(data))
            .map_err(|e| Error::invalid(format!("`--server`: bad URL `{url}`: {e}")))?;
        self.http
            .request(req)
            .await
            .map_err(|e| self.unreachable(error_chain(&e)))
    }

    /// A JSON call: the status and body, or the error the server gave.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::failed("server", format!("the server's answer broke off: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok((status, value))
        } else {
            Err(server_error(status, &value))
        }
    }

    async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.call(Method::GET, path, None).await?.1)
    }

    /// Follow a run's log until it ends, handing each line to `each` and the rows of
    /// each `progress` event to `rows`; the `end` event.
    async fn follow(
        &self,
        run: i64,
        mut each: impl FnMut(LogLine),
        mut rows: impl FnMut(Vec<Row>),
    ) -> Result<Value> {
        let resp = self
            .send(Method::GET, &format!("/api/runs/{run}/logs?follow=1"), None)
            .await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(server_error(
                status,
                &serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| Error::failed("server", format!("the log stream broke off: {e}")))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            // Events end with a blank line.
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let (mut kind, mut data) = ("message", String::new());
                for line in text.lines() {
                    if let Some(k) = line.strip_prefix("event:") {
                        kind = match k.trim() {
                            "end" => "end",
                            "line" => "line",
                            "progress" => "progress",
                            _ => "other",
                        };
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                match kind {
                    "line" => {
                        if let Ok(l) = serde_json::from_str::<LogLine>(&data) {
                            each(l);
                        }
                    }
                    "progress" => {
                        #[derive(serde::Deserialize)]
                        struct Sent {
                            rows: Vec<Row>,
                        }
                        if let Ok(p) = serde_json::from_str::<Sent>(&data) {
                            rows(p.rows);
                        }
                    }
                    "end" => return Ok(serde_json::from_str(&data).unwrap_or(Value::Null)),
                    _ => {}
                }
            }
        }
        Err(Error::failed(
            "server",
            "the server closed the log stream before the run ended",
        ))
    }
}

/// How an `https://` server's certificate is checked: against the pinned fingerprint,
/// else a chain to the system's or `--server-ca`'s authorities.
fn trust(server: &Server, base: &str) -> Result<(Arc<PeerCheck>, rustls::ClientConfig)> {
    if let Some(given) = &server.fingerprint {
        let Some(fp) = parse_fingerprint(given) else {
            return Err(Error::invalid_with_help(
                format!("{FINGERPRINT_ENV} is not a certificate fingerprint"),
                "write it as `sha256:` and 64 hex digits, as `stretch serve` prints it",
            ));
        };
        let check = PeerCheck::new(Expect::Pinned(fp))?;
        let config = check.client_config()?;
        return Ok((check, config));
    }
    let mut roots = system_roots();
    let mut own = Vec::new();
    if let Some(ca) = &server.ca {
        let extra = roots_from_pem(ca)?;
        roots.roots.extend(extra.roots);
        // Already read once without error by `roots_from_pem`.
        own = CertificateDer::pem_file_iter(ca)
            .map(|certs| certs.filter_map(|c| c.ok()).collect())
            .unwrap_or_default();
    }
    if roots.is_empty() {
        return Err(Error::Failed {
            stage: "server".into(),
            message: format!(
                "cannot check the certificate of the server at {base}: this machine trusts no certificate authority"
            ),
            help: Some(format!(
                "pass `--server-ca FILE` (or set STRETCH_SERVER_CA) with the CA that signed it, or pin the certificate with {FINGERPRINT_ENV}=sha256:…"
            )),
        });
    }
    // A server's own self-signed certificate in the CA file is trusted exactly, like a
    // pin (openssl marks those as authorities, which the chain check refuses as a leaf).
    let exact = own.iter().map(|c| fingerprint(c.as_ref())).collect();
    let check = PeerCheck::new(Expect::Roots(Arc::new(roots), exact))?;
    let config = check.client_config()?;
    Ok((check, config))
}

/// hyper over rustls, for `https://` and `http://` URLs alike.
fn https_connector(
    mut tls: rustls::ClientConfig,
    http: HttpConnector,
) -> HttpsConnector<HttpConnector> {
    // The builder sets ALPN itself (and insists on setting it).
    tls.alpn_protocols.clear();
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// An error and its causes on one line (hyper's own message is only "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The server's error answer as the CLI's error: the one the command gives locally,
/// from the answer's kind, stage, message and help.
fn server_error(status: StatusCode, body: &Value) -> Error {
    let parsed = ErrorBody::deserialize(body);
    if status == StatusCode::UNAUTHORIZED {
        let message = match &parsed {
            Ok(b) => b.message.clone(),
            Err(_) => format!("the server answered {status}"),
        };
        return Error::invalid_with_help(
            format!("the server rejected the token: {message}"),
            format!("set {TOKEN_ENV} to one of the server's tokens"),
        );
    }
    match parsed {
        Ok(b) => b.into(),
        // Not an answer of `stretch serve` (a proxy in front, an older server).
        Err(_) => {
            let message = body["error"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| format!("the server answered {status}"));
            let help = body["help"].as_str().map(String::from);
            match status {
                StatusCode::CONFLICT => Error::busy("lock", message, help),
                s if s.is_client_error() => Error::Invalid { message, help },
                _ => Error::Failed {
                    stage: "server".into(),
                    message,
                    help,
                },
            }
        }
    }
}

/// Whether a run's detail (or end event) says it succeeded.
fn succeeded(detail: &Value) -> bool {
    RunStatus::deserialize(&detail["status"]).is_ok_and(|s| s == RunStatus::Succeeded)
}

/// Show a log line as the local progress printer would.
fn show(printer: &Printer, l: &LogLine) {
    stretch_core::log::Sink::event(printer, &l.to_event());
}

/// A finished run that did not succeed, as the CLI's error: the one the server's job
/// gave, as it gave it.
fn run_error(detail: &Value, what: &str) -> Error {
    if let Ok(body) = ErrorBody::deserialize(&detail["failure"]) {
        return body.into();
    }
    // A run this server did not run itself (or ran before it restarted): what its
    // log says.
    let text = detail["error"].as_str().unwrap_or("").to_string();
    Error::Failed {
        stage: what.to_string(),
        message: if text.is_empty() {
            format!("run ended {}", detail["status"])
        } else {
            text
        },
        help: detail["help"].as_str().map(String::from),
    }
}

/// A value of the server's answer, as the type both sides share.
fn typed<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v)
        .map_err(|e| Error::failed("server", format!("the server's {what} did not read: {e}")))
}

/// What a run the server ran gave: its typed result, or its error.
async fn result_of<T: serde::de::DeserializeOwned>(c: &Client, run: i64, what: &str) -> Result<T> {
    let detail = c.get(&format!("/api/runs/{run}")).await?;
    if !succeeded(&detail) {
        return Err(run_error(&detail, what));
    }
    typed(detail["result"].clone(), what)
}

fn run_of(started: &Value) -> Result<i64> {
    started["run"]
        .as_i64()
        .ok_or_else(|| Error::failed("server", "the server did not say which run"))
}

async fn build(c: &Client, args: BuildArgs, printer: &Printer) -> Result<()> {
    let mut sources = BTreeMap::new();
    for s in &args.sources {
        let (name, git_ref) = s
            .split_once('=')
            .filter(|(n, r)| !n.is_empty() && !r.is_empty())
            .ok_or_else(|| Error::invalid(format!("`--source {s}`: expected `NAME=REF`")))?;
        sources.insert(name.to_string(), git_ref.to_string());
    }
    if args.identity.is_some() {
        printer.info(
            "note: the server decrypts secrets with its own identity (`stretch serve --identity`)",
        );
    }
    let (_, started) = c
        .call(
            Method::POST,
            "/api/builds",
            Some(&json!({ "sources": sources })),
        )
        .await?;
    let run = run_of(&started)?;
    c.follow(run, |l| show(printer, &l), |r| printer.rows(r))
        .await?;
    let built: Built = result_of(c, run, "build").await?;
    render::show(printer, &built);
    Ok(())
}

/// Start a job on an environment; with `wait`, ask again while it is busy (the server
/// never queues a job).
async fn start_on(
    c: &Client,
    path: &str,
    body: &Value,
    wait: bool,
    printer: &Printer,
) -> Result<(StatusCode, Value)> {
    let mut waiting = false;
    loop {
        match c.call(Method::POST, path, Some(body)).await {
            Err(Error::Busy { message, .. }) if wait => {
                if !waiting {
                    printer.info(format!("waiting: {message}"));
                    waiting = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

async fn deploy(c: &Client, args: DeployArgs, kind: Kind, printer: &Printer) -> Result<()> {
    let path = format!(
        "/api/environments/{}/{}",
        encode(&args.environment),
        kind.as_str()
    );
    let body = json!({ "release": args.release });
    let (_, started) = start_on(c, &path, &body, args.wait, printer).await?;
    let run = run_of(&started)?;
    c.follow(run, |l| show(printer, &l), |r| printer.rows(r))
        .await?;
    let deployed: Deployed = result_of(c, run, kind.as_str()).await?;
    render::show(printer, &deployed);
    Ok(())
}

async fn apply(c: &Client, env: &str, dry_run: bool, wait: bool, printer: &Printer) -> Result<()> {
    let path = format!("/api/environments/{}/apply", encode(env));
    let (status, started) =
        start_on(c, &path, &json!({ "dry_run": dry_run }), wait, printer).await?;
    // 200: nothing ran (a dry run, nothing to apply): the answer is the outcome itself.
    let outcome: ApplyOutcome = if status == StatusCode::ACCEPTED {
        let run = run_of(&started)?;
        c.follow(run, |l| show(printer, &l), |r| printer.rows(r))
            .await?;
        result_of(c, run, "apply").await?
    } else {
        typed(started, "apply")?
    };
    render::show(printer, &outcome);
    Ok(())
}

async fn releases(c: &Client, printer: &Printer) -> Result<()> {
    let list: Vec<Release> = typed(c.get("/api/releases").await?, "releases")?;
    render::show(printer, &list);
    Ok(())
}

async fn status(c: &Client, env: &str, printer: &Printer) -> Result<()> {
    let path = format!("/api/environments/{}", encode(env));
    let status: EnvironmentStatus = typed(c.get(&path).await?, "status")?;
    render::show(printer, &status);
    Ok(())
}

async fn history(c: &Client, environment: Option<&str>, printer: &Printer) -> Result<()> {
    let path = match environment {
        Some(e) => format!("/api/history?environment={}", encode(e)),
        None => "/api/history".to_string(),
    };
    let runs: Vec<RunRecord> = typed(c.get(&path).await?, "history")?;
    render::show(printer, &runs);
    Ok(())
}

async fn logs(c: &Client, id: i64, follow: bool, printer: &Printer) -> Result<()> {
    if follow {
        c.follow(id, |l| render::log_line(printer, &l), |_| {})
            .await?;
        return Ok(());
    }
    let lines: Vec<LogLine> = typed(c.get(&format!("/api/runs/{id}/logs")).await?, "log")?;
    lines.iter().for_each(|l| render::log_line(printer, l));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded() {
        assert_eq!(encode("a b/é"), "a%20b%2F%C3%A9");
    }
}
