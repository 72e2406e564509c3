//! The registry's own HTTP API (distribution v2), for what the engine does not do:
//! deleting manifests. Logs in with basic auth or the bearer-token challenge; talks
//! HTTPS, and plain HTTP only to loopback registries (as Docker allows them), where a
//! self-signed certificate is also accepted. Every call is bounded in time.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::auth::{Credentials, Lookup};
use crate::net::tls::{Expect, PeerCheck, system_roots};
use crate::{Error, Result};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Answers we read (a token, an error); bigger ones are cut.
const MAX_BODY: usize = 64 * 1024;
const MANIFEST_TYPES: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json";

/// What deleting a manifest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Removed,
    /// The registry does not hold it (any more).
    Absent,
    /// The registry does not allow deletes.
    Unsupported,
}

pub struct Registry {
    host: String,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    login: Option<Credentials>,
    searched: String,
}

pub(crate) fn loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    name == "localhost" || name.starts_with("127.") || name == "[::1]"
}

impl Registry {
    pub fn new(host: &str, auth: &Lookup) -> Result<Registry> {
        let check = if loopback(host) {
            PeerCheck::new(Expect::FirstUse(None))?
        } else {
            PeerCheck::new(Expect::Roots(std::sync::Arc::new(system_roots()), vec![]))?
        };
        let mut tls = check.client_config()?;
        tls.alpn_protocols.clear();
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Registry {
            host: host.to_string(),
            http: Client::builder(TokioExecutor::new()).build(connector),
            login: auth.credentials.clone(),
            searched: auth.searched.clone(),
        })
    }

    /// How this registry is spoken to: `https`, or `http` for a loopback registry that
    /// does not speak TLS.
    pub async fn scheme(&self) -> Result<&'static str> {
        let https = format!("https://{}/v2/", self.host);
        match self.send_url(Method::GET, &https, None).await {
            Ok(_) => Ok("https"),
            Err(e) if loopback(&self.host) => {
                let http = format!("http://{}/v2/", self.host);
                self.send_url(Method::GET, &http, None)
                    .await
                    .map(|_| "http")
                    .map_err(|_| e)
            }
            Err(e) => Err(e),
        }
    }

    /// The digest of `repo:tag`'s manifest, if the registry has it.
    pub async fn manifest_digest(&self, repo: &str, tag: &str) -> Result<Option<String>> {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let basic = self.login.as_ref().map(|c| format!("Basic {}", c.basic()));
        let (mut status, mut headers, _) = self.send(Method::HEAD, &path, basic.as_deref()).await?;
        if status == StatusCode::UNAUTHORIZED
            && let Some(challenge) = headers
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        {
            let token = self
                .token(challenge, &format!("repository:{repo}:pull"))
                .await?;
            (status, headers, _) = self
                .send(Method::HEAD, &path, Some(&format!("Bearer {token}")))
                .await?;
        }
        match status {
            s if s.is_success() => Ok(headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(String::from)),
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(self.refused()),
            s => Err(Error::failed(
                "registry",
                format!("registry {} answered {s} about {repo}:{tag}", self.host),
            )),
        }
    }

    /// Delete `repo`'s manifest `digest` (`sha256:…`).
    pub async fn delete_manifest(&self, repo: &str, digest: &str) -> Result<Deleted> {
        let path = format!("/v2/{repo}/manifests/{digest}");
        let (status, _) = self
            .call(
                Method::DELETE,
                &path,
                &format!("repository:{repo}:delete,pull"),
            )
            .await?;
        match status {
            s if s.is_success() => Ok(Deleted::Removed),
            StatusCode::NOT_FOUND => Ok(Deleted::Absent),
            StatusCode::METHOD_NOT_ALLOWED => Ok(Deleted::Unsupported),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(self.refused()),
            s => Err(Error::failed(
                "registry",
                format!(
                    "registry {} answered {s} to deleting {repo}@{digest}",
                    self.host
                ),
            )),
        }
    }

    fn refused(&self) -> Error {
        super::auth::refused(&self.host, "unauthorized", &self.lookup(), "registry")
            .unwrap_or_else(|| Error::failed("registry", format!("registry {} refused", self.host)))
    }

    fn lookup(&self) -> Lookup {
        Lookup {
            credentials: self.login.clone(),
            searched: self.searched.clone(),
        }
    }

    /// A request with the login; a bearer challenge is answered once.
    async fn call(&self, method: Method, path: &str, scope: &str) -> Result<(StatusCode, Bytes)> {
        let basic = self.login.as_ref().map(|c| format!("Basic {}", c.basic()));
        let (status, headers, body) = self.send(method.clone(), path, basic.as_deref()).await?;
        if status != StatusCode::UNAUTHORIZED {
            return Ok((status, body));
        }
        let Some(challenge) = headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return Ok((status, body));
        };
        let token = self.token(challenge, scope).await?;
        let (status, _, body) = self
            .send(method, path, Some(&format!("Bearer {token}")))
            .await?;
        Ok((status, body))
    }

    /// The token a `Bearer realm="…",service="…"` challenge's realm gives.
    async fn token(&self, challenge: &str, scope: &str) -> Result<String> {
        let param = |name: &str| {
            challenge.split(',').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_string())
            })
        };
        let realm = param("realm").ok_or_else(|| {
            Error::failed(
                "registry",
                format!("registry {} sent a challenge without realm", self.host),
            )
        })?;
        let service = param("service").unwrap_or_default();
        let url = format!(
            "{realm}?service={}&scope={}",
            encode(&service),
            encode(scope)
        );
        let basic = self.login.as_ref().map(|c| format!("Basic {}", c.basic()));
        let (status, _, body) = self.send_url(Method::GET, &url, basic.as_deref()).await?;
        if !status.is_success() {
            return Err(self.refused());
        }
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        doc["token"]
            .as_str()
            .or_else(|| doc["access_token"].as_str())
            .map(String::from)
            .ok_or_else(|| {
                Error::failed(
                    "registry",
                    format!("registry {}'s token service gave no token", self.host),
                )
            })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes)> {
        let https = format!("https://{}{path}", self.host);
        match self.send_url(method.clone(), &https, authorization).await {
            Err(e) if loopback(&self.host) => {
                // Loopback registries may speak plain HTTP, as Docker allows.
                let http = format!("http://{}{path}", self.host);
                self.send_url(method, &http, authorization)
                    .await
                    .map_err(|_| e)
            }
            other => other,
        }
    }

    async fn send_url(
        &self,
        method: Method,
        url: &str,
        authorization: Option<&str>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header(header::ACCEPT, MANIFEST_TYPES);
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::invalid(format!("registry {}: bad request: {e}", self.host)))?;
        let unreachable = |e: String| {
            Error::failed(
                "registry",
                format!("registry {} is unreachable: {e}", self.host),
            )
        };
        let resp = tokio::time::timeout(TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer in {}s", TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY);
        let body = tokio::time::timeout(TIMEOUT, body.collect())
            .await
            .ok()
            .and_then(|b| b.ok())
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok((status, headers, body))
    }
}

impl Credentials {
    /// `user:secret` in base64, for basic auth.
    fn basic(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.username,
            self.secret()
        ))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_known() {
        assert!(loopback("127.0.0.1:5000"));
        assert!(loopback("localhost:5000"));
        assert!(!loopback("registry.example:5000"));
        assert_eq!(encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
