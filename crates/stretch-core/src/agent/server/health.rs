//! Health checks: HTTP GET `health.path` on an instance's published port
//! (`127.0.0.1:HOST_PORT`), 2xx = healthy. A [`Monitor`] keeps checking a group's
//! current instances after a switch and takes failing ones out of the proxy's rotation
//! (and puts them back when they recover).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::proxy::Pool;
use crate::agent::api::HealthSpec;
use crate::docker::Docker;
use crate::log::Log;

pub type HealthClient = Client<HttpConnector, Empty<Bytes>>;

/// A client that opens a fresh connection per check: a check is about whether the app
/// accepts and answers requests now.
pub fn client() -> HealthClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// How long one check may take.
pub fn attempt_timeout(health: &HealthSpec) -> Duration {
    Duration::from_millis(health.interval_ms.clamp(500, 5_000))
}

/// One check of `127.0.0.1:port` + `path`: `Ok` on 2xx, else what went wrong.
pub async fn check(
    client: &HealthClient,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let uri: Uri = format!("http://127.0.0.1:{port}{path}")
        .parse()
        .map_err(|e| format!("bad health path `{path}`: {e}"))?;
    let req = Request::get(uri)
        .header(hyper::header::USER_AGENT, "stretch-agent")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let attempt = async {
        let resp = client.request(req).await.map_err(|e| describe(&e))?;
        let status = resp.status();
        // Read the body so that the app sees a complete exchange.
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET {path} got no answer within {timeout:?}")),
    }
}

fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A background task checking a group's current instances; stops when dropped.
#[derive(Debug)]
pub struct Monitor(tokio::task::JoinHandle<()>);

impl Drop for Monitor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Monitor {
    /// Check every instance of `pool` each `health.interval_ms`; `group` names the
    /// group in log lines.
    /// A failing instance whose container runs on another host port than ours (the
    /// engine restarted it) is pointed at the new port.
    pub fn start(
        pool: Arc<Pool>,
        client: HealthClient,
        docker: Docker,
        health: HealthSpec,
        group: String,
        log: Log,
    ) -> Monitor {
        let interval = Duration::from_millis(health.interval_ms.max(100));
        let timeout = attempt_timeout(&health);
        Monitor(tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let set = pool.current();
                let checks = set.iter().map(|u| {
                    let client = &client;
                    let path = &health.path;
                    async move { (u, check(client, u.port, path, timeout).await) }
                });
                for (u, result) in futures_util::future::join_all(checks).await {
                    let short = &u.container[..u.container.len().min(12)];
                    let failed = result.is_err();
                    match (u.report(result.is_ok()), result) {
                        (Some(false), Err(cause)) => log.line(format!(
                            "{group}: instance {short} left the rotation: {cause}"
                        )),
                        (Some(true), _) => {
                            log.line(format!("{group}: instance {short} is healthy again"))
                        }
                        _ => {}
                    }
                    if failed
                        && let Ok(Some(c)) = docker.inspect_container(&u.container).await
                        && let Some(port) = c.host_port.filter(|p| c.running() && *p != u.port)
                        && pool.repoint(&u.container, port)
                    {
                        log.line(format!(
                            "{group}: instance {short} was restarted on 127.0.0.1:{port}"
                        ));
                    }
                }
            }
        }))
    }
}
