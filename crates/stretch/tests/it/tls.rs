//! Agents over TLS, tested as an attacker would: a relay recording every byte between
//! controller and agent, pinned and replaced keys, an operator's CA, an answer lost
//! mid-switch, and hundreds of slow connections held against the listeners.

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::*;
use super::deploy::{TOKEN, World};

/// A TCP relay to `target` that records every byte both ways, and can cut a
/// connection instead of passing on the agent's next answer.
struct Relay {
    addr: String,
    recorded: Arc<Mutex<Vec<u8>>>,
    cut_next_answer: Arc<AtomicBool>,
    cuts: Arc<Mutex<usize>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap().to_string(),
            recorded: Arc::default(),
            cut_next_answer: Arc::default(),
            cuts: Arc::default(),
            stop: Arc::default(),
        };
        let (target, recorded, cut, cuts, stop) = (
            target.to_string(),
            relay.recorded.clone(),
            relay.cut_next_answer.clone(),
            relay.cuts.clone(),
            relay.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(agent) = TcpStream::connect(&target) else {
                    continue;
                };
                let pump = |from: TcpStream, to: TcpStream, answers: bool| {
                    let (recorded, cut, cuts) = (recorded.clone(), cut.clone(), cuts.clone());
                    std::thread::spawn(move || {
                        let (mut from, mut to) = (from, to);
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if answers && cut.swap(false, Ordering::SeqCst) {
                                *cuts.lock().unwrap() += 1;
                                break;
                            }
                            recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                };
                pump(
                    client.try_clone().unwrap(),
                    agent.try_clone().unwrap(),
                    false,
                );
                pump(agent, client, true);
            }
        });
        relay
    }

    fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Point host `h{i}` of the world's system.yml at `addr` (and its extra keys).
fn retarget(w: &World, i: usize, addr: &str, extra: &str) {
    let path = w.ctx.path().join("system.yml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("h{i}: {{agent: {}}}", w.agents[i].addr),
        &format!("h{i}: {{agent: \"{addr}\"{extra}}}"),
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn the_wire_carries_neither_token_nor_secrets() {
    let w = World::new("wire", 1, false);
    let secret = "s3cr3t-pa55word-on-the-wire";
    let keygen = w.ctx.run(&["keys", "generate", "-o", "key.txt"]).ok();
    let recipient = keygen
        .stdout
        .lines()
        .chain(keygen.stderr.lines())
        .find_map(|l| l.strip_prefix("Public key: "))
        .unwrap()
        .to_string();
    w.ctx
        .write("app/secrets.yml", format!("db_password: {secret}\n"));
    w.ctx
        .run(&[
            "secrets",
            "encrypt",
            "app/secrets.yml",
            "-r",
            recipient.trim(),
        ])
        .ok();
    w.ctx.write(
        "app/config.yml",
        "greeting: \"{{ services.greeting }}\"\npassword: !secret db_password\n",
    );
    let relay = Relay::start(&w.agents[0].addr);
    retarget(&w, 0, &relay.addr, "");

    let build = |v: u32| {
        w.ctx.write("app/www/version.txt", format!("{v}\n"));
        w.ctx.run(&["build", "-i", "key.txt", "--json"]).ok().json()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let r1 = build(1);
    let first = w.ctx.run(&["deploy", "production"]).ok();
    assert!(first.stderr.contains("first contact"), "{first}");
    let r2 = build(2);
    w.ctx.run(&["deploy", "production", &r2]).ok();
    w.ctx.run(&["rollback", "production"]).ok();
    w.assert_serving(&r1);
    let text = std::fs::read_to_string(w.ctx.path().join("system.yml"))
        .unwrap()
        .replace("greeting: hello", "greeting: howdy");
    w.ctx.write("system.yml", text);
    w.ctx.run(&["apply", "production"]).ok();
    w.ctx.run(&["status", "production"]).ok();

    // The secret did cross: the agent wrote it into the instance's configuration.
    let instances = w.agents[0].data_dir.join("instances");
    let mut seen = false;
    for e in std::fs::read_dir(&instances).unwrap() {
        let config = std::fs::read_to_string(e.unwrap().path().join("config.json"));
        seen |= config.is_ok_and(|c| c.contains(secret));
    }
    assert!(seen, "the secret never reached the agent");

    let wire = relay.recorded();
    assert!(wire.len() > 10_000, "too little traffic: {}", wire.len());
    assert!(
        contains(&wire, &[0x16, 0x03]),
        "no TLS handshake on the wire"
    );
    for (what, needle) in [
        ("the token", TOKEN),
        ("the secret", secret),
        ("the bearer header", "Bearer"),
        ("the protocol's paths", "/v1/groups"),
        ("the services", "howdy"),
    ] {
        assert!(!contains(&wire, needle.as_bytes()), "{what} is on the wire");
    }
}

#[test]
fn a_wrong_pinned_fingerprint_is_refused_before_anything_is_sent() {
    let w = World::new("pin", 2, false);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let right0 = w.agents[0].fingerprint();
    let right1 = w.agents[1].fingerprint();
    let (a0, a1) = (w.agents[0].addr.clone(), w.agents[1].addr.clone());
    retarget(&w, 0, &a0, &format!(", fingerprint: \"{right0}\""));
    retarget(&w, 1, &a1, &format!(", fingerprint: \"{wrong}\""));
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).fails(
        1,
        &[
            "host `h1`",
            &wrong,
            &right1,
            "pinned",
            "nothing was changed",
        ],
    );
    assert!(AgentProc::containers(&w.system).is_empty());
    for a in &w.agents {
        assert!(
            !a.log().contains("pending"),
            "a spec was sent:\n{}",
            a.log()
        );
    }
    // Pinned hosts give no first-contact warning; the right pin deploys.
    retarget_pin(&w, &wrong, &right1);
    let out = w.ctx.run(&["deploy", "production"]).ok();
    assert!(!out.stderr.contains("first contact"), "{out}");
    w.assert_serving(&r1);

    // A malformed pin is bad input, naming the file and line.
    retarget_pin(&w, &right1, "sha256:123");
    w.ctx
        .run(&["deploy", "production"])
        .fails(2, &["system.yml", "not a certificate fingerprint"]);
}

fn retarget_pin(w: &World, from: &str, to: &str) {
    let path = w.ctx.path().join("system.yml");
    let text = std::fs::read_to_string(&path).unwrap().replace(from, to);
    std::fs::write(path, text).unwrap();
}

#[test]
fn an_agent_whose_key_changed_after_the_first_contact_is_refused() {
    let mut w = World::new("rekey", 1, false);
    let r1 = w.build();
    let out = w.ctx.run(&["deploy", "production"]).ok();
    let old = w.agents[0].fingerprint();
    assert!(out.stderr.contains("first contact"), "{out}");
    assert!(out.stderr.contains(&old), "{out}");
    let known = std::fs::read_to_string(w.ctx.home().join("known_agents")).unwrap();
    assert!(
        known.contains(&format!("{} {old}", w.agents[0].addr)),
        "{known}"
    );
    // `--print-fingerprint` prints what the agent serves.
    let printed = w
        .ctx
        .command(&["agent", "--print-fingerprint", "--data-dir"])
        .arg(&w.agents[0].data_dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&printed.stdout).trim(), old);

    // A new key on the same address: refused, and the host keeps serving r1.
    w.agents[0].kill();
    std::fs::remove_dir_all(w.agents[0].data_dir.join("tls")).unwrap();
    w.agents[0].spawn();
    let new = w.agents[0].fingerprint();
    assert_ne!(new, old);
    let r2 = w.next_release(2);
    w.ctx.run(&["deploy", "production", &r2]).fails(
        1,
        &["host `h0`", &old, &new, "known_agents", "intercepting"],
    );
    w.assert_serving(&r1);
    let status = w.ctx.run(&["status", "production", "--json"]).ok().json();
    assert_eq!(status["hosts"][0]["reachable"], false);
    assert!(
        status["hosts"][0]["error"].as_str().unwrap().contains(&new),
        "{status}"
    );
}

/// `openssl` in `dir`, panicking with its output on failure.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`NAME-ca.pem`) and a certificate it signed for 127.0.0.1 (`NAME.pem`,
/// `NAME.key`).
fn make_ca_and_cert(dir: &std::path::Path, name: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    let mut args = vec!["req", "-x509", "-days", "2"];
    args.extend(ec);
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-subj",
        "/CN=test agents CA",
    ]);
    openssl(dir, &args);
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=agent"]);
    openssl(dir, &args);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let pem = format!("{name}.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            &pem,
        ],
    );
}

#[test]
fn an_operators_ca_vouches_for_its_agents() {
    let dir = tempfile::tempdir().unwrap();
    make_ca_and_cert(dir.path(), "ops");
    make_ca_and_cert(dir.path(), "other");
    let (cert, key) = (dir.path().join("ops.pem"), dir.path().join("ops.key"));
    let mut w = World::new("ca", 0, false);
    w.agents.push(AgentProc::start_with(
        &w.ctx.path().join("agent0"),
        TOKEN,
        &w.system,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    ));
    std::fs::copy(dir.path().join("ops-ca.pem"), w.ctx.path().join("ca.pem")).unwrap();
    w.write_system("local", "batch: 1", "    agent_ca: ./ca.pem\n");
    let r1 = w.build();
    let out = w.ctx.run(&["deploy", "production"]).ok();
    assert!(!out.stderr.contains("first contact"), "{out}");
    w.assert_serving(&r1);

    // Another CA does not vouch for it.
    std::fs::copy(dir.path().join("other-ca.pem"), w.ctx.path().join("ca.pem")).unwrap();
    let r2 = w.next_release(2);
    w.ctx
        .run(&["deploy", "production", &r2])
        .fails(1, &["host `h0`", "agent_ca", "does not vouch"]);
    w.assert_serving(&r1);
}

#[test]
fn a_switch_whose_answer_is_lost_ends_on_the_old_release() {
    let w = World::new("lost", 2, false);
    let relay = Relay::start(&w.agents[0].addr);
    retarget(&w, 0, &relay.addr, "");
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    // The new release takes 3 s to come up, so the switch answers well after the
    // `batch 1` line that arms the cut, even on a loaded machine.
    w.ctx.write("app/www/delay", "3\n");
    let r2 = w.next_release(2);

    // Cut h0's connection when its switch answers (batch 1 is h0 alone).
    let mut child = w
        .ctx
        .command(&["deploy", "production", &r2])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains("batch 1") {
            relay.cut_next_answer.store(true, Ordering::SeqCst);
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert_eq!(*relay.cuts.lock().unwrap(), 1, "{log}");
    assert!(log.contains("host `h0`: switched back"), "{log}");
    w.assert_serving(&r1);
    let status = w.ctx.run(&["status", "production", "--json"]).ok().json();
    for h in 0..2 {
        assert_eq!(status["hosts"][h]["groups"][0]["release"], r1.as_str());
    }
}

/// Hold `n` connections to `addr`, each sending one byte a second of `text` (an
/// endless request head), until `stop`.
fn trickle(
    addr: &str,
    n: usize,
    text: &'static [u8],
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..n)
            .filter_map(|_| TcpStream::connect(&addr).ok())
            .collect();
        for c in &conns {
            let _ = c.set_nonblocking(true);
        }
        let opened = conns.len();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let byte = [text[i % text.len()]];
            conns.retain_mut(|c| c.write(&byte).is_ok());
            i += 1;
            for _ in 0..10 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        opened
    })
}

fn memory_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn slow_connections_do_not_delay_normal_requests() {
    let w = World::new("slowloris", 1, false);
    let r1 = w.build();
    w.ctx.run(&["deploy", "production"]).ok();
    let agent = &w.agents[0];
    let idle_kb = memory_kb(agent.pid(), "VmRSS:");

    let stop = Arc::new(AtomicBool::new(false));
    let proxy = trickle(
        &w.proxy(0),
        500,
        b"GET / HTTP/1.1\r\nX-Slow: aaaa",
        stop.clone(),
    );
    let api = trickle(&agent.addr, 500, b"\x16\x03\x01\x02\x00", stop.clone());
    std::thread::sleep(Duration::from_secs(2));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = agent.client();
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        assert_eq!(
            http_get(&w.proxy(0), "/index.html"),
            Ok((200, w.body(&r1, 0)))
        );
        worst = worst.max(t.elapsed());
        let t = Instant::now();
        let state = runtime.block_on(client.state()).unwrap();
        assert_eq!(state.groups.len(), 1);
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    let held_kb = memory_kb(agent.pid(), "VmRSS:");
    stop.store(true, Ordering::Relaxed);
    let (opened_proxy, opened_api) = (proxy.join().unwrap(), api.join().unwrap());
    let peak_kb = memory_kb(agent.pid(), "VmHWM:");
    println!(
        "slow connections: {opened_proxy} to the proxy, {opened_api} to the API; worst normal answer {worst:?}; agent RSS idle {idle_kb} kB, with them held {held_kb} kB, peak {peak_kb} kB"
    );
    assert_eq!((opened_proxy, opened_api), (500, 500));
    assert!(
        worst < Duration::from_secs(1),
        "worst answer took {worst:?}"
    );
    assert!(peak_kb < 256 * 1024, "agent peak RSS {peak_kb} kB");
}
