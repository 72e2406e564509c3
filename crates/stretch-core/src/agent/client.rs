//! Client of the agent protocol (used by the deploy step): one [`AgentClient`] per
//! host, JSON over HTTP/1.1 over TLS with the bearer token. The agent's certificate is
//! checked before the first byte of a request is sent ([`crate::net::tls::PeerCheck`],
//! what to expect from [`super::trust`]); connections are kept and reused, so a
//! deploy makes one TLS handshake per agent.
//!
//! Errors say which agent and what kind of failure ([`AgentError`]): unreachable
//! (refused, timed out, hung up), a certificate refused, the token rejected, the
//! agent's own error message, or an answer that is not the protocol.
//!
//! Timeouts: connecting 3 s; `state` 30 s; `PUT` 15 min (the agent pulls the image);
//! `switch` and `config` the group's health timeout + its drain and stop bounds + 60 s
//! (known from the spec this client last sent for the group; 10 min otherwise).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::api::{
    AgentState, EXEC_UPGRADE, ErrorBody, ExecRequest, GroupKey, GroupSpec, GroupStatus,
    LEASE_HEADER, LeaseGrant, LeaseRequest, LogLine, LogQuery, Prepared, Switch,
};
use super::trust::Basis;
use crate::net::tls::{Expect, PeerCheck, Refusal};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const STATE_TIMEOUT: Duration = Duration::from_secs(30);
const PREPARE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const DEFAULT_SWITCH_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const DELETE_TIMEOUT: Duration = Duration::from_secs(3 * 60);
/// Slack on top of what a switch may legitimately take.
const SLACK: Duration = Duration::from_secs(60);
/// Kept below the agent's idle bound (90 s), so the client, not the agent, closes.
const POOL_IDLE: Duration = Duration::from_secs(80);

/// What went wrong talking to an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// Connection refused, timed out, or closed before an answer.
    #[error("agent at {addr} is unreachable: {cause}")]
    Unreachable { addr: String, cause: String },
    /// The agent answered 401.
    #[error("agent at {addr} rejected the token")]
    Unauthorized { addr: String },
    /// The agent answered with an error: its status and message.
    #[error("agent at {addr}: {message}")]
    Failed {
        addr: String,
        status: u16,
        message: String,
    },
    /// The answer is not what the protocol says.
    #[error("agent at {addr} answered unexpectedly: {message}")]
    Protocol { addr: String, message: String },
    /// The agent's certificate is not the one trusted for it; nothing was sent.
    #[error("{}", identity_message(.0))]
    Identity(Box<IdentityRefused>),
}

/// An agent's certificate refused: which host, why, and what was trusted instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRefused {
    pub name: String,
    pub addr: String,
    pub refusal: Refusal,
    pub basis: Basis,
}

fn identity_message(r: &IdentityRefused) -> String {
    let (name, addr, refusal, basis) = (&r.name, &r.addr, &r.refusal, &r.basis);
    let who = if name == addr {
        format!("agent at {addr}")
    } else {
        format!("host `{name}`: agent at {addr}")
    };
    match refusal {
        Refusal::Mismatch {
            expected,
            presented,
        } => {
            let source = match basis {
                Basis::Pinned => "pinned for it (`fingerprint:` in system.yml)".to_string(),
                Basis::Known { file, .. } => {
                    format!(
                        "recorded for it in `{}` at the first contact",
                        file.display()
                    )
                }
                Basis::Ca(_) => "expected".to_string(),
            };
            format!(
                "{who} presented certificate {presented}, but {expected} is {source}; refused before sending anything"
            )
        }
        Refusal::Untrusted { presented, reason } => {
            let ca = match basis {
                Basis::Ca(path) => format!("`agent_ca` `{}`", path.display()),
                _ => "the trusted authorities".to_string(),
            };
            format!(
                "{who} presented a certificate ({presented}) that {ca} does not vouch for ({reason}); refused before sending anything"
            )
        }
    }
}

impl From<AgentError> for crate::Error {
    fn from(e: AgentError) -> Self {
        let help = match &e {
            AgentError::Unreachable { .. } => {
                Some("is `stretch agent` running there, and is the address right?".to_string())
            }
            AgentError::Unauthorized { .. } => Some(
                "the environment's token (`agent_token_file` or STRETCH_AGENT_TOKEN) must be the agent's"
                    .to_string(),
            ),
            AgentError::Identity(r) => Some(match &r.basis {
                Basis::Pinned => "if that agent's key was replaced on purpose, pin its new fingerprint (on the host: `stretch agent --data-dir DIR --print-fingerprint`); otherwise something is intercepting the connection".to_string(),
                Basis::Known { file, .. } => format!(
                    "if that agent's key was replaced on purpose, delete its line from `{}` (or pin its new `fingerprint:`); otherwise something is intercepting the connection",
                    file.display()
                ),
                Basis::Ca(_) => "the agent's certificate must be signed by that CA and name the address the controller uses (an IP or DNS subject alternative name)".to_string(),
            }),
            _ => None,
        };
        crate::Error::Failed {
            stage: "agent".to_string(),
            message: e.to_string(),
            help,
        }
    }
}

/// A client of one agent. Cheap to clone (clones share connections).
#[derive(Clone)]
pub struct AgentClient {
    /// The host's name in system.yml (or the address), for messages.
    name: String,
    addr: String,
    authorization: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    check: Arc<PeerCheck>,
    basis: Basis,
    /// Per group, how long a switch may take (from the last spec sent).
    switch_timeouts: Arc<Mutex<HashMap<GroupKey, Duration>>>,
    /// The run's lease token on this agent, carried by every write.
    lease: Arc<Mutex<Option<u64>>>,
}

impl std::fmt::Debug for AgentClient {
    // Not derived: the token stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// A client of host `name`'s agent at `addr` (`host:port`) using `token`, trusting
    /// the certificate `expect` says (`basis`: why, for messages).
    pub fn new(
        name: &str,
        addr: &str,
        token: &str,
        expect: Expect,
        basis: Basis,
    ) -> Result<AgentClient, AgentError> {
        let protocol = |message: String| AgentError::Protocol {
            addr: addr.to_string(),
            message,
        };
        let check = PeerCheck::new(expect).map_err(|e| protocol(e.to_string()))?;
        let tls = check.client_config().map_err(|e| protocol(e.to_string()))?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(AgentClient {
            name: name.to_string(),
            addr: addr.to_string(),
            authorization: format!("Bearer {token}"),
            client,
            check,
            basis,
            switch_timeouts: Arc::default(),
            lease: Arc::default(),
        })
    }

    /// A client that trusts only the certificate with `fingerprint` (tests, tools).
    pub fn pinned(addr: &str, token: &str, fingerprint: &str) -> Result<AgentClient, AgentError> {
        AgentClient::new(
            addr,
            addr,
            token,
            Expect::Pinned(fingerprint.to_string()),
            Basis::Pinned,
        )
    }

    /// The agent's address, as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The host's name in system.yml.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why this agent's certificate is trusted.
    pub fn basis(&self) -> &Basis {
        &self.basis
    }

    /// The fingerprint the agent presented at the last handshake, if any.
    pub fn presented(&self) -> Option<String> {
        self.check.seen()
    }

    /// How many full TLS handshakes this client made.
    pub fn handshakes(&self) -> usize {
        self.check.handshakes()
    }

    /// `GET /v1/state`.
    pub async fn state(&self) -> Result<AgentState, AgentError> {
        self.call(Method::GET, "/v1/state", None::<&()>, STATE_TIMEOUT)
            .await
    }

    /// `GET …/activity`: what the agent is doing to the group now (bounded to 1 s:
    /// it only feeds progress displays).
    pub async fn activity(
        &self,
        key: &GroupKey,
    ) -> Result<crate::agent::api::GroupActivity, AgentError> {
        let path = format!("{}/activity", key.path());
        self.call(Method::GET, &path, None::<&()>, Duration::from_secs(1))
            .await
    }

    /// The spec a group runs now (`None`: it runs nothing on this host).
    pub async fn current_spec(&self, key: &GroupKey) -> Result<Option<GroupSpec>, AgentError> {
        let (status, body) = self
            .send(Method::GET, &key.path(), None, STATE_TIMEOUT)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.error(status, &body));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| AgentError::Protocol {
                addr: self.addr.clone(),
                message: format!("{}: {e}", key.path()),
            })
    }

    /// Take or renew the lease of `system`'s `environment`; from then on every write
    /// of this client carries it.
    pub async fn take_lease(
        &self,
        system: &str,
        environment: &str,
        req: &LeaseRequest,
    ) -> Result<LeaseGrant, AgentError> {
        let path = format!("/v1/leases/{system}/{environment}");
        let grant: LeaseGrant = self
            .call(Method::POST, &path, Some(req), STATE_TIMEOUT)
            .await?;
        if let Ok(mut l) = self.lease.lock() {
            *l = Some(grant.token);
        }
        Ok(grant)
    }

    /// Give the lease back (best effort: an unreleased lease expires by itself).
    pub async fn release_lease(&self, system: &str, environment: &str) {
        let path = format!("/v1/leases/{system}/{environment}");
        let _ = self
            .send(Method::DELETE, &path, None, Duration::from_secs(5))
            .await;
        if let Ok(mut l) = self.lease.lock() {
            *l = None;
        }
    }

    /// `PUT` a group's spec: stored as pending, its image pulled.
    pub async fn put_spec(&self, spec: &GroupSpec) -> Result<Prepared, AgentError> {
        self.remember(spec);
        self.call(Method::PUT, &spec.key.path(), Some(spec), PREPARE_TIMEOUT)
            .await
    }

    /// Switch a group to its pending spec.
    pub async fn switch(&self, key: &GroupKey, switch: &Switch) -> Result<GroupStatus, AgentError> {
        let path = format!("{}/switch", key.path());
        self.call(Method::POST, &path, Some(switch), self.switch_timeout(key))
            .await
    }

    /// Give a group's running release a new configuration (config-only deploy).
    pub async fn update_config(&self, spec: &GroupSpec) -> Result<GroupStatus, AgentError> {
        self.remember(spec);
        let path = format!("{}/config", spec.key.path());
        let timeout = self.switch_timeout(&spec.key);
        self.call(Method::POST, &path, Some(spec), timeout).await
    }

    /// Stop and remove a group's instances and close its proxy.
    pub async fn remove_group(&self, key: &GroupKey) -> Result<(), AgentError> {
        let (status, body) = self
            .send(Method::DELETE, &key.path(), None, DELETE_TIMEOUT)
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(self.error(status, &body))
        }
    }

    fn remember(&self, spec: &GroupSpec) {
        let drain = spec.stop_timeout_ms.unwrap_or(30_000);
        let stop = spec.stop_timeout_ms.unwrap_or(10_000);
        let pull = if spec.pull { 5 * 60_000 } else { 0 };
        let timeout = Duration::from_millis(spec.health.timeout_ms + drain + stop + pull) + SLACK;
        if let Ok(mut t) = self.switch_timeouts.lock() {
            t.insert(spec.key.clone(), timeout);
        }
    }

    fn switch_timeout(&self, key: &GroupKey) -> Duration {
        self.switch_timeouts
            .lock()
            .ok()
            .and_then(|t| t.get(key).copied())
            .unwrap_or(DEFAULT_SWITCH_TIMEOUT)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| AgentError::Protocol {
                addr: self.addr.clone(),
                message: format!("cannot encode the request: {e}"),
            })?),
            None => None,
        };
        let (status, bytes) = self.send(method, path, body, timeout).await?;
        if !status.is_success() {
            return Err(self.error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Protocol {
            addr: self.addr.clone(),
            message: format!("{path}: {e}"),
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), AgentError> {
        let exchange = async {
            let resp = self.open(method, path, body, None).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unreachable(format!("reading the answer: {}", chain(&e))))?
                .to_bytes();
            Ok((status, bytes))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(self.unreachable(format!("no answer within {}s", timeout.as_secs()))),
        }
    }

    fn unreachable(&self, cause: String) -> AgentError {
        AgentError::Unreachable {
            addr: self.addr.clone(),
            cause,
        }
    }

    /// Send a request; its answer's head (the body is the caller's to read).
    /// `upgrade`: ask to switch the connection to that protocol.
    async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        upgrade: Option<&str>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.addr))
            .header(header::AUTHORIZATION, &self.authorization)
            .header(header::ACCEPT, "application/json");
        if let Some(token) = self.lease.lock().ok().and_then(|l| *l) {
            req = req.header(LEASE_HEADER, token);
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(protocol) = upgrade {
            req = req
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, protocol);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| AgentError::Protocol {
                addr: self.addr.clone(),
                message: format!("bad request to {path}: {e}"),
            })?;
        self.client
            .request(req)
            .await
            .map_err(|e| match self.check.refusal() {
                Some(refusal) => AgentError::Identity(Box::new(IdentityRefused {
                    name: self.name.clone(),
                    addr: self.addr.clone(),
                    refusal,
                    basis: self.basis.clone(),
                })),
                None => self.unreachable(chain(&e)),
            })
    }

    /// An answer that is not a success, read (at most 64 KiB) into its error.
    async fn failure(&self, resp: hyper::Response<hyper::body::Incoming>) -> AgentError {
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024);
        match tokio::time::timeout(STATE_TIMEOUT, body.collect()).await {
            Ok(Ok(b)) => self.error(status, &b.to_bytes()),
            _ => self.error(status, b""),
        }
    }

    /// `POST …/restart`: fresh instances of the group's current spec (`spec`, as the
    /// agent runs it: it bounds how long this may take).
    pub async fn restart(&self, spec: &GroupSpec) -> Result<GroupStatus, AgentError> {
        self.remember(spec);
        let path = format!("{}/restart", spec.key.path());
        self.call(
            Method::POST,
            &path,
            None::<&()>,
            self.switch_timeout(&spec.key),
        )
        .await
    }

    /// `GET …/logs`: the group's output on this host, line by line.
    pub async fn logs(&self, key: &GroupKey, query: &LogQuery) -> Result<LogReader, AgentError> {
        let mut params = Vec::new();
        if let Some(since) = query.since {
            params.push(format!("since={since}"));
        }
        if let Some(tail) = query.tail {
            params.push(format!("tail={tail}"));
        }
        if query.follow {
            params.push("follow=true".to_string());
        }
        let path = format!("{}/logs?{}", key.path(), params.join("&"));
        let resp = tokio::time::timeout(STATE_TIMEOUT, self.open(Method::GET, &path, None, None))
            .await
            .map_err(|_| {
                self.unreachable(format!("no answer within {}s", STATE_TIMEOUT.as_secs()))
            })??;
        if !resp.status().is_success() {
            return Err(self.failure(resp).await);
        }
        Ok(LogReader {
            addr: self.addr.clone(),
            body: resp.into_body(),
            buf: Vec::new(),
            done: false,
        })
    }

    /// `POST …/exec`: the upgraded connection carrying the command's frames.
    pub async fn exec(
        &self,
        key: &GroupKey,
        req: &ExecRequest,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, AgentError> {
        let body = serde_json::to_vec(req).map_err(|e| AgentError::Protocol {
            addr: self.addr.clone(),
            message: format!("cannot encode the request: {e}"),
        })?;
        let path = format!("{}/exec", key.path());
        let open = self.open(Method::POST, &path, Some(body), Some(EXEC_UPGRADE));
        let resp = tokio::time::timeout(STATE_TIMEOUT, open)
            .await
            .map_err(|_| {
                self.unreachable(format!("no answer within {}s", STATE_TIMEOUT.as_secs()))
            })??;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.failure(resp).await);
        }
        hyper::upgrade::on(resp)
            .await
            .map(TokioIo::new)
            .map_err(|e| self.unreachable(format!("switching to exec: {}", chain(&e))))
    }

    fn error(&self, status: StatusCode, body: &[u8]) -> AgentError {
        let addr = self.addr.clone();
        if status == StatusCode::UNAUTHORIZED {
            return AgentError::Unauthorized { addr };
        }
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) => AgentError::Failed {
                addr,
                status: status.as_u16(),
                message: e.error,
            },
            Err(_) => AgentError::Protocol {
                addr,
                message: format!(
                    "{status} with a body that is not an error: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            },
        }
    }
}

/// An error with its causes (`client error (Connect): tcp connect error: Connection
/// refused`): the last ones alone say what happened.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = s.source();
    }
    text
}

/// The lines of a `logs` answer, read as they come.
pub struct LogReader {
    addr: String,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    done: bool,
}

/// Longest line a reader accepts (the agent cuts its lines well below).
const MAX_READ_LINE: usize = 1024 * 1024;

impl LogReader {
    /// The next line; `None` when the agent ended the stream.
    pub async fn next(&mut self) -> Option<Result<LogLine, AgentError>> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = &line[..end];
                // Empty lines keep a quiet stream alive.
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(
                    serde_json::from_slice(line).map_err(|e| AgentError::Protocol {
                        addr: self.addr.clone(),
                        message: format!("a log line that is not one: {e}"),
                    }),
                );
            }
            if self.done {
                return None;
            }
            if self.buf.len() > MAX_READ_LINE {
                self.done = true;
                return Some(Err(AgentError::Protocol {
                    addr: self.addr.clone(),
                    message: format!("a log line over {MAX_READ_LINE} bytes"),
                }));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(AgentError::Unreachable {
                        addr: self.addr.clone(),
                        cause: format!("reading the log: {}", chain(&e)),
                    }));
                }
                None => self.done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_agent_is_named() {
        let port = stretch_test::free_port();
        let addr = format!("127.0.0.1:{port}");
        let fp = format!("sha256:{}", "0".repeat(64));
        let client = AgentClient::pinned(&addr, "t", &fp).unwrap();
        let err = client.state().await.unwrap_err();
        assert!(matches!(err, AgentError::Unreachable { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("agent at {addr} is unreachable: ")),
            "{text}"
        );
        assert!(text.to_lowercase().contains("refused"), "{text}");
        let core: crate::Error = err.into();
        assert_eq!(core.exit_code(), 1);
    }
}
