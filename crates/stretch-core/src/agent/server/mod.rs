//! The agent daemon (`stretch agent`): the HTTP API of [`crate::agent::api`] over the
//! host's Docker engine, one reverse proxy per group, and the desired state in its data
//! dir.
//!
//! * `mod.rs` — [`run`], the router, bearer-token auth, errors as [`ErrorBody`].
//! * `groups.rs` — what each endpoint does to a group; `instances.rs` — starting,
//!   checking and stopping containers; `files.rs` — an instance's `/stretch` folder.
//! * `edge.rs` — the proxy ports, routed by host name (HTTP and HTTPS); `proxy.rs` —
//!   forwarding to a group's instances; `certs.rs`, `acme.rs` — HTTPS certificates;
//!   `health.rs` — health checks.
//! * `state.rs` — the data dir and `state.json`; `adopt.rs` — re-adoption on start.
//! * `leases.rs` — one run at a time per environment, with fencing tokens.
//!
//! The API speaks TLS only: the agent's own certificate (made in its data dir on first
//! start, see [`tls_identity`]) or an operator's. Connections are bounded
//! ([`Limits::AGENT_API`]): a cap, handshake, header-read and idle times.
//!
//! Every request must carry `Authorization: Bearer TOKEN`; the comparison takes the
//! same time whatever the token (hashes compared in constant time). Failed attempts are
//! slowed per client address ([`Backoff`]) and logged with the address, never the
//! token.

mod acme;
mod adopt;
// Public for the edge benchmark (`benches/edge.rs`).
pub mod certs;
pub mod edge;
mod exec;
mod files;
mod groups;
mod health;
mod instances;
mod leases;
mod logs;
pub mod proxy;
mod state;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use self::groups::Agent;
use self::state::DataDir;
use crate::agent::api::{ErrorBody, GroupKey};
use crate::docker::Docker;
use crate::log::Log;
use crate::net::backoff::Backoff;
use crate::net::serve::Limits;
use crate::net::tls::Identity;
use crate::{Error, Result};

/// Largest request body (a spec with its templates and configuration).
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// How the daemon runs. No `Debug`: it holds the token.
pub struct AgentConfig {
    /// `HOST:PORT` the API listens on.
    pub listen: String,
    pub data_dir: PathBuf,
    pub token: String,
    /// The address the group proxies listen on (`0.0.0.0` by default).
    pub proxy_bind: IpAddr,
    /// The port answering ACME challenges and redirecting HTTPS groups' names (80 by
    /// default; `None`: neither).
    pub http_port: Option<u16>,
    /// Renew ACME certificates with less than this left.
    pub acme_renew_before: std::time::Duration,
    /// How often to look for ACME certificates to renew.
    pub acme_check_every: std::time::Duration,
    /// The API's TLS certificate and key (see [`tls_identity`]).
    pub tls: Identity,
    /// Docker's configuration folder for registry logins (default: Docker's own).
    pub docker_config: Option<PathBuf>,
    /// Where the agent reports what it does (the CLI prints it on stderr).
    pub log: Log,
}

/// Run the agent until SIGTERM or SIGINT. Instances keep running after it stops; the
/// next start re-adopts them. Logs `agent listening on ADDR` once it serves.
pub async fn run(config: AgentConfig) -> Result<()> {
    let log = config.log.clone();
    serve(config, shutdown_signal(), move |addr| {
        log.line(format!("agent listening on {addr}"))
    })
    .await
}

/// Like [`run`], until `shutdown` completes; `ready` is called with the API's address
/// once requests are served.
pub async fn serve(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    if config.token.trim().is_empty() {
        return Err(Error::invalid("the agent token is empty"));
    }
    let data = DataDir::open(&config.data_dir)?;
    let acceptor = config.tls.acceptor()?;
    let listener = TcpListener::bind(&config.listen).await.map_err(|e| {
        Error::invalid(format!(
            "the agent cannot listen on `{}`: {e}",
            config.listen
        ))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::failed("agent", format!("address of `{}`: {e}", config.listen)))?;
    let docker = Docker::connect().await?;
    let records = data.load()?;
    let leases = leases::Leases::open(data.root.join("leases.json"));
    let edge = Arc::new(edge::Edge::new(
        config.proxy_bind,
        config.http_port,
        proxy::upstream_client(),
    )?);
    let acme = acme::Acme::new(
        data.root.join("acme"),
        edge.clone(),
        config.acme_renew_before,
        config.log.clone(),
    );
    let agent = Arc::new(Agent {
        leases,
        edge,
        acme,
        docker,
        docker_config: config.docker_config.clone(),
        data,
        proxy_bind: config.proxy_bind,
        log: config.log.clone(),
        health: health::client(),
        records: Mutex::new(records),
        groups: Mutex::new(HashMap::new()),
        activity: Mutex::new(HashMap::new()),
        log_streams: Arc::new(tokio::sync::Semaphore::new(logs::MAX_STREAMS)),
        exec_sessions: Arc::new(tokio::sync::Semaphore::new(exec::MAX_SESSIONS)),
    });
    agent.adopt().await?;
    let renewals = tokio::spawn(renew_certificates(agent.clone(), config.acme_check_every));

    let auth = Arc::new(Auth {
        hash: blake3::hash(config.token.as_bytes()),
        backoff: Backoff::default(),
        log: config.log.clone(),
    });
    let group = "/v1/groups/{system}/{environment}/{group}";
    let app = Router::new()
        .route("/v1/state", get(state))
        .route(group, put(put_spec).delete(delete_group).get(get_spec))
        .route(
            "/v1/leases/{system}/{environment}",
            post(take_lease).delete(release_lease),
        )
        .route(&format!("{group}/switch"), post(switch))
        .route(&format!("{group}/config"), post(config_update))
        .route(&format!("{group}/restart"), post(restart))
        .route(&format!("{group}/activity"), get(group_activity))
        .route(&format!("{group}/logs"), get(group_logs))
        .route(&format!("{group}/exec"), post(group_exec))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(auth, require_token))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(agent);
    config.log.line(format!(
        "agent TLS certificate {}",
        config.tls.fingerprint()
    ));
    ready(addr);
    crate::net::serve::serve(
        listener,
        Some(acceptor),
        Limits::AGENT_API,
        move |peer| crate::net::serve::axum_service(app.clone(), peer),
        shutdown,
    )
    .await;
    renewals.abort();
    Ok(())
}

/// Renew the ACME certificates that are due, every `every` (the first look sooner).
async fn renew_certificates(agent: Arc<Agent>, every: std::time::Duration) {
    let mut wait = every.min(std::time::Duration::from_secs(30));
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        let wants = agent.acme_wants();
        agent.acme.renew_due(&wants).await;
    }
}

/// The agent's TLS identity: the operator's certificate and key when both are given,
/// else the one kept in `DATA_DIR/tls/` (made on first use; the key 0600). Whether it
/// was just made, so that the caller can say so.
pub fn tls_identity(
    data_dir: &std::path::Path,
    operator: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<(Identity, bool)> {
    match operator {
        Some((cert, key)) => Ok((Identity::from_files(cert, key)?, false)),
        None => {
            DataDir::open(data_dir)?;
            Identity::load_or_create(&data_dir.join("tls"), "stretch-agent")
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers, stop on Ctrl-C as tokio sees it.
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// auth

struct Auth {
    hash: blake3::Hash,
    backoff: Backoff,
    log: Log,
}

impl Auth {
    /// Constant time: both sides are hashed, and `blake3::Hash` compares in constant
    /// time, so neither the token's bytes nor its length leak through timing.
    fn accepts(&self, given: &str) -> bool {
        blake3::hash(given.as_bytes()) == self.hash
    }
}

async fn require_token(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let peer = req
        .extensions()
        .get::<crate::net::serve::Peer>()
        .map(|p| p.0.ip());
    if !given.is_empty() && auth.accepts(given) {
        if let Some(ip) = peer {
            auth.backoff.succeeded(ip);
        }
        return next.run(req).await;
    }
    if let Some(ip) = peer {
        let failure = auth.backoff.failed(ip);
        if failure.worth_logging() {
            auth.log.line(format!(
                "refused a request from {ip}: missing or wrong token ({} in a row)",
                failure.failures
            ));
        }
        tokio::time::sleep(failure.delay).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong token (`Authorization: Bearer TOKEN`)",
    )
    .into_response()
}

// ---------------------------------------------------------------------------------------
// errors

/// An error answer: a status and an [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e {
            Error::Config(_) | Error::Invalid { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Busy { .. } => StatusCode::CONFLICT,
            Error::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

// ---------------------------------------------------------------------------------------
// handlers

type Shared = State<Arc<Agent>>;
type GroupPath = Path<(String, String, String)>;

fn key((system, environment, group): (String, String, String)) -> GroupKey {
    GroupKey {
        system,
        environment,
        group,
    }
}

/// A JSON body; a malformed one is a 400 with an [`ErrorBody`] saying why.
fn parse<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

/// Run an operation in its own task: if the client hangs up, the operation still
/// finishes (a switch is never left half done).
async fn detached<T: Send + 'static>(
    op: impl Future<Output = ApiResult<T>> + Send + 'static,
) -> ApiResult<T> {
    tokio::spawn(op).await.unwrap_or_else(|e| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the operation failed: {e}"),
        ))
    })
}

async fn state(State(agent): Shared) -> Response {
    let state = crate::agent::api::AgentState {
        version: env!("CARGO_PKG_VERSION").to_string(),
        groups: agent.statuses().await,
    };
    axum::Json(state).into_response()
}

/// The lease token a write carries, if any.
fn lease_token(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    match headers.get(crate::agent::api::LEASE_HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("the lease header is not a number")),
    }
}

/// A write to group `p` is allowed only with the environment's lease, once it has one.
fn fenced(agent: &Agent, p: &(String, String, String), headers: &HeaderMap) -> ApiResult<()> {
    agent.leases.check(&p.0, &p.1, lease_token(headers)?)
}

async fn take_lease(
    State(agent): Shared,
    Path((system, environment)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let result = parse(&body).and_then(|req: crate::agent::api::LeaseRequest| {
        let grant = agent.leases.take(&system, &environment, &req)?;
        if let Some(stale) = &grant.took_over {
            agent.log.line(format!(
                "{system}/{environment}: {} took over the lease of {}, expired {}s ago",
                req.holder,
                stale.holder,
                stale.expired_ms_ago / 1000
            ));
        }
        Ok(grant)
    });
    respond(result)
}

async fn release_lease(
    State(agent): Shared,
    Path((system, environment)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    match lease_token(&headers) {
        Ok(token) => {
            agent.leases.release(&system, &environment, token);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn group_activity(State(agent): Shared, Path(p): GroupPath) -> Response {
    axum::Json(agent.activity_of(&key(p))).into_response()
}

async fn get_spec(State(agent): Shared, Path(p): GroupPath) -> Response {
    let key = key(p);
    match agent.record(&key).and_then(|r| r.current) {
        Some(spec) => axum::Json(spec).into_response(),
        None => ApiError::not_found(format!(
            "group `{}` of `{}/{}` runs nothing here",
            key.group, key.system, key.environment
        ))
        .into_response(),
    }
}

async fn put_spec(
    State(agent): Shared,
    Path(p): GroupPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        fenced(&agent, &p, &headers)?;
        let spec = parse(&body)?;
        detached(async move { agent.prepare(key(p), spec).await }).await
    };
    respond(result.await)
}

async fn switch(
    State(agent): Shared,
    Path(p): GroupPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        fenced(&agent, &p, &headers)?;
        let switch = parse(&body)?;
        detached(async move { agent.switch(key(p), switch).await }).await
    };
    respond(result.await)
}

async fn config_update(
    State(agent): Shared,
    Path(p): GroupPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        fenced(&agent, &p, &headers)?;
        let spec = parse(&body)?;
        detached(async move { agent.update_config(key(p), spec).await }).await
    };
    respond(result.await)
}

async fn restart(State(agent): Shared, Path(p): GroupPath, headers: HeaderMap) -> Response {
    let result = async {
        fenced(&agent, &p, &headers)?;
        detached(async move { agent.restart(key(p)).await }).await
    };
    respond(result.await)
}

async fn group_logs(
    State(agent): Shared,
    Path(p): GroupPath,
    Query(query): Query<crate::agent::api::LogQuery>,
) -> Response {
    match logs::logs(agent, key(p), query).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn group_exec(State(agent): Shared, Path(p): GroupPath, mut req: Request) -> Response {
    let upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let result = async {
        let body = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
            .await
            .map_err(|e| ApiError::bad_request(format!("reading the request: {e}")))?;
        let exec_req = parse(&body)?;
        exec::start(agent, key(p), exec_req, upgrade).await
    };
    match result.await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn delete_group(State(agent): Shared, Path(p): GroupPath, headers: HeaderMap) -> Response {
    if let Err(e) = fenced(&agent, &p, &headers) {
        return e.into_response();
    }
    match detached(async move { agent.remove_group(key(p)).await }).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found(format!(
        "no such endpoint: {} {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

fn respond<T: serde::Serialize>(result: ApiResult<T>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
