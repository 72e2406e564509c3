//! The agent's proxy as a host's edge, against real agents, the real Docker engine and
//! Debian's pebble: two systems' apps sharing one HTTPS port by name (certificates
//! from their releases, a key shipped encrypted), HTTP redirects and forwarded headers,
//! unknown names, a domain clash refused, a deploy under HTTPS load, `status`, and
//! ACME certificates issued (real HTTP-01) and renewed under load.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use stretch_core::net::tls::{Expect, PeerCheck};

use super::common::*;
use super::deploy::{TOKEN, World};

/// A test certificate authority.
struct Pki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stretch test CA");
        let ca = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names`: (certificate PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// What an HTTPS GET got: status, body, the presented leaf's fingerprint.
type Got = (u16, String, String);

/// `GET path` over TLS to `addr`, asking for `sni` (none: connect by IP, no SNI),
/// with `Host: host` (default: the SNI), trusting `roots` (PEM; none: anything).
fn https(
    addr: &str,
    sni: Option<&str>,
    host: Option<&str>,
    roots: Option<&str>,
    path: &str,
) -> Result<Got, String> {
    let expect = match roots {
        Some(pem) => {
            let mut store = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                store
                    .add(c.map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
            }
            Expect::Roots(Arc::new(store), Vec::new())
        }
        None => Expect::FirstUse(None),
    };
    let check = PeerCheck::new(expect).map_err(|e| e.to_string())?;
    let config = check.client_config().map_err(|e| e.to_string())?;
    let ip = addr.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(addr);
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).map_err(|e| e.to_string())?,
        None => ServerName::try_from(ip.to_string()).map_err(|e| e.to_string())?,
    };
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let host = host.or(sni).unwrap_or(ip);
    write!(tls, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    if let Err(e) = tls.read_to_end(&mut raw)
        && (raw.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof)
    {
        return Err(e.to_string());
    }
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| stretch_core::net::tls::fingerprint(c.as_ref()))
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(h, b)| {
        // Headers are useful to the redirect checks: keep the Location line.
        let location = h
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("location:"));
        match location {
            Some(l) => format!("{}\n{b}", l.trim()),
            None => b.to_string(),
        }
    });
    Ok((status, body.unwrap_or_default(), leaf))
}

/// Plain `GET path` to `addr` with `Host: host`: status and the Location header.
fn http_host(addr: &str, host: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let location = out
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("location:")
                .then(|| l[9..].trim().to_string())
        })
        .unwrap_or_default();
    (status, location)
}

/// HTTPS GETs on fresh connections until stopped; every failure is kept.
struct HttpsHammer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>, std::collections::BTreeSet<String>)>,
}

impl HttpsHammer {
    fn start(addr: String, sni: &'static str, roots: String) -> HttpsHammer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut n, mut failures, mut leaves) =
                (0u64, Vec::new(), std::collections::BTreeSet::new());
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                match https(&addr, Some(sni), None, Some(&roots), "/index.html") {
                    Ok((200, _, leaf)) => {
                        leaves.insert(leaf);
                    }
                    other => failures.push(format!("{other:?}")),
                }
            }
            (n, failures, leaves)
        });
        HttpsHammer { stop, thread }
    }

    /// Stop; fail the test if a request failed. Returns the requests and the distinct
    /// certificates seen.
    #[track_caller]
    fn finish(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let (n, failures, leaves) = self.thread.join().unwrap();
        assert!(
            failures.is_empty(),
            "{} of {n} HTTPS requests failed, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
        (n, leaves.len())
    }
}

/// A world on one agent that has an HTTP port of its own, its app also answering
/// `/cgi-bin/headers` with the forwarded headers it got.
fn edge_world(prefix: &str, agent_extra: &[&str], agent_env: &[(&str, &str)]) -> (World, u16) {
    let mut w = World::new(prefix, 0, false);
    let http_port = stretch_test::free_port();
    let port = http_port.to_string();
    let mut extra = vec!["--http-port", port.as_str()];
    extra.extend_from_slice(agent_extra);
    w.agents.push(AgentProc::start_with_env(
        &w.ctx.path().join("agent0"),
        TOKEN,
        &w.system,
        &extra,
        agent_env,
    ));
    let script = w.ctx.write(
        "app/www/cgi-bin/headers",
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"proto=$HTTP_X_FORWARDED_PROTO host=$HTTP_X_FORWARDED_HOST for=$HTTP_X_FORWARDED_FOR\"\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (w, http_port)
}

/// The `age` CLI encrypts `clear` to `recipient` into `out` (as a user would ship a key).
fn age_encrypt(dir: &std::path::Path, recipient: &str, clear: &str, out: &str) {
    let mut child = Command::new("age")
        .args(["-r", recipient, "-o", out])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()
        .expect("the age CLI (apt-get install age)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(clear.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn two_systems_share_an_https_port_by_name() {
    let pki = Pki::new();
    let (mut shop, http_port) = edge_world("edgeshop", &[], &[]);
    let agent = shop.agents[0].addr.clone();
    let ip = shop.agents[0].proxy_ip.clone();

    // The shop ships its key encrypted; the build decrypts it with its identity.
    let (cert, key) = pki.leaf(&["shop.test", "www.shop.test"]);
    shop.ctx.write("app/certs/shop.pem", &cert);
    shop.ctx.run(&["keys", "generate", "-o", "build.key"]).ok();
    let identity = std::fs::read_to_string(shop.ctx.path().join("build.key")).unwrap();
    let recipient = identity
        .split_whitespace()
        .find(|w| w.starts_with("age1"))
        .unwrap()
        .to_string();
    age_encrypt(
        &shop.ctx.path().join("app/certs"),
        &recipient,
        &key,
        "shop.key.age",
    );
    shop.ctx.env.push((
        "STRETCH_IDENTITY".into(),
        shop.ctx.path().join("build.key").display().to_string(),
    ));
    shop.write_system(
        "local",
        "domains: [shop.test, WWW.shop.test], tls: {certificate: certs/shop.pem, key: certs/shop.key}",
        "",
    );
    let r1 = shop.build();
    shop.ctx.run(&["deploy", "production"]).ok();
    let addr = format!("{ip}:{}", shop.listen);
    let page = |name: &str| {
        https(&addr, Some(name), None, Some(&pki.ca_pem), "/index.html")
            .unwrap()
            .1
    };

    // The key was never written in clear in the home.
    let key_line = key.lines().nth(1).unwrap().to_string();
    for entry in walkdir::WalkDir::new(shop.ctx.home()).into_iter().flatten() {
        if entry.file_type().is_file() {
            let data = std::fs::read(entry.path()).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&data).contains(&key_line),
                "the TLS key is in clear in {}",
                entry.path().display()
            );
        }
    }

    // A second system on the same agent and port, by name.
    let blog = Ctx::new();
    let (bcert, bkey) = pki.leaf(&["blog.test"]);
    blog.write("app/certs/blog.pem", &bcert);
    blog.write("app/certs/blog.key", &bkey);
    blog.write("token", TOKEN);
    blog.write("app/stretch.yml", "name: web\n");
    blog.write(
        "app/container.yml",
        "port: 8080\nhealth: {path: /index.html, interval: 100ms, timeout: 8s}\nstop_timeout: 2s\n",
    );
    blog.write("app/www/index.html", "the blog\n");
    blog.write(
        "app/Dockerfile",
        format!(
            "{}COPY www/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
            from_base(&shop.system)
        ),
    );
    let blog_system = format!("{}b", shop.system);
    let blog_yml = |domain: &str| {
        format!(
            "system: {blog_system}\nregistry: local\nsources:\n  - path: ./app\nenvironments:\n  production:\n    agent_token_file: ./token\n    hosts:\n      h0: {{agent: {agent}}}\n    groups:\n      web: {{node: web, hosts: [h0], listen: {}, domains: [{domain}], tls: {{certificate: certs/blog.pem, key: certs/blog.key}}}}\n",
            shop.listen
        )
    };
    let _blog_images = image_cleanup(&blog_system);
    blog.write("system.yml", blog_yml("blog.test"));
    blog.run(&["build"]).ok();
    blog.run(&["deploy", "production"]).ok();

    // Each name gets its app and its certificate, checked against the test CA.
    let (status, body, shop_leaf) = https(
        &addr,
        Some("shop.test"),
        None,
        Some(&pki.ca_pem),
        "/index.html",
    )
    .unwrap();
    assert_eq!((status, body.as_str()), (200, shop.body(&r1, 0).as_str()));
    let (status, _, www_leaf) = https(
        &addr,
        Some("www.shop.test"),
        None,
        Some(&pki.ca_pem),
        "/index.html",
    )
    .unwrap();
    assert_eq!((status, &www_leaf), (200, &shop_leaf));
    let got = https(
        &addr,
        Some("blog.test"),
        None,
        Some(&pki.ca_pem),
        "/index.html",
    )
    .unwrap();
    assert_eq!((got.0, got.1.as_str()), (200, "the blog\n"));
    assert_ne!(got.2, shop_leaf);
    // An unknown name, or none: a default certificate, then 404.
    let got = https(&addr, Some("nope.test"), None, None, "/").unwrap();
    assert_eq!(got.0, 404, "{got:?}");
    assert!(
        https(&addr, Some("nope.test"), None, Some(&pki.ca_pem), "/").is_err(),
        "the default certificate is not the CA's"
    );
    assert_eq!(https(&addr, None, None, None, "/").unwrap().0, 404);
    // A request for another app than the handshake's.
    assert_eq!(
        https(
            &addr,
            Some("shop.test"),
            Some("blog.test"),
            Some(&pki.ca_pem),
            "/"
        )
        .unwrap()
        .0,
        421
    );

    // What the app learns of the client.
    let (_, headers, _) = https(
        &addr,
        Some("shop.test"),
        None,
        Some(&pki.ca_pem),
        "/cgi-bin/headers",
    )
    .unwrap();
    assert_eq!(
        headers.trim(),
        "proto=https host=shop.test for=127.0.0.1",
        "{headers}"
    );

    // Plain HTTP on the agent's HTTP port redirects those names to HTTPS.
    let http = format!("{ip}:{http_port}");
    assert_eq!(
        http_host(&http, "shop.test", "/a?b=1"),
        (308, format!("https://shop.test:{}/a?b=1", shop.listen))
    );
    assert_eq!(http_host(&http, "blog.test", "/").0, 308);
    assert_eq!(http_host(&http, "other.test", "/").0, 404);

    // A third system claiming the shop's name on that port is refused and changes nothing.
    let (stolen_cert, stolen_key) = pki.leaf(&["shop.test"]);
    blog.write("app/certs/blog.pem", &stolen_cert);
    blog.write("app/certs/blog.key", &stolen_key);
    blog.write("system.yml", blog_yml("shop.test"));
    blog.run(&["build"]).ok();
    let out = blog.run(&["deploy", "production"]);
    assert_ne!(out.code, 0, "{out}");
    assert!(
        out.stderr.contains(&format!(
            "domain shop.test on port {} is already claimed by group {}/production/web",
            shop.listen, shop.system
        )),
        "{out}"
    );
    assert_eq!(page("shop.test"), shop.body(&r1, 0));
    assert_eq!(page("blog.test"), "the blog\n");
    // Two groups of one system claiming a name: refused when the file is read.
    let good = std::fs::read_to_string(shop.ctx.path().join("system.yml")).unwrap();
    shop.ctx.write(
        "system.yml",
        good.replace(
            "    groups:\n",
            &format!("    groups:\n      api: {{node: web, hosts: [h0], listen: {}, domains: [www.shop.test], tls: {{certificate: certs/shop.pem, key: certs/shop.key}}}}\n", shop.listen),
        ),
    );
    shop.ctx
        .run(&["deploy", "production"])
        .fails(2, &["groups `api` and `web`", "both claim `www.shop.test`"]);
    shop.ctx.write("system.yml", &good);

    // A deploy under HTTPS load drops nothing.
    let hammer = HttpsHammer::start(addr.clone(), "shop.test", pki.ca_pem.clone());
    std::thread::sleep(Duration::from_millis(300));
    let r2 = shop.next_release(2);
    shop.ctx.run(&["deploy", "production"]).ok();
    std::thread::sleep(Duration::from_millis(300));
    let (requests, _) = hammer.finish();
    assert!(requests > 10, "{requests}");
    assert_eq!(page("shop.test"), shop.body(&r2, 0));

    // `status` shows each name with its certificate.
    let out = shop.ctx.run(&["status", "production"]).ok();
    assert!(
        out.stdout.contains(&format!(
            "https://shop.test:{}  certificate from CN=stretch test CA",
            shop.listen
        )),
        "{out}"
    );
    assert!(out.stdout.contains("(release)"), "{out}");
    let json = shop
        .ctx
        .run(&["status", "production", "--json"])
        .ok()
        .json();
    let g = &json["hosts"][0]["groups"][0];
    assert_eq!(
        g["domains"],
        serde_json::json!(["shop.test", "www.shop.test"])
    );
    assert_eq!(
        g["certificate"]["names"],
        serde_json::json!(["shop.test", "www.shop.test"])
    );
    assert!(
        g["certificate"]["not_after"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
}

/// A process killed (and waited for) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's pebble with its fake DNS (`pebble-challtestsrv`) answering every name with
/// `ip`, validating HTTP-01 challenges on `http_port` for real.
struct Pebble {
    directory: String,
    management: String,
    _procs: Vec<Proc>,
}

impl Pebble {
    fn start(dir: &std::path::Path, pki: &Pki, ip: &str, http_port: u16) -> Pebble {
        let (cert, key) = pki.leaf(&["127.0.0.1", "localhost"]);
        write(dir, "pebble/cert.pem", &cert);
        write(dir, "pebble/key.pem", &key);
        let (acme, mgmt, dns, chall) = (
            stretch_test::free_port(),
            stretch_test::free_port(),
            stretch_test::free_port(),
            stretch_test::free_port(),
        );
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": dir.join("pebble/cert.pem"),
            "privateKey": dir.join("pebble/key.pem"),
            "httpPort": http_port,
            "tlsPort": stretch_test::free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        write(dir, "pebble/config.json", config.to_string());
        let log =
            |name: &str| std::fs::File::create(dir.join(format!("pebble/{name}.log"))).unwrap();
        let dns_server = Proc(
            Command::new("pebble-challtestsrv")
                .args([
                    "-defaultIPv4",
                    ip,
                    "-defaultIPv6",
                    "",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                ])
                .args([
                    "-dns01",
                    &format!("127.0.0.1:{dns}"),
                    "-management",
                    &format!("127.0.0.1:{chall}"),
                ])
                .stdout(log("dns"))
                .stderr(log("dns-err"))
                .spawn()
                .expect("pebble-challtestsrv (apt-get install pebble)"),
        );
        let pebble = Proc(
            Command::new("pebble")
                .arg("-config")
                .arg(dir.join("pebble/config.json"))
                .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log("pebble"))
                .stderr(log("pebble-err"))
                .spawn()
                .expect("pebble (apt-get install pebble)"),
        );
        let directory = format!("https://127.0.0.1:{acme}/dir");
        let management = format!("127.0.0.1:{mgmt}");
        let end = Instant::now() + Duration::from_secs(20);
        while https(
            &format!("127.0.0.1:{acme}"),
            None,
            None,
            Some(&pki.ca_pem),
            "/dir",
        )
        .is_err()
        {
            assert!(Instant::now() < end, "pebble did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Pebble {
            directory,
            management,
            _procs: vec![dns_server, pebble],
        }
    }

    /// Pebble's root certificate (made at its start), PEM.
    fn root(&self, pki: &Pki) -> String {
        let (status, body, _) =
            https(&self.management, None, None, Some(&pki.ca_pem), "/roots/0").unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }
}

#[test]
fn acme_certificates_come_from_pebble_and_renew_under_load() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &pki.ca_pem);
    // Renewal is due at once and looked for every 2 s: each check renews.
    let ca = ca_file.display().to_string();
    let (w, http_port) = edge_world(
        "edgeacme",
        &["--acme-renew-before", "100000d", "--acme-check-every", "2s"],
        &[("SSL_CERT_FILE", ca.as_str())],
    );
    let ip = w.agents[0].proxy_ip.clone();
    let pebble = Pebble::start(dir.path(), &pki, &ip, http_port);
    w.write_system(
        "local",
        &format!(
            "domains: [shop.test], tls: {{acme: {{email: ops@shop.test, directory: \"{}\"}}}}",
            pebble.directory
        ),
        "",
    );
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    let root = pebble.root(&pki);
    let addr = format!("{ip}:{}", w.listen);
    let (status, body, first) =
        https(&addr, Some("shop.test"), None, Some(&root), "/index.html").unwrap();
    assert_eq!((status, body), (200, w.body(&r1, 0)));
    let log = w.agents[0].log();
    assert!(
        log.contains("acme: certificate for shop.test from CN=Pebble Intermediate CA"),
        "{log}"
    );

    // Kept owner-only in the agent's data dir.
    use std::os::unix::fs::PermissionsExt;
    let acme_dir = w.agents[0].data_dir.join("acme");
    let keys: Vec<_> = std::fs::read_dir(&acme_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".key"))
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0].metadata().unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Renewed while serving: a new certificate, no request dropped.
    let hammer = HttpsHammer::start(addr.clone(), "shop.test", root.clone());
    let end = Instant::now() + Duration::from_secs(60);
    while w.agents[0].log().matches("acme: renewed shop.test").count() < 2 {
        assert!(Instant::now() < end, "no renewal:\n{}", w.agents[0].log());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (requests, certificates) = hammer.finish();
    assert!(
        requests > 10 && certificates >= 2,
        "{requests} requests saw {certificates} certificates"
    );
    let (_, _, now) = https(&addr, Some("shop.test"), None, Some(&root), "/index.html").unwrap();
    assert_ne!(now, first);

    // The HTTP port redirects; `status` names the issuer.
    assert_eq!(
        http_host(&format!("{ip}:{http_port}"), "shop.test", "/").0,
        308
    );
    let out = w.ctx.run(&["status", "production"]).ok();
    assert!(
        out.stdout
            .contains("certificate from CN=Pebble Intermediate CA")
            && out.stdout.contains("(acme)"),
        "{out}"
    );
}
