//! Slowing down failed authentications per client address: each failure doubles the
//! wait before that address's next failed answer (100 ms, 200 ms, … capped at 5 s),
//! and a success or ten quiet minutes forget it. A right token is never slowed.
//!
//! The table is bounded: past [`MAX_ADDRESSES`] entries the oldest are dropped, so a
//! flood of addresses costs memory for a bounded number of them only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const FIRST: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(5);
const FORGET: Duration = Duration::from_secs(600);
pub const MAX_ADDRESSES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
}

/// Failed authentications per client address.
#[derive(Debug, Default)]
pub struct Backoff {
    table: Mutex<HashMap<IpAddr, Entry>>,
}

/// What to do about one failure: wait `delay` before answering; `failures` so far
/// (log the ones that are powers of two, so a flood is visible but does not flood).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub failures: u32,
    pub delay: Duration,
}

impl Failure {
    /// Whether this failure is worth a log line (1st, 2nd, 4th, 8th, …).
    pub fn worth_logging(&self) -> bool {
        self.failures.is_power_of_two()
    }
}

impl Backoff {
    /// Record a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr) -> Failure {
        self.failed_at(ip, Instant::now())
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> Failure {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= MAX_ADDRESSES && !table.contains_key(&ip) {
            table.retain(|_, e| now.duration_since(e.last) < FORGET);
            if table.len() >= MAX_ADDRESSES {
                let oldest = table.iter().min_by_key(|(_, e)| e.last).map(|(k, _)| *k);
                if let Some(k) = oldest {
                    table.remove(&k);
                }
            }
        }
        let entry = table.entry(ip).or_insert(Entry {
            failures: 0,
            last: now,
        });
        if now.duration_since(entry.last) >= FORGET {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last = now;
        Failure {
            failures: entry.failures,
            delay: delay(entry.failures),
        }
    }

    /// A successful authentication from `ip` forgets its failures.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.remove(&ip);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().map(|t| t.len()).unwrap_or(0)
    }
}

/// The wait after the `n`th failure in a row.
fn delay(n: u32) -> Duration {
    let shift = n.saturating_sub(1).min(16);
    FIRST.saturating_mul(1 << shift).min(CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let got: Vec<u64> = (1..=10).map(|n| delay(n).as_millis() as u64).collect();
        assert_eq!(
            got,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        assert_eq!(delay(u32::MAX), CAP);
    }

    #[test]
    fn per_address_and_forgotten_on_success_or_time() {
        let b = Backoff::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let c: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(b.failed_at(a, t0).failures, 1);
        assert_eq!(b.failed_at(a, t0).failures, 2);
        assert_eq!(b.failed_at(c, t0).failures, 1);
        b.succeeded(a);
        assert_eq!(b.failed_at(a, t0).failures, 1);
        assert_eq!(b.failed_at(a, t0 + FORGET).failures, 1);
        assert!(
            Failure {
                failures: 4,
                delay: FIRST
            }
            .worth_logging()
        );
        assert!(
            !Failure {
                failures: 5,
                delay: FIRST
            }
            .worth_logging()
        );
    }

    #[test]
    fn the_table_stays_bounded() {
        let b = Backoff::default();
        let t0 = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            b.failed_at(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(b.len() <= MAX_ADDRESSES);
    }
}
