//! `stretch serve`: a JSON API and a server-rendered web view over one home folder,
//! on the same core library and SQLite store as the CLI (both may use one home at once).
//!
//! * `auth` — tokens, login sessions, protection against cross-site requests;
//! * `jobs` — builds, deploys, rollbacks and applies run in the background;
//! * `api` — the JSON API under `/api/`;
//! * `feed` — live log streams (Server-Sent Events), one store reader per followed run;
//! * `pages` — the HTML pages (minijinja templates, a little plain JS for the live log).

mod api;
mod auth;
mod feed;
mod jobs;
mod pages;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use hyper::service::Service as _;
use hyper_util::service::TowerToHyperService;
use stretch_core::home::Home;
use stretch_core::net;
use stretch_core::net::serve::Limits;
use stretch_core::net::tls::Identity;
use stretch_core::store::Store;
use stretch_core::system::System;
use stretch_core::{Error, Result};

/// What `stretch serve` was started with.
pub struct Options {
    pub listen: String,
    /// Accepted tokens (never empty).
    pub tokens: Vec<String>,
    pub system_file: PathBuf,
    pub home: PathBuf,
    /// The age identity builds decrypt secrets with.
    pub identity: Option<PathBuf>,
    /// The release identity deploys open sealed release configurations with.
    pub release_identity: Option<PathBuf>,
    /// `--tls-cert`, `--tls-key`: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `--insecure-http`: plain HTTP is allowed beyond loopback.
    pub insecure_http: bool,
}

/// Everything the handlers share.
pub struct AppState {
    pub system_file: PathBuf,
    pub home: Home,
    /// The connection runs started here write through.
    pub store: Store,
    /// A second connection for reads, so readers never queue behind a busy writer.
    pub reader: Store,
    pub identity: Option<PathBuf>,
    pub release_identity: Option<PathBuf>,
    pub auth: auth::Auth,
    pub jobs: jobs::Jobs,
    pub feeds: feed::Feeds,
    pub pages: pages::Pages,
}

pub type Shared = Arc<AppState>;

impl AppState {
    /// The system file, read again on every use: `system.yml` edits (e.g. before an
    /// `apply`) take effect without a restart.
    pub fn system(&self) -> Result<System> {
        System::load(&self.system_file)
    }
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(pages::system))
        .route("/runs/{id}", get(pages::run))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/actions/{action}", post(pages::action))
        .route("/api/openapi.json", get(api::openapi))
        .route("/api/system", get(api::system))
        .route("/api/releases", get(api::releases))
        .route("/api/releases/{release}", get(api::release))
        .route("/api/environments", get(api::environments))
        .route("/api/environments/{env}", get(api::environment))
        .route("/api/environments/{env}/deploy", post(api::deploy))
        .route("/api/environments/{env}/rollback", post(api::rollback))
        .route("/api/environments/{env}/apply", post(api::apply))
        .route("/api/history", get(api::history))
        .route("/api/runs/{id}", get(api::run))
        .route("/api/runs/{id}/logs", get(api::logs))
        .route("/api/builds", post(api::build))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .with_state(state)
}

/// Serve until SIGINT or SIGTERM.
pub async fn serve(opts: Options) -> Result<()> {
    // A broken system file is bad input: fail now (exit 2), not on the first request.
    System::load(&opts.system_file)?;
    let identity = match &opts.tls {
        Some((cert, key)) => Some(Identity::from_files(cert, key)?),
        None => None,
    };
    let acceptor = identity.as_ref().map(Identity::acceptor).transpose()?;
    let cannot_listen =
        |e: std::io::Error| Error::invalid(format!("cannot listen on `{}`: {e}", opts.listen));
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&opts.listen)
        .await
        .map_err(cannot_listen)?
        .collect();
    // Checked before binding: a refused address is never listened on, even briefly.
    let loopback = addrs.iter().all(|a| a.ip().to_canonical().is_loopback());
    if identity.is_none() && !opts.insecure_http && !loopback {
        return Err(Error::invalid_with_help(
            format!(
                "`stretch serve` will not listen on `{}` without TLS: tokens and session cookies would cross the network in the clear",
                opts.listen
            ),
            "pass `--tls-cert FILE --tls-key FILE` to serve HTTPS, or listen on 127.0.0.1 and reach it through an SSH tunnel; behind a proxy that terminates TLS, `--insecure-http` allows it",
        ));
    }
    let listener = tokio::net::TcpListener::bind(&addrs[..])
        .await
        .map_err(cannot_listen)?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::failed("serve", e.to_string()))?;
    let home = Home::open(&opts.home)?;
    let store = Store::open(&home.db())?;
    let reader = Store::open(&home.db())?;
    let state = Arc::new(AppState {
        system_file: opts.system_file,
        home,
        store,
        reader,
        identity: opts.identity,
        release_identity: opts.release_identity,
        auth: auth::Auth::new(&opts.tokens, identity.is_some()),
        jobs: jobs::Jobs::default(),
        feeds: feed::Feeds::default(),
        pages: pages::Pages::new()?,
    });
    let scheme = if identity.is_some() { "https" } else { "http" };
    eprintln!("stretch serve: listening on {scheme}://{addr}");
    if let Some(id) = &identity {
        eprintln!(
            "stretch serve: certificate {} (clients may pin it with STRETCH_SERVER_FINGERPRINT)",
            id.fingerprint()
        );
    }
    let app = router(state.clone());
    let make = move |peer: SocketAddr| {
        let app = TowerToHyperService::new(app.clone());
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            // Handlers and the auth middleware learn the client's address from this.
            req.extensions_mut().insert(ConnectInfo(peer));
            app.call(req)
        })
    };
    net::serve::serve(listener, acceptor, Limits::SERVER, make, shutdown_signal()).await;
    // Runs still going (on their own threads) end with the process: say so in their
    // history.
    let cut = state.jobs.interrupt_all(&state.store);
    eprintln!("stretch serve: stopped ({cut} run(s) interrupted)");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
