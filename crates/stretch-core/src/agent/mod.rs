//! The agent: its protocol ([`api`]), the client the deploy step uses ([`client`]) and
//! the daemon `stretch agent` runs ([`server`]). Only this module speaks the protocol.

pub mod api;
pub mod client;
pub mod fleet;
pub mod server;
pub mod trust;
