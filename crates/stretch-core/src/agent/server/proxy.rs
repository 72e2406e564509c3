//! A group's reverse proxy: round-robin over the group's healthy instances, which are
//! only ever reached at `127.0.0.1:HOST_PORT` (the published port), never at a
//! container's own address. The listeners and the routing of names to groups are
//! `edge.rs`'s.
//!
//! Zero downtime rests on three things:
//! * the upstream set is swapped atomically ([`Pool::replace`]): a request picks its
//!   instance and counts itself in flight under one read lock, so once the swap
//!   returns no request can pick an old instance, and every one that did is counted;
//! * [`drain`] waits until the old instances have no request in flight (a request
//!   ends when its response body has been read to the end) before they are stopped;
//! * a request that could not reach an instance (nothing was sent, or an idempotent
//!   request whose connection failed) is retried on another instance.
//!
//! Upstream connections are pooled and kept alive; TCP_NODELAY on both sides.
//!
//! Listeners are bounded (`Limits::PROXY`: a connection cap, header-read and idle
//! times), and an instance that does not start its answer within the group's
//! `response_timeout` (default 60 s) gets the client a 504.
//!
//! Upgrades (WebSocket) are tunnelled once the instance answers 101. A tunnel is not
//! counted in flight: a drain does not wait for long-lived sockets, and stopping the
//! old instance (SIGTERM first) ends them, so clients reconnect to the new release.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

/// Request bodies up to this size are buffered so that the request can be retried on
/// another instance; larger or unsized ones are streamed (and not retried).
const BUFFER_LIMIT: u64 = 1024 * 1024;

/// Health checks that fail in a row before an instance leaves the rotation.
const UNHEALTHY_AFTER: u32 = 2;

pub type ReqBody = Either<Full<Bytes>, Incoming>;
pub type RespBody = Either<Tracked, Full<Bytes>>;
pub type UpstreamClient = Client<HttpConnector, ReqBody>;

/// The client the proxies share: pooled keep-alive connections to instances.
pub fn upstream_client() -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(32)
        .build(connector)
}

/// One instance as the proxy sees it.
#[derive(Debug)]
pub struct Upstream {
    pub container: String,
    pub port: u16,
    healthy: AtomicBool,
    failures: AtomicU32,
    in_flight: AtomicUsize,
}

impl Upstream {
    /// A new upstream, healthy (it was checked before it joins a set).
    pub fn new(container: &str, port: u16) -> Arc<Upstream> {
        Arc::new(Upstream {
            container: container.to_string(),
            port,
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// A new upstream that gets traffic only once a health check passed.
    pub fn unchecked(container: &str, port: u16) -> Arc<Upstream> {
        let u = Upstream::new(container, port);
        u.healthy.store(false, Ordering::Relaxed);
        u.failures.store(UNHEALTHY_AFTER, Ordering::Relaxed);
        u
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Record a health check; returns the new health when it changed.
    pub fn report(&self, ok: bool) -> Option<bool> {
        let was = self.healthy();
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            self.healthy.store(true, Ordering::Relaxed);
        } else if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= UNHEALTHY_AFTER {
            self.healthy.store(false, Ordering::Relaxed);
        }
        let now = self.healthy();
        (now != was).then_some(now)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Counts a request in flight on an upstream until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long an instance may take to start its answer, unless the group says.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// A group's current upstream set.
#[derive(Debug, Default)]
pub struct Pool {
    set: RwLock<Arc<Vec<Arc<Upstream>>>>,
    next: AtomicUsize,
    /// The group's response timeout in ms (0: the default).
    response_timeout_ms: AtomicU64,
}

impl Pool {
    /// Set the response timeout from the group's spec.
    pub fn set_response_timeout(&self, ms: Option<u64>) {
        self.response_timeout_ms
            .store(ms.unwrap_or(0), Ordering::Relaxed);
    }

    fn response_timeout(&self) -> Duration {
        match self.response_timeout_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_RESPONSE_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
    }

    pub fn current(&self) -> Arc<Vec<Arc<Upstream>>> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swap in a new set; returns the old one. After this returns, no request picks an
    /// old upstream, and every request that did is counted in its `in_flight`.
    pub fn replace(&self, set: Vec<Arc<Upstream>>) -> Arc<Vec<Arc<Upstream>>> {
        let mut guard = self.set.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *guard, Arc::new(set))
    }

    /// Point `container`'s upstream at `port` (the engine restarted the container and
    /// published it elsewhere): an unchecked upstream replaces it in the current set,
    /// under the write lock so that a concurrent switch is never undone.
    pub fn repoint(&self, container: &str, port: u16) -> bool {
        let mut guard = self.set.write().unwrap_or_else(|e| e.into_inner());
        let Some(i) = guard.iter().position(|u| u.container == container) else {
            return false;
        };
        let mut set: Vec<Arc<Upstream>> = guard.iter().cloned().collect();
        set[i] = Upstream::unchecked(container, port);
        *guard = Arc::new(set);
        true
    }

    /// The next healthy upstream (round-robin), preferring ones not in `tried`.
    fn pick(&self, tried: &[u16]) -> Option<(u16, InFlight)> {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner());
        let n = set.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let healthy = |u: &&Arc<Upstream>| u.healthy();
        let ring = || (0..n).map(|i| &set[(start + i) % n]);
        let chosen = ring()
            .filter(healthy)
            .find(|u| !tried.contains(&u.port))
            .or_else(|| ring().find(healthy))?;
        // Counted while the read lock is held: see `replace`.
        chosen.in_flight.fetch_add(1, Ordering::AcqRel);
        Some((chosen.port, InFlight(chosen.clone())))
    }
}

/// Wait until no request is in flight on `old`, at most `bound`. Returns whether they
/// drained.
pub async fn drain(old: &[Arc<Upstream>], bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if old.iter().all(|u| u.in_flight() == 0) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Headers that belong to one connection, not to the request or response.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // hyper frames bodies itself (chunked or sized).
    headers.remove(header::TRANSFER_ENCODING);
}

/// The protocol a request asks to switch to (`Connection: upgrade` plus `Upgrade`).
fn upgrade_wanted(headers: &HeaderMap) -> Option<HeaderValue> {
    let listed = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    listed.then(|| headers.get(header::UPGRADE).cloned())?
}

/// Copy bytes both ways between the client's and the instance's upgraded connections.
async fn tunnel(client: OnUpgrade, instance: OnUpgrade) {
    if let (Ok(c), Ok(i)) = tokio::join!(client, instance) {
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(i)).await;
    }
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn plain(status: StatusCode, text: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Send `req` (which came in over `proto`, `http` or `https`) to one of `pool`'s
/// instances; the instance learns the client's address, scheme and host name from
/// `X-Forwarded-For`, `-Proto` and `-Host`.
pub async fn forward(
    mut req: Request<Incoming>,
    pool: &Pool,
    client: &UpstreamClient,
    peer: SocketAddr,
    proto: &'static str,
) -> Response<RespBody> {
    let protocol = upgrade_wanted(req.headers());
    let mut client_upgrade = protocol.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    strip_hop_by_hop(&mut parts.headers);
    if let Some(p) = &protocol {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, p.clone());
    }
    let forwarded = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        parts.headers.insert("x-forwarded-for", v);
    }
    // This proxy is the edge: what the client said, not what a client claims others said.
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static(proto));
    match parts.headers.get(header::HOST).cloned() {
        Some(host) => {
            parts.headers.insert("x-forwarded-host", host);
        }
        None => {
            parts.headers.remove("x-forwarded-host");
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());

    // A body we hold in memory can be sent again; a streamed one cannot.
    let size = body.size_hint().exact();
    let mut streamed = None;
    let buffered = if body.is_end_stream() {
        Some(Bytes::new())
    } else if !chunked && size.is_some_and(|s| s <= BUFFER_LIMIT) {
        match body.collect().await {
            Ok(b) => Some(b.to_bytes()),
            Err(_) => return plain(StatusCode::BAD_REQUEST, "request body could not be read\n"),
        }
    } else {
        streamed = Some(body);
        None
    };
    let retry_any_error = idempotent(&parts.method);

    let mut tried: Vec<u16> = Vec::new();
    loop {
        let Some((port, guard)) = pool.pick(&tried) else {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy instance\n");
        };
        let Ok(uri) = Uri::try_from(format!("http://127.0.0.1:{port}{path}")) else {
            return plain(StatusCode::BAD_REQUEST, "bad request target\n");
        };
        let body = match (&buffered, streamed.take()) {
            (Some(b), _) => Either::Left(Full::new(b.clone())),
            (None, Some(s)) => Either::Right(s),
            (None, None) => return plain(StatusCode::BAD_GATEWAY, "upstream failed\n"),
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.headers_mut() = parts.headers.clone();
        let answer =
            match tokio::time::timeout(pool.response_timeout(), client.request(upstream)).await {
                Ok(a) => a,
                Err(_) => {
                    drop(guard);
                    return plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n");
                }
            };
        match answer {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let Some(client_side) = client_upgrade.take() else {
                        return plain(StatusCode::BAD_GATEWAY, "unexpected protocol switch\n");
                    };
                    tokio::spawn(tunnel(client_side, hyper::upgrade::on(&mut resp)));
                    let switched = resp.headers().get(header::UPGRADE).cloned();
                    let (mut rparts, _) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    rparts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    if let Some(p) = switched {
                        rparts.headers.insert(header::UPGRADE, p);
                    }
                    drop(guard);
                    return Response::from_parts(rparts, Either::Right(Full::new(Bytes::new())));
                }
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                return Response::from_parts(
                    rparts,
                    Either::Left(Tracked {
                        inner: rbody,
                        _guard: guard,
                    }),
                );
            }
            Err(e) => {
                drop(guard);
                tried.push(port);
                let again = buffered.is_some()
                    && (e.is_connect() || retry_any_error)
                    && tried.len() < 3.max(pool.current().len() + 1);
                if !again {
                    return plain(StatusCode::BAD_GATEWAY, "upstream failed\n");
                }
            }
        }
    }
}

/// An upstream response body that keeps its request counted in flight until it has
/// been read to the end (or dropped).
pub struct Tracked {
    inner: Incoming,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::convert::Infallible;

    use tokio::net::TcpListener;

    use super::super::edge::{Edge, Route};
    use super::*;
    use crate::agent::api::GroupKey;

    fn test_key() -> GroupKey {
        GroupKey {
            system: "s".into(),
            environment: "e".into(),
            group: "g".into(),
        }
    }

    /// An edge serving `pool` as the default group of a free port.
    async fn serve_pool(pool: Arc<Pool>) -> (Edge, SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let edge = Edge::new(addr.ip(), None, upstream_client()).unwrap();
        edge.set(Route {
            key: test_key(),
            port: addr.port(),
            domains: vec![],
            cert: None,
            pool,
        })
        .await
        .unwrap();
        (edge, addr)
    }

    #[test]
    fn pick_round_robins_over_healthy_and_counts() {
        let pool = Pool::default();
        assert!(pool.pick(&[]).is_none());
        let a = Upstream::new("a", 1);
        let b = Upstream::new("b", 2);
        pool.replace(vec![a.clone(), b.clone()]);
        let (p1, g1) = pool.pick(&[]).unwrap();
        let (p2, g2) = pool.pick(&[]).unwrap();
        assert_ne!(p1, p2);
        assert_eq!((a.in_flight(), b.in_flight()), (1, 1));
        drop((g1, g2));
        assert_eq!((a.in_flight(), b.in_flight()), (0, 0));

        // One failed check keeps it; two in a row take it out; one success brings it back.
        assert_eq!(b.report(false), None);
        assert_eq!(b.report(false), Some(false));
        for _ in 0..4 {
            assert_eq!(pool.pick(&[]).unwrap().0, 1);
        }
        assert_eq!(
            pool.pick(&[1]).unwrap().0,
            1,
            "tried ones are used when nothing else is"
        );
        assert_eq!(b.report(true), Some(true));

        // A restarted container on another port: unchecked until a check passes.
        assert!(pool.repoint("b", 22));
        assert!(!pool.repoint("zz", 1));
        for _ in 0..4 {
            assert_eq!(pool.pick(&[]).unwrap().0, 1);
        }
        let moved = pool.current()[1].clone();
        assert_eq!((moved.port, moved.healthy()), (22, false));
        assert_eq!(moved.report(true), Some(true));
        assert!((0..4).any(|_| pool.pick(&[]).unwrap().0 == 22));

        let old = pool.replace(vec![Upstream::new("c", 3)]);
        assert_eq!(old.len(), 2);
        assert_eq!(pool.pick(&[]).unwrap().0, 3);
    }

    #[tokio::test]
    async fn drain_waits_for_requests_in_flight() {
        let pool = Pool::default();
        let a = Upstream::new("a", 1);
        pool.replace(vec![a.clone()]);
        let (_, guard) = pool.pick(&[]).unwrap();
        let old = pool.replace(vec![]);
        assert!(!drain(&old, Duration::from_millis(30)).await);
        let waiter = tokio::spawn(async move { drain(&old, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(guard);
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    /// An upstream on 127.0.0.1 that answers `body` to anything and closes each
    /// connection (as busybox httpd does).
    async fn upstream(body: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            body.as_bytes(),
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        port
    }

    /// An upstream that switches `Upgrade: shout` requests to a protocol answering each
    /// read in upper case, and answers `plain` to anything else.
    pub(crate) async fn shouting_upstream() -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                            if req.headers().get(header::UPGRADE).map(|v| v.as_bytes())
                                != Some(b"shout")
                            {
                                return Ok::<_, Infallible>(Response::new(Full::new(
                                    Bytes::from_static(b"plain"),
                                )));
                            }
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(on.await.unwrap());
                                let mut buf = [0u8; 64];
                                while let Ok(n @ 1..) = io.read(&mut buf).await {
                                    io.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap();
                                }
                            });
                            let mut resp = Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            resp.headers_mut()
                                .insert(header::UPGRADE, HeaderValue::from_static("shout"));
                            resp.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                            Ok(resp)
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        port
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upgrades_are_tunnelled_and_do_not_hold_a_drain() {
        let port = shouting_upstream().await;
        let pool = Arc::new(Pool::default());
        let instance = Upstream::new("a", port);
        pool.replace(vec![instance.clone()]);
        let (_edge, addr) = serve_pool(pool.clone()).await;
        let talk = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: shout\r\n\r\n")
                .unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
            s.write_all(b"hello").unwrap();
            let mut echoed = [0u8; 5];
            s.read_exact(&mut echoed).unwrap();
            (head, echoed, s)
        });
        let (head, echoed, stream) = talk.await.unwrap();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(
            head.contains("upgrade: shout") && head.contains("connection: upgrade"),
            "{head}"
        );
        assert_eq!(&echoed, b"HELLO");
        // The open tunnel is not in flight: switching away drains at once.
        assert_eq!(instance.in_flight(), 0);
        let old = pool.replace(vec![]);
        assert!(drain(&old, Duration::from_millis(100)).await);
        drop(stream);

        // A plain request on the same proxy is still plainly forwarded.
        pool.replace(vec![instance]);
        let (status, body) = stretch_test::http_get(&addr.to_string(), "/").unwrap();
        assert_eq!((status, body.as_str()), (200, "plain"));
    }

    /// Median time of `n` GETs with a fresh connection each (HTTP/1.0).
    fn median_get(addr: SocketAddr, n: usize) -> Duration {
        use std::io::{Read, Write};
        let mut times: Vec<Duration> = (0..n)
            .map(|_| {
                let t = Instant::now();
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                assert!(out.starts_with(b"HTTP/1.0 200") || out.starts_with(b"HTTP/1.1 200"));
                t.elapsed()
            })
            .collect();
        times.sort();
        times[n / 2]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxy_forwards_then_answers_503_and_closes() {
        let port = upstream("hello").await;
        let pool = Arc::new(Pool::default());
        pool.replace(vec![Upstream::new("a", port)]);
        let (edge, addr) = serve_pool(pool.clone()).await;
        let direct = SocketAddr::from(([127, 0, 0, 1], port));
        let (d, p) = tokio::task::spawn_blocking(move || {
            median_get(direct, 50);
            median_get(addr, 50);
            (median_get(direct, 200), median_get(addr, 200))
        })
        .await
        .unwrap();
        eprintln!("median GET: direct {d:?}, through the proxy {p:?}");

        // No healthy instance: 503, and the proxy closes when dropped.
        pool.replace(vec![]);
        let (status, _) = stretch_test::http_get(&addr.to_string(), "/").unwrap();
        assert_eq!(status, 503);
        drop(edge.remove(&test_key()).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(std::net::TcpStream::connect(addr).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instance_that_does_not_answer_gets_a_504() {
        // An upstream that accepts and reads but never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let pool = Arc::new(Pool::default());
        pool.replace(vec![Upstream::new("a", port)]);
        pool.set_response_timeout(Some(300));
        let (_edge, addr) = serve_pool(pool.clone()).await;
        let (status, body) =
            tokio::task::spawn_blocking(move || stretch_test::http_get(&addr.to_string(), "/"))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(status, 504, "{body}");
        assert_eq!(pool.response_timeout(), Duration::from_millis(300));
        pool.set_response_timeout(None);
        assert_eq!(pool.response_timeout(), DEFAULT_RESPONSE_TIMEOUT);
    }
}
