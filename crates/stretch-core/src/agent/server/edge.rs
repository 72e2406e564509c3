//! The agent's edge: one listener per proxy port, shared by every group that listens
//! there and routed by host name — the `Host` header on plain HTTP, the TLS server name
//! (SNI) on HTTPS, where each group's certificate is chosen during the handshake.
//!
//! * A group with `domains` gets those names on its port; a group without is the
//!   port's default and gets every other name. No default: an unknown name gets 404
//!   (on HTTPS after a handshake with a self-signed default certificate).
//! * A port is all HTTPS or all plain HTTP. The agent's HTTP port (`--http-port`,
//!   default 80) answers ACME HTTP-01 challenges and redirects the HTTPS groups'
//!   names to their HTTPS port; it is open whenever an HTTPS group or a challenge
//!   needs it, and may also serve plain groups.
//! * Routes change atomically per port ([`Edge::set`]): a request reads its port's
//!   table once. A certificate lives in a [`CertSlot`] that renewal replaces in place:
//!   the next handshake presents the new one, open connections are untouched.
//! * Ports no route needs any more are handed back to the caller ([`Retired`]) and
//!   close (gracefully) when it drops them — after the drain, as the old proxies did.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::proxy::{Pool, RespBody, UpstreamClient, forward};
use crate::agent::api::{CertificateStatus, GroupKey};
use crate::net::serve::{Limits, Sni};
use crate::{Error, Result};

/// What a port serves a group by.
#[derive(Clone)]
pub struct Route {
    pub key: GroupKey,
    pub port: u16,
    /// Lowercase names (`*.example.com` for one label of any name); empty: the default.
    pub domains: Vec<String>,
    /// HTTPS with this certificate; `None`: plain HTTP.
    pub cert: Option<Arc<CertSlot>>,
    pub pool: Arc<Pool>,
}

/// A certificate in use, replaceable while served.
pub struct CertSlot(RwLock<Arc<Served>>);

/// A certificate with its key, as rustls signs with it, and what `status` says of it.
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub info: CertificateStatus,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

impl CertSlot {
    pub fn new(served: Served) -> Arc<CertSlot> {
        Arc::new(CertSlot(RwLock::new(Arc::new(served))))
    }
    pub fn get(&self) -> Arc<Served> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set(&self, served: Served) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(served);
    }
    /// Note why the last renewal failed (kept until one succeeds).
    pub fn renewal_failed(&self, why: String) {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        let mut info = guard.info.clone();
        info.renewal_error = Some(why);
        *guard = Arc::new(Served {
            key: guard.key.clone(),
            info,
            not_after: guard.not_after,
        });
    }
}

/// A name normalized for routing: lowercase, no port, no trailing dot.
pub fn normalize_host(raw: &str) -> String {
    let raw = raw.trim();
    // `[v6]:port` or `[v6]`; else `name:port`.
    let name = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(raw, |(name, _)| name)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Why two routes cannot share a port, or `None`. `others` are the other groups'
/// routes as `(group, port, domains, https)`.
pub fn clash<'a>(
    port: u16,
    domains: &[String],
    https: bool,
    others: impl IntoIterator<Item = (&'a GroupKey, u16, &'a [String], bool)>,
    http_port: Option<u16>,
) -> Option<String> {
    if https && http_port == Some(port) {
        return Some(format!(
            "port {port} is this agent's HTTP port (redirects and ACME challenges): an HTTPS group cannot listen on it"
        ));
    }
    for (other, p, theirs, their_https) in others {
        if p != port {
            continue;
        }
        let name = super::instances::display(other);
        if https != their_https {
            return Some(format!(
                "port {port} serves {} for group {name}; one port is all HTTPS or all plain HTTP",
                if their_https { "HTTPS" } else { "plain HTTP" }
            ));
        }
        if domains.is_empty() && theirs.is_empty() {
            return Some(format!(
                "port {port} is already the proxy of group {name}, and neither has `domains`"
            ));
        }
        if let Some(d) = domains.iter().find(|d| theirs.contains(d)) {
            return Some(format!(
                "domain {d} on port {port} is already claimed by group {name}"
            ));
        }
    }
    None
}

/// Listeners that no route needs any more; they close when this is dropped.
#[derive(Default)]
pub struct Retired(#[allow(dead_code)] Vec<Listener>);

/// Token → key authorization of the HTTP-01 challenges being answered.
#[derive(Default)]
pub struct Challenges(Mutex<HashMap<String, String>>);

impl Challenges {
    fn get(&self, token: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }
    fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}

pub struct Edge {
    bind: IpAddr,
    http_port: Option<u16>,
    client: UpstreamClient,
    /// Presented on HTTPS when no group's certificate fits the name asked for.
    fallback: Arc<CertifiedKey>,
    challenges: Arc<Challenges>,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    routes: BTreeMap<GroupKey, Route>,
    ports: BTreeMap<u16, Port>,
}

struct Port {
    table: Arc<RwLock<Arc<Table>>>,
    listener: Listener,
}

/// A listening socket's task; stopped (gracefully) when dropped.
struct Listener {
    tls: bool,
    shutdown: watch::Sender<bool>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

#[derive(Clone)]
struct Target {
    key: GroupKey,
    pool: Arc<Pool>,
    cert: Option<Arc<CertSlot>>,
}

/// One port's routing, read once per request.
#[derive(Default)]
struct Table {
    tls: bool,
    /// This is the agent's HTTP port: challenges and redirects.
    http: bool,
    hosts: HashMap<String, Target>,
    default: Option<Target>,
    /// HTTPS names → their port, redirected to from the HTTP port.
    redirects: HashMap<String, u16>,
}

impl Table {
    fn lookup(&self, name: &str) -> Option<&Target> {
        if let Some(t) = self.hosts.get(name) {
            return Some(t);
        }
        let (_, parent) = name.split_once('.')?;
        self.hosts.get(&format!("*.{parent}"))
    }

    fn redirect(&self, name: &str) -> Option<u16> {
        if let Some(p) = self.redirects.get(name) {
            return Some(*p);
        }
        let (_, parent) = name.split_once('.')?;
        self.redirects.get(&format!("*.{parent}")).copied()
    }
}

/// Picks the certificate of the name a client asks for.
struct Resolver {
    table: Arc<RwLock<Arc<Table>>>,
    fallback: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
        let target = match hello.server_name() {
            Some(name) => table.lookup(&normalize_host(name)),
            None => None,
        }
        .or(table.default.as_ref());
        Some(
            target
                .and_then(|t| t.cert.as_ref())
                .map(|slot| slot.get().key.clone())
                .unwrap_or_else(|| self.fallback.clone()),
        )
    }
}

impl Edge {
    pub fn new(bind: IpAddr, http_port: Option<u16>, client: UpstreamClient) -> Result<Edge> {
        Ok(Edge {
            bind,
            http_port,
            client,
            fallback: fallback_certificate()?,
            challenges: Arc::new(Challenges::default()),
            state: tokio::sync::Mutex::new(State::default()),
        })
    }

    pub fn http_port(&self) -> Option<u16> {
        self.http_port
    }

    /// Serve `route` (replacing the group's earlier one). New ports are bound before
    /// anything changes: on error every route is as it was.
    pub async fn set(&self, route: Route) -> Result<Retired> {
        let mut state = self.state.lock().await;
        let others = state
            .routes
            .values()
            .filter(|r| r.key != route.key)
            .map(|r| (&r.key, r.port, r.domains.as_slice(), r.cert.is_some()));
        if let Some(why) = clash(
            route.port,
            &route.domains,
            route.cert.is_some(),
            others,
            self.http_port,
        ) {
            return Err(Error::invalid(why));
        }
        let previous = state.routes.insert(route.key.clone(), route.clone());
        match self.rebuild(&mut state).await {
            Ok(retired) => Ok(retired),
            Err(e) => {
                match previous {
                    Some(p) => state.routes.insert(p.key.clone(), p),
                    None => state.routes.remove(&route.key),
                };
                // A port that was closed to switch protocols is opened again.
                let _ = self.rebuild(&mut state).await;
                Err(e)
            }
        }
    }

    /// Stop serving the group.
    pub async fn remove(&self, key: &GroupKey) -> Retired {
        let mut state = self.state.lock().await;
        if state.routes.remove(key).is_none() {
            return Retired::default();
        }
        // Removing binds nothing new, so it cannot fail.
        self.rebuild(&mut state).await.unwrap_or_default()
    }

    /// The certificate the group's port presents for it.
    pub async fn certificate(&self, key: &GroupKey) -> Option<CertificateStatus> {
        let state = self.state.lock().await;
        let slot = state.routes.get(key)?.cert.clone()?;
        Some(slot.get().info.clone())
    }

    /// Answer `token` with `authorization` on the HTTP port until the guard drops.
    pub async fn challenge(
        self: &Arc<Self>,
        token: &str,
        authorization: &str,
    ) -> Result<ChallengeGuard> {
        let Some(port) = self.http_port else {
            return Err(Error::invalid(
                "ACME needs the agent's HTTP port for its challenges, and `--http-port 0` turned it off",
            ));
        };
        self.challenges
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), authorization.to_string());
        let guard = ChallengeGuard {
            edge: self.clone(),
            token: token.to_string(),
        };
        let mut state = self.state.lock().await;
        self.rebuild(&mut state).await.map_err(|e| {
            Error::failed(
                "acme",
                format!("cannot answer ACME challenges on port {port}: {e}"),
            )
        })?;
        Ok(guard)
    }

    /// Make every port's table from the routes; bind what is new, hand back what is
    /// not needed any more.
    async fn rebuild(&self, state: &mut State) -> Result<Retired> {
        let mut tables: BTreeMap<u16, Table> = BTreeMap::new();
        let mut any_tls = false;
        for r in state.routes.values() {
            let table = tables.entry(r.port).or_default();
            table.tls = r.cert.is_some();
            any_tls |= table.tls;
            let target = Target {
                key: r.key.clone(),
                pool: r.pool.clone(),
                cert: r.cert.clone(),
            };
            if r.domains.is_empty() {
                table.default = Some(target);
            } else {
                for d in &r.domains {
                    table.hosts.insert(d.clone(), target.clone());
                }
            }
        }
        if let Some(http) = self.http_port
            && (any_tls || !self.challenges.is_empty())
        {
            let redirects: HashMap<String, u16> = state
                .routes
                .values()
                .filter(|r| r.cert.is_some())
                .flat_map(|r| r.domains.iter().map(|d| (d.clone(), r.port)))
                .collect();
            let table = tables.entry(http).or_default();
            table.http = true;
            table.redirects = redirects;
        } else if let Some(t) = self.http_port.and_then(|p| tables.get_mut(&p)) {
            t.http = true;
        }

        // A port switching between HTTPS and plain HTTP needs a new listener on the same
        // address: the old one closes first (its connections finish on their own).
        let flipped: Vec<u16> = tables
            .iter()
            .filter(|(port, t)| {
                state
                    .ports
                    .get(port)
                    .is_some_and(|p| p.listener.tls != t.tls)
            })
            .map(|(port, _)| *port)
            .collect();
        for port in flipped {
            state.ports.remove(&port);
        }
        // Bind the new ports first: a failure changes nothing (but a flipped port).
        let mut bound: Vec<(u16, Port)> = Vec::new();
        for (port, table) in &tables {
            let reuse = state
                .ports
                .get(port)
                .is_some_and(|p| p.listener.tls == table.tls);
            if !reuse {
                bound.push((*port, self.bind(*port, table.tls).await?));
            }
        }
        let mut retired = Vec::new();
        let old_ports: Vec<u16> = state.ports.keys().copied().collect();
        for port in old_ports {
            let keep = tables.get(&port).is_some_and(|t| {
                state
                    .ports
                    .get(&port)
                    .is_some_and(|p| p.listener.tls == t.tls)
            });
            if !keep && let Some(p) = state.ports.remove(&port) {
                retired.push(p.listener);
            }
        }
        for (port, p) in bound {
            state.ports.insert(port, p);
        }
        for (port, table) in tables {
            if let Some(p) = state.ports.get(&port) {
                *p.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
            }
        }
        Ok(Retired(retired))
    }

    async fn bind(&self, port: u16, tls: bool) -> Result<Port> {
        let addr = SocketAddr::new(self.bind, port);
        // A port switching between HTTPS and plain HTTP is still held by its old
        // listener for a moment after that one was told to stop.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(Error::failed(
                        "agent",
                        format!("the proxy cannot listen on {addr}: {e}"),
                    ));
                }
            }
        };
        let table = Arc::new(RwLock::new(Arc::new(Table::default())));
        let acceptor = tls.then(|| {
            let mut config =
                rustls::ServerConfig::builder_with_provider(crate::net::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map(|b| {
                        b.with_no_client_auth()
                            .with_cert_resolver(Arc::new(Resolver {
                                table: table.clone(),
                                fallback: self.fallback.clone(),
                            }))
                    });
            if let Ok(c) = config.as_mut() {
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
            }
            config.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)))
        });
        let acceptor = match acceptor {
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => return Err(Error::failed("agent", format!("TLS setup: {e}"))),
            None => None,
        };
        let (shutdown, mut rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            table: table.clone(),
            challenges: self.challenges.clone(),
            client: self.client.clone(),
        });
        let make = move |peer: SocketAddr| {
            let shared = shared.clone();
            hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(shared.handle(req, peer).await) }
            })
        };
        let stop = async move {
            let _ = rx.changed().await;
        };
        tokio::spawn(crate::net::serve::serve(
            listener,
            acceptor,
            Limits::PROXY,
            make,
            stop,
        ));
        Ok(Port {
            table,
            listener: Listener { tls, shutdown },
        })
    }
}

/// Stops answering a challenge when dropped.
pub struct ChallengeGuard {
    edge: Arc<Edge>,
    token: String,
}

impl Drop for ChallengeGuard {
    fn drop(&mut self) {
        self.edge
            .challenges
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.token);
        // The HTTP port closes at the next change of routes if nothing else needs it.
    }
}

/// What every connection of one port shares.
struct Shared {
    table: Arc<RwLock<Arc<Table>>>,
    challenges: Arc<Challenges>,
    client: UpstreamClient,
}

const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

impl Shared {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<RespBody> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .map(normalize_host)
            .unwrap_or_default();
        if table.http
            && let Some(token) = req.uri().path().strip_prefix(CHALLENGE_PREFIX)
            && let Some(answer) = self.challenges.get(token)
        {
            return text(StatusCode::OK, answer);
        }
        let target = if table.tls {
            let sni = req.extensions().get::<Sni>().map(|s| normalize_host(&s.0));
            match sni {
                Some(name) => {
                    let by_sni = table.lookup(&name).or(table.default.as_ref());
                    // A request for another group than the one the handshake chose.
                    if !host.is_empty() && host != name {
                        let by_host = table.lookup(&host).or(table.default.as_ref());
                        if by_host.map(|t| &t.key) != by_sni.map(|t| &t.key) {
                            return text(
                                StatusCode::MISDIRECTED_REQUEST,
                                format!("{host} is not served on this connection\n"),
                            );
                        }
                    }
                    by_sni
                }
                None => table.lookup(&host).or(table.default.as_ref()),
            }
        } else {
            match table.lookup(&host) {
                Some(t) => Some(t),
                None => {
                    if table.http
                        && let Some(port) = table.redirect(&host)
                    {
                        return redirect(&host, port, &req);
                    }
                    table.default.as_ref()
                }
            }
        };
        match target {
            Some(t) => {
                let proto = if table.tls { "https" } else { "http" };
                forward(req, &t.pool, &self.client, peer, proto).await
            }
            None => text(
                StatusCode::NOT_FOUND,
                format!("no app answers to {host:?} here\n"),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// 308 to the same path on HTTPS (method and body kept).
fn redirect(host: &str, port: u16, req: &Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let mut resp = text(StatusCode::PERMANENT_REDIRECT, format!("{location}\n"));
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A self-signed certificate made at start, for handshakes no group's fits.
fn fallback_certificate() -> Result<Arc<CertifiedKey>> {
    let fail = |e: String| Error::failed("agent", format!("cannot make a TLS key: {e}"));
    let pair = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let params = rcgen::CertificateParams::new(vec!["stretch-default".to_string()])
        .map_err(|e| fail(e.to_string()))?;
    let cert = params.self_signed(&pair).map_err(|e| fail(e.to_string()))?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(pair.serialize_der())
        .map_err(|e| fail(e.to_string()))?;
    certified(vec![cert.der().clone()], key).map_err(fail)
}

/// A chain and its key as rustls signs with them; the key must fit the leaf.
pub fn certified(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> std::result::Result<Arc<CertifiedKey>, String> {
    let provider = crate::net::tls::provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("the key cannot be used: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("the key does not belong to the certificate: {e}"))?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(g: &str) -> GroupKey {
        GroupKey {
            system: "s".into(),
            environment: "e".into(),
            group: g.into(),
        }
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Shop.Example.COM:8443"), "shop.example.com");
        assert_eq!(normalize_host("shop.example.com."), "shop.example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn clashes_name_the_other_group() {
        let (a, b) = (key("a"), key("b"));
        let d = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let shop = d(&["shop.example.com"]);
        let blog = d(&["blog.example.com", "shop.example.com"]);
        let none: Vec<String> = vec![];
        // Same domain on one port.
        let why = clash(
            443,
            &blog,
            true,
            [(&a, 443, shop.as_slice(), true)],
            Some(80),
        )
        .unwrap();
        assert!(
            why.contains("shop.example.com") && why.contains("s/e/a"),
            "{why}"
        );
        // Same domain on another port is fine; so are two domains and a default.
        let beside_shop = |port: u16, domains: &[String]| {
            clash(
                port,
                domains,
                true,
                [(&a, 443, shop.as_slice(), true)],
                Some(80),
            )
        };
        assert!(beside_shop(8443, &blog).is_none());
        assert!(beside_shop(443, &d(&["blog.example.com"])).is_none());
        assert!(beside_shop(443, &none).is_none());
        // Two defaults; HTTPS beside plain; HTTPS on the HTTP port.
        assert!(
            clash(80, &none, false, [(&b, 80, none.as_slice(), false)], None)
                .unwrap()
                .contains("neither has")
        );
        assert!(
            clash(443, &shop, true, [(&b, 443, blog.as_slice(), false)], None)
                .unwrap()
                .contains("all HTTPS")
        );
        assert!(
            clash(80, &shop, true, [], Some(80))
                .unwrap()
                .contains("HTTP port")
        );
    }

    #[test]
    fn lookup_takes_exact_names_then_one_wildcard_label() {
        let pool = Arc::new(Pool::default());
        let t = |g: &str| Target {
            key: key(g),
            pool: pool.clone(),
            cert: None,
        };
        let mut table = Table::default();
        table.hosts.insert("shop.example.com".into(), t("shop"));
        table.hosts.insert("*.example.com".into(), t("any"));
        let g = |n: &str| table.lookup(n).map(|t| t.key.group.clone());
        assert_eq!(g("shop.example.com").as_deref(), Some("shop"));
        assert_eq!(g("blog.example.com").as_deref(), Some("any"));
        assert_eq!(g("a.b.example.com"), None);
        assert_eq!(g("example.com"), None);
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// A certificate for `names`, ready to serve.
    fn served(names: &[&str]) -> (Served, rustls::pki_types::CertificateDer<'static>) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&pair)
                .unwrap();
        let served =
            super::super::certs::served_from_pem(&cert.pem(), &pair.serialize_pem(), "release")
                .unwrap();
        (served, cert.der().clone())
    }

    /// A TLS client trusting exactly `cert`, asking for `name`.
    async fn connect(
        addr: SocketAddr,
        name: &str,
        cert: &rustls::pki_types::CertificateDer<'static>,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(crate::net::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
                tcp,
            )
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_routes_by_name_tunnels_upgrades_and_swaps_certificates() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = super::super::proxy::tests::shouting_upstream().await;
        let pool = Arc::new(Pool::default());
        let instance = super::super::proxy::Upstream::new("a", port);
        pool.replace(vec![instance.clone()]);
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let edge = Edge::new(addr.ip(), None, super::super::proxy::upstream_client()).unwrap();
        let (first, shop_der) = served(&["shop.test"]);
        let shop = CertSlot::new(first);
        edge.set(Route {
            key: key("shop"),
            port: addr.port(),
            domains: vec!["shop.test".into()],
            cert: Some(shop.clone()),
            pool: pool.clone(),
        })
        .await
        .unwrap();
        // The same group moving its port from plain HTTP to HTTPS and back.
        let plain = |cert| Route {
            key: key("flip"),
            port: free_port(),
            domains: vec![],
            cert,
            pool: pool.clone(),
        };
        let flip = plain(None);
        let flip_port = flip.port;
        edge.set(flip.clone()).await.unwrap();
        let flip_addr = SocketAddr::new(addr.ip(), flip_port);
        let (flip_served, flip_der) = served(&["flip.test"]);
        edge.set(Route {
            cert: Some(CertSlot::new(flip_served)),
            ..flip.clone()
        })
        .await
        .unwrap();
        let mut over_tls = connect(flip_addr, "flip.test", &flip_der).await;
        over_tls
            .write_all(b"GET / HTTP/1.0\r\nHost: flip.test\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = over_tls.read_to_end(&mut out).await;
        assert!(
            out.starts_with(b"HTTP/1.0 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        edge.set(flip).await.unwrap();
        let (status, _) = tokio::task::spawn_blocking(move || {
            stretch_test::http_get(&flip_addr.to_string(), "/")
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(status, 200);
        drop(edge.remove(&key("flip")).await);

        // Plain and HTTPS groups cannot share the port; nothing changes.
        let refused = edge
            .set(Route {
                key: key("plain"),
                port: addr.port(),
                domains: vec!["plain.test".into()],
                cert: None,
                pool: pool.clone(),
            })
            .await;
        assert!(refused.is_err());

        // An upgrade through TLS is tunnelled and not counted in flight.
        let mut tls = connect(addr, "shop.test", &shop_der).await;
        tls.write_all(
            b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: shout\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        tls.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        tls.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"HELLO");
        assert_eq!(instance.in_flight(), 0);

        // A renewed certificate is presented to the next handshake; the open tunnel lives on.
        let (renewed, renewed_der) = served(&["shop.test"]);
        shop.set(renewed);
        let mut again = connect(addr, "shop.test", &renewed_der).await;
        again
            .write_all(b"GET / HTTP/1.0\r\nHost: shop.test\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = again.read_to_end(&mut out).await;
        assert!(
            out.starts_with(b"HTTP/1.0 200") || out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        tls.write_all(b"still").await.unwrap();
        tls.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"STILL");
    }

    #[test]
    fn a_key_must_fit_its_certificate() {
        let make = |name: &str| {
            let pair = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .self_signed(&pair)
                .unwrap();
            (
                cert.der().clone(),
                rustls::pki_types::PrivateKeyDer::try_from(pair.serialize_der()).unwrap(),
            )
        };
        let (c1, k1) = make("a");
        let (_, k2) = make("b");
        assert!(certified(vec![c1.clone()], k1).is_ok());
        let why = certified(vec![c1], k2).err().unwrap();
        assert!(why.contains("does not belong"), "{why}");
    }
}
