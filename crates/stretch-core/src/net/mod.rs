//! Network plumbing shared by every listener and client: TLS identities and peer
//! trust ([`tls`]), HTTP serving with bounded time and connections ([`serve`]), and
//! per-address slowing of failed logins ([`backoff`]).

pub mod backoff;
pub mod serve;
pub mod tls;
