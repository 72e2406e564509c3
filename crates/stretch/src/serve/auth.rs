//! Who may call the server: a bearer token (`Authorization: Bearer TOKEN`), or a session
//! cookie set by the login form. Tokens are compared in constant time (as blake3
//! hashes). State-changing calls made with the cookie must also come from the same
//! origin and carry the session's CSRF token: the cookie is `SameSite=Strict`, and the
//! origin check and token stop a cross-site form or script even where it is not.
//!
//! A wrong token (bearer or login form) is answered only after a pause that doubles
//! with each failure from the same address in a row, and is logged (never the token).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::Extensions;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use stretch_core::net::backoff::Backoff;

use super::Shared;

pub const COOKIE: &str = "stretch_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions end after this long; log in again.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

pub struct Auth {
    tokens: Vec<blake3::Hash>,
    sessions: Mutex<HashMap<String, Session>>,
    /// Served over TLS: the session cookie is `Secure`.
    secure: bool,
    failures: Backoff,
}

struct Session {
    csrf: String,
    expires: Instant,
}

/// How a request was authenticated (an extension of every authenticated request).
#[derive(Debug, Clone)]
pub enum Caller {
    Bearer,
    Session { csrf: String },
}

impl Caller {
    /// The CSRF token forms must carry (empty for bearer callers, who need none).
    pub fn csrf(&self) -> &str {
        match self {
            Caller::Bearer => "",
            Caller::Session { csrf } => csrf,
        }
    }

    /// Whether a form's `csrf` field is right for this caller.
    pub fn form_ok(&self, given: &str) -> bool {
        match self {
            Caller::Bearer => true,
            Caller::Session { csrf } => {
                blake3::hash(csrf.as_bytes()) == blake3::hash(given.as_bytes())
            }
        }
    }
}

impl Auth {
    pub fn new(tokens: &[String], secure: bool) -> Auth {
        Auth {
            tokens: tokens.iter().map(|t| blake3::hash(t.as_bytes())).collect(),
            sessions: Mutex::new(HashMap::new()),
            secure,
            failures: Backoff::default(),
        }
    }

    /// The attributes of the session cookie (after its value).
    pub fn cookie_attributes(&self) -> &'static str {
        if self.secure {
            "Path=/; HttpOnly; SameSite=Strict; Secure"
        } else {
            "Path=/; HttpOnly; SameSite=Strict"
        }
    }

    /// A wrong token from `ip`: wait before the answer, longer each time in a row.
    pub async fn failed(&self, ip: IpAddr) {
        let f = self.failures.failed(ip);
        if f.worth_logging() {
            eprintln!(
                "stretch serve: failed authentication from {ip} ({} in a row)",
                f.failures
            );
        }
        tokio::time::sleep(f.delay).await;
    }

    /// A right token from `ip`: its failures are forgotten.
    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.succeeded(ip);
    }

    /// Whether `given` is one of the tokens. `blake3::Hash` equality is constant-time,
    /// and every token is compared, so timing tells nothing about which one matched.
    pub fn token_ok(&self, given: &str) -> bool {
        let h = blake3::hash(given.as_bytes());
        self.tokens.iter().fold(false, |ok, t| ok | (*t == h))
    }

    /// A new session: its id (the cookie's value).
    pub fn new_session(&self) -> Option<String> {
        let id = random_hex()?;
        let csrf = random_hex()?;
        let mut s = self.sessions.lock().ok()?;
        let now = Instant::now();
        s.retain(|_, v| v.expires > now);
        s.insert(
            id.clone(),
            Session {
                csrf,
                expires: now + SESSION_TTL,
            },
        );
        Some(id)
    }

    pub fn end_session(&self, id: &str) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(id);
        }
    }

    fn session(&self, id: &str) -> Option<Caller> {
        let s = self.sessions.lock().ok()?;
        // Ids are 256 random bits: a hash-map lookup leaks nothing useful.
        let found = s.get(id).filter(|v| v.expires > Instant::now())?;
        Some(Caller::Session {
            csrf: found.csrf.clone(),
        })
    }

    /// The caller, if the request is authenticated. An `Authorization` header, when
    /// present, is the only thing looked at.
    pub fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = value.to_str().ok()?.strip_prefix("Bearer ")?.trim();
            return self.token_ok(token).then_some(Caller::Bearer);
        }
        self.session(&session_cookie(headers)?)
    }
}

/// The client's address (set per connection by `serve`).
pub fn peer_ip(extensions: &Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical())
        .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
}

/// The session cookie's value.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            kv.trim()
                .strip_prefix(COOKIE)?
                .strip_prefix('=')
                .map(str::to_string)
        })
}

/// 32 random bytes from the kernel, hex.
fn random_hex() -> Option<String> {
    use std::io::Read;
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .ok()?
        .read_exact(&mut buf)
        .ok()?;
    Some(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether a browser says the request comes from a page of this server: `Origin`
/// (sent with every cross-site POST) must name this host; else `Sec-Fetch-Site`, when
/// present, must be `same-origin` or `none`.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let bare = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        return !host.is_empty() && bare == Some(host);
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some(site) => site == "same-origin" || site == "none",
        None => true,
    }
}

/// The middleware in front of every route but the login page.
pub async fn require(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let api = path.starts_with("/api/");
    if path == "/login" {
        return next.run(req).await;
    }
    let bearer = req.headers().contains_key(header::AUTHORIZATION);
    let ip = peer_ip(req.extensions());
    let Some(caller) = st.auth.caller(req.headers()) else {
        // No credentials (a browser before its login) or a stale session cookie (ids
        // are not guessable) costs nothing; a wrong token does.
        if bearer {
            st.auth.failed(ip).await;
        }
        return unauthorized(&st, api);
    };
    if bearer {
        st.auth.succeeded(ip);
    }
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD);
    if changes_state && let Caller::Session { csrf } = &caller {
        if !same_origin(req.headers()) {
            return forbidden(api, "cross-site request refused");
        }
        // Forms carry the token in a field (checked by their handler); scripts in a header.
        if api {
            let given = req
                .headers()
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if blake3::hash(given.as_bytes()) != blake3::hash(csrf.as_bytes()) {
                return forbidden(api, "missing or wrong CSRF token (header `X-CSRF-Token`)");
            }
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn unauthorized(st: &Shared, api: bool) -> Response {
    let mut resp = if api {
        super::api::error_body(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token",
            Some("send `Authorization: Bearer TOKEN` with a token of `stretch serve`"),
        )
    } else {
        // The page itself: 401 with the login form.
        (StatusCode::UNAUTHORIZED, st.pages.login(None)).into_response()
    };
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

fn forbidden(api: bool, message: &str) -> Response {
    if api {
        super::api::error_body(StatusCode::FORBIDDEN, message, None)
    } else {
        (StatusCode::FORBIDDEN, message.to_string()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_sessions() {
        let a = Auth::new(&["one".into(), "two".into()], false);
        assert!(a.token_ok("one") && a.token_ok("two"));
        assert!(!a.token_ok("on") && !a.token_ok(""));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer two".parse().unwrap());
        assert!(matches!(a.caller(&h), Some(Caller::Bearer)));
        h.insert(header::AUTHORIZATION, "Bearer three".parse().unwrap());
        assert!(a.caller(&h).is_none());
        let id = a.new_session().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("x=1; {COOKIE}={id}").parse().unwrap(),
        );
        assert!(matches!(a.caller(&h), Some(Caller::Session { .. })));
        a.end_session(&id);
        assert!(a.caller(&h).is_none());
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
