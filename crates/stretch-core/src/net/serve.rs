//! HTTP/1.1 serving that survives hostile clients, for the agent's API, its group
//! proxies and `stretch serve`: a cap on concurrent connections (past it, new ones are
//! closed at once), a TLS handshake bound, a header-read bound (a client trickling its
//! request head one byte a second is cut), and an idle bound (a connection with no
//! request in flight and no byte moving is closed). Each connection runs in its own
//! task, so a slow one never delays another.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's address: an extension of every request [`axum_service`] serves.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// An axum router as the service of one connection from `peer`.
pub fn axum_service(
    router: axum::Router,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<axum::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<axum::body::Body>, std::convert::Infallible>>
             + Send
             + 'static,
> + Send
+ 'static {
    let service = hyper_util::service::TowerToHyperService::new(router);
    hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(Peer(peer));
        hyper::service::Service::call(&service, req)
    })
}

/// The server name a TLS client asked for (SNI): an extension of each request of a
/// TLS connection whose client sent one.
#[derive(Debug, Clone)]
pub struct Sni(pub Arc<str>);

/// Bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Time for a TLS handshake.
    pub handshake: Duration,
    /// Time from a connection's start (or a request's first byte) to its full head.
    pub header_read: Duration,
    /// Time a connection may sit with no request in flight and no byte moving.
    pub idle: Duration,
}

impl Limits {
    /// The agent's API: few legitimate clients (controllers), generous request times.
    pub const AGENT_API: Limits = Limits {
        max_connections: 1024,
        handshake: Duration::from_secs(10),
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(90),
    };
    /// A group proxy: the public edge of an app.
    pub const PROXY: Limits = Limits {
        max_connections: 4096,
        handshake: Duration::from_secs(10),
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };
    /// `stretch serve`: browsers and the CLI.
    pub const SERVER: Limits = Limits {
        max_connections: 512,
        handshake: Duration::from_secs(10),
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };
}

/// How long [`serve`] waits, after shutdown, for connections to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serve connections of `listener` until `shutdown` completes; `make` gives the
/// service for a connection from `peer`. With `tls`, every connection is TLS.
pub async fn serve<F, S, B>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    make: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            // E.g. out of file descriptors: wait a little instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = make(peer);
        let tls = tls.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            connection(stream, tls, limits, service, stopped).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while slots.available_permits() < limits.max_connections && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connection<S, B>(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    service: S,
    stopped: watch::Receiver<bool>,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new());
    let io = Watched {
        inner: stream,
        activity: activity.clone(),
    };
    let tracking = |sni: Option<Arc<str>>| Tracking {
        inner: service,
        activity: activity.clone(),
        sni,
    };
    match tls {
        Some(acceptor) => {
            let Ok(Ok(stream)) = tokio::time::timeout(limits.handshake, acceptor.accept(io)).await
            else {
                return;
            };
            let sni = stream.get_ref().1.server_name().map(Arc::from);
            let service = tracking(sni);
            drive(TokioIo::new(stream), service, limits, activity, stopped).await;
        }
        None => {
            let service = tracking(None);
            drive(TokioIo::new(io), service, limits, activity, stopped).await
        }
    }
}

async fn drive<I, S, B>(
    io: I,
    service: Tracking<S>,
    limits: Limits,
    activity: Arc<Activity>,
    mut stopped: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let tick = (limits.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            () = tokio::time::sleep(tick), if !closing => {
                if activity.idle_for() >= limits.idle {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = stopped.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are in flight.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Zero while a request is in flight; else the time since the last byte.
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A stream that notes each byte moved.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A service that counts its requests in flight until their response bodies end.
struct Tracking<S> {
    inner: S,
    activity: Arc<Activity>,
    sni: Option<Arc<str>>,
}

struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracking<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Unpin,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(name) = &self.sni {
            req.extensions_mut().insert(Sni(name.clone()));
        }
        let guard = InFlight::new(self.activity.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| TrackedBody {
                inner,
                guard: Some(guard),
            }))
        })
    }
}

/// A response body that keeps its request counted as in flight until it ends.
pub struct TrackedBody<B> {
    inner: B,
    guard: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            self.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn hello_server(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            None,
            limits,
            |_peer| {
                hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hi"))))
                })
            },
            async {
                let _ = rx.await;
            },
        ));
        (addr, tx)
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    const QUICK: Limits = Limits {
        max_connections: 8,
        handshake: Duration::from_secs(1),
        header_read: Duration::from_millis(300),
        idle: Duration::from_millis(300),
    };

    #[tokio::test]
    async fn a_trickled_head_is_cut_and_others_are_served() {
        let (addr, _stop) = hello_server(QUICK).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HT").await.unwrap();
        assert!(get(addr).await.ends_with("hi"));
        // Keep trickling: the head never completes within the bound.
        let mut closed = false;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b"T").await.is_err() {
                closed = true;
                break;
            }
        }
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(2), slow.read(&mut buf))
            .await
            .expect("the server cut the connection")
            .unwrap_or(0);
        assert!(closed || n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"));
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (addr, _stop) = hello_server(QUICK).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut buf))
            .await
            .expect("an idle connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_then_slots_free_up() {
        let (addr, _stop) = hello_server(QUICK).await;
        let mut held = Vec::new();
        for _ in 0..QUICK.max_connections {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(1), extra.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // The held ones time out; then the listener serves again.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(get(addr).await.ends_with("hi"));
    }
}
