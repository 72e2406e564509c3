//! Leases on this agent: per environment of a system, at most one live holder, with a
//! time to live and a fencing token that only grows. The newest token issued per
//! environment is kept in `leases.json` (0600), so tokens keep growing across
//! restarts; a live lease itself is not (after a restart its holder renews it, as
//! nobody else can have taken a newer token).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::ApiError;
use crate::agent::api::{LeaseGrant, LeaseRequest, StaleLease};
use crate::home::write_private;

/// Longest time to live a run may ask for; a lease is meant to expire when its run dies.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
struct Held {
    holder: String,
    token: u64,
    expires: Instant,
    released: bool,
}

impl Held {
    fn new(req: &LeaseRequest, token: u64, expires: Instant) -> Held {
        Held {
            holder: req.holder.clone(),
            token,
            expires,
            released: false,
        }
    }
}

#[derive(Debug)]
pub struct Leases {
    path: PathBuf,
    /// `system/environment` → newest token issued, and the lease as it stands.
    table: Mutex<(BTreeMap<String, u64>, BTreeMap<String, Held>)>,
}

fn name(system: &str, environment: &str) -> String {
    format!("{system}/{environment}")
}

fn locked(message: String) -> ApiError {
    ApiError::new(StatusCode::LOCKED, message)
}

impl Leases {
    pub fn open(path: PathBuf) -> Leases {
        let tokens: BTreeMap<String, u64> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Leases {
            path,
            table: Mutex::new((tokens, BTreeMap::new())),
        }
    }

    /// Take (no token) or renew (the token) the lease of `system/environment`.
    pub fn take(
        &self,
        system: &str,
        environment: &str,
        req: &LeaseRequest,
    ) -> Result<LeaseGrant, ApiError> {
        let key = name(system, environment);
        let ttl = Duration::from_millis(req.ttl_ms).min(MAX_TTL);
        if ttl.is_zero() {
            return Err(ApiError::bad_request("a lease needs a time to live"));
        }
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, held) = &mut *table;
        let newest = tokens.get(&key).copied().unwrap_or(0);
        let current = held.get(&key).cloned();
        if let Some(token) = req.token {
            // A renewal: fine while nobody took a newer token, even past expiry.
            if token != newest || current.as_ref().is_some_and(|c| c.released) {
                return Err(ApiError::conflict(format!(
                    "lease {token} on `{key}` is gone: {}",
                    match &current {
                        Some(c) if c.token != token && !c.released =>
                            format!("{} holds lease {}", c.holder, c.token),
                        _ => "it was released or taken over".to_string(),
                    }
                )));
            }
            held.insert(key, Held::new(req, token, now + ttl));
            return Ok(LeaseGrant {
                token,
                took_over: None,
            });
        }
        let mut took_over = None;
        if let Some(c) = &current
            && !c.released
        {
            if c.expires > now {
                let left = c.expires.duration_since(now);
                return Err(locked(format!(
                    "environment `{environment}` of `{system}` is leased to {} for up to {}s more",
                    c.holder,
                    left.as_secs().max(1)
                )));
            }
            took_over = Some(StaleLease {
                holder: c.holder.clone(),
                expired_ms_ago: u64::try_from(now.duration_since(c.expires).as_millis())
                    .unwrap_or(u64::MAX),
            });
        }
        let token = newest + 1;
        tokens.insert(key.clone(), token);
        let data = serde_json::to_vec(&*tokens).unwrap_or_default();
        if let Err(e) = write_private(&self.path, &data) {
            tokens.insert(key, newest);
            return Err(ApiError::from(crate::Error::failed(
                "agent",
                format!("cannot write `{}`: {e}", self.path.display()),
            )));
        }
        held.insert(key, Held::new(req, token, now + ttl));
        Ok(LeaseGrant { token, took_over })
    }

    /// Give the lease back (only its holder can: the token must be the newest).
    pub fn release(&self, system: &str, environment: &str, token: Option<u64>) {
        let key = name(system, environment);
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, held) = &mut *table;
        if token.is_some()
            && token == tokens.get(&key).copied()
            && let Some(h) = held.get_mut(&key)
        {
            h.released = true;
        }
    }

    /// May a write carrying `token` change `system/environment`? Once an environment
    /// was leased here, only with the newest token.
    pub fn check(
        &self,
        system: &str,
        environment: &str,
        token: Option<u64>,
    ) -> Result<(), ApiError> {
        let key = name(system, environment);
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, held) = &*table;
        let Some(newest) = tokens.get(&key).copied() else {
            return Ok(());
        };
        match token {
            Some(t) if t == newest => Ok(()),
            Some(t) => Err(locked(format!(
                "lease {t} on `{key}` was taken over ({}): this run may not change it any more",
                match held.get(&key) {
                    Some(h) => format!("{} holds lease {}", h.holder, h.token),
                    None => format!("lease {newest} is newer"),
                }
            ))),
            None => Err(locked(format!(
                "`{key}` is leased: a change must carry its lease (`{}` header)",
                crate::agent::api::LEASE_HEADER
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(holder: &str, token: Option<u64>, ttl_ms: u64) -> LeaseRequest {
        LeaseRequest {
            holder: holder.into(),
            ttl_ms,
            token,
        }
    }

    #[test]
    fn one_holder_fencing_and_takeover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let leases = Leases::open(path.clone());
        // Never leased: writes without a lease pass.
        assert!(leases.check("s", "prod", None).is_ok());
        let a = leases.take("s", "prod", &req("a", None, 60_000)).unwrap();
        assert_eq!(a.token, 1);
        assert!(a.took_over.is_none());
        let refused = leases
            .take("s", "prod", &req("b", None, 60_000))
            .unwrap_err();
        assert_eq!(refused.status, StatusCode::LOCKED);
        assert!(
            refused.message.contains("leased to a"),
            "{}",
            refused.message
        );
        // Other environments are independent.
        assert_eq!(
            leases
                .take("s", "staging", &req("b", None, 60_000))
                .unwrap()
                .token,
            1
        );
        assert!(leases.check("s", "prod", Some(1)).is_ok());
        assert!(leases.check("s", "prod", None).is_err());
        assert_eq!(
            leases
                .take("s", "prod", &req("a", Some(1), 60_000))
                .unwrap()
                .token,
            1
        );
        // Expired: b takes over, and a can neither write nor renew.
        leases.take("s", "prod", &req("a", Some(1), 1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let b = leases.take("s", "prod", &req("b", None, 60_000)).unwrap();
        assert_eq!(b.token, 2);
        assert_eq!(b.took_over.as_ref().map(|t| t.holder.as_str()), Some("a"));
        assert!(leases.check("s", "prod", Some(1)).is_err());
        assert!(
            leases
                .take("s", "prod", &req("a", Some(1), 60_000))
                .is_err()
        );
        // Released: the next one takes it at once, with a newer token, no takeover.
        leases.release("s", "prod", Some(2));
        let c = leases.take("s", "prod", &req("c", None, 60_000)).unwrap();
        assert_eq!((c.token, c.took_over), (3, None));
        // Tokens survive a restart.
        let again = Leases::open(path);
        assert_eq!(
            again
                .take("s", "prod", &req("d", None, 60_000))
                .unwrap()
                .token,
            4
        );
    }
}
