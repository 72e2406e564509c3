//! Benchmark of the agent's edge as an HTTPS terminator, side by side in one run with
//! the upstream reached directly (plain HTTP, as a container's published port) and with
//! Debian's nginx terminating TLS in front of the same upstream (skipped when `nginx` is
//! not installed).
//!
//! The upstream is a small keep-alive HTTP/1.1 server in this process (13-byte body),
//! so that what is measured is the proxy, not the app. For each target: requests per
//! second with 16 keep-alive connections, median and p99 latency of one keep-alive
//! connection's sequential requests (the added latency), and requests per second with
//! a new connection (full TLS handshake, no resumption) per request.
//!
//! Run: `cargo bench -p stretch-core --bench edge` (STRETCH_BENCH_SECS per mode, default 5).

// A benchmark panics loudly on any failure; that is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use stretch_core::agent::api::GroupKey;
use stretch_core::agent::server::edge::{CertSlot, Edge, Route};
use stretch_core::agent::server::proxy::{Pool, Upstream, upstream_client};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const BODY: &[u8] = b"hello, world\n";
const NAME: &str = "shop.test";

fn main() {
    let secs: u64 = std::env::var("STRETCH_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let window = Duration::from_secs(secs);
    let dir = tempfile::tempdir().unwrap();

    // The certificate, also written for nginx.
    let pair = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![NAME.to_string()])
        .unwrap()
        .self_signed(&pair)
        .unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), pair.serialize_pem()).unwrap();

    // Upstream: 1 worker, like a small app.
    let upstream_rt = runtime(1);
    let upstream = upstream_rt.block_on(serve_upstream());

    // The edge: 2 workers, as the agent runs on this 2-core machine.
    let edge_rt = runtime(2);
    let edge_port = free_port();
    let _edge = edge_rt.block_on(async {
        let pool = Arc::new(Pool::default());
        pool.replace(vec![Upstream::new("bench", upstream.port())]);
        let edge = Edge::new("127.0.0.1".parse().unwrap(), None, upstream_client()).unwrap();
        let served = stretch_core::agent::server::certs::served_from_pem(
            &cert.pem(),
            &pair.serialize_pem(),
            "release",
        )
        .unwrap();
        edge.set(Route {
            key: GroupKey {
                system: "bench".into(),
                environment: "bench".into(),
                group: "web".into(),
            },
            port: edge_port,
            domains: vec![NAME.into()],
            cert: Some(CertSlot::new(served)),
            pool,
        })
        .await
        .unwrap();
        edge
    });

    let nginx = Nginx::start(dir.path(), upstream.port());

    let client_rt = runtime(2);
    let tls = Arc::new(client_config(cert.der().clone()));
    let mut targets: Vec<(&str, SocketAddr, bool)> = vec![
        ("upstream directly (HTTP)", upstream, false),
        ("stretch edge (HTTPS)", addr(edge_port), true),
    ];
    if let Some(n) = &nginx {
        targets.push(("nginx 1.22 (HTTPS)", addr(n.port), true));
    }
    println!(
        "{:<26} {:>14} {:>12} {:>12} {:>16}",
        "target", "keep-alive rps", "p50 (1 conn)", "p99 (1 conn)", "new-conn rps"
    );
    for (label, target, https) in &targets {
        let tls = https.then(|| tls.clone());
        let (rps, p50, p99, fresh) = client_rt.block_on(async {
            // Warm up (connections, caches).
            keep_alive(*target, tls.clone(), 4, Duration::from_millis(500)).await;
            let (n, _) = keep_alive(*target, tls.clone(), 16, window).await;
            let (_, mut lat) = keep_alive(*target, tls.clone(), 1, window / 2).await;
            lat.sort();
            let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
            let fresh = new_connections(*target, tls.clone(), 16, window).await;
            (
                n as f64 / window.as_secs_f64(),
                p(0.5),
                p(0.99),
                fresh as f64 / window.as_secs_f64(),
            )
        });
        println!(
            "{label:<26} {rps:>14.0} {:>10.0}µs {:>10.0}µs {fresh:>16.0}",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    if nginx.is_none() {
        println!("(nginx not installed: `apt-get install nginx-light` for the reference)");
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn serve_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn client_config(cert: rustls::pki_types::CertificateDer<'static>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Every new connection pays a full handshake.
    config.resumption = rustls::client::Resumption::disabled();
    config
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(target: SocketAddr, tls: Option<&Arc<rustls::ClientConfig>>) -> Box<dyn Io> {
    let tcp = TcpStream::connect(target).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(NAME).unwrap();
            Box::new(
                tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .unwrap(),
            )
        }
        None => Box::new(tcp),
    }
}

/// One request on `io`; reads the response (Content-Length bodies only). Whether the
/// server said it closes the connection.
async fn get(io: &mut Box<dyn Io>, buf: &mut Vec<u8>, close: bool) -> bool {
    let req: &[u8] = if close {
        b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n"
    };
    io.write_all(req).await.unwrap();
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed early: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if buf.len() >= end + 4 + len {
                return head.contains("connection: close");
            }
        }
    }
}

/// `conns` connections each sending requests back to back for `window`: the count,
/// and every request's latency.
async fn keep_alive(
    target: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    conns: usize,
    window: Duration,
) -> (u64, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let stop = stop.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut io = connect(target, tls.as_ref()).await;
                let mut buf = Vec::with_capacity(4096);
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let closing = get(&mut io, &mut buf, false).await;
                    lat.push(t.elapsed());
                    if closing {
                        io = connect(target, tls.as_ref()).await;
                    }
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all.len() as u64, all)
}

/// `conns` workers each opening a new connection per request for `window`.
async fn new_connections(
    target: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    conns: usize,
    window: Duration,
) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let stop = stop.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut buf = Vec::with_capacity(4096);
                while !stop.load(Ordering::Relaxed) {
                    let mut io = connect(target, tls.as_ref()).await;
                    get(&mut io, &mut buf, true).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// nginx terminating TLS for the same upstream, 2 workers, upstream keep-alive.
struct Nginx {
    port: u16,
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Nginx {
    fn start(dir: &std::path::Path, upstream: u16) -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    server_name {NAME};\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Proto https; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr(port)).is_err() {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Nginx {
            port,
            child,
            log: dir.join("error.log"),
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM, not KILL: the master then stops its workers too.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        for line in log.lines().filter(|l| !l.contains("[notice]")).take(40) {
            eprintln!("nginx: {line}");
        }
    }
}
