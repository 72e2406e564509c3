//! The stretch pipeline as a library: system files, sources, secrets, releases, builds,
//! deploys, plugins and the Docker engine. It prints nothing; callers see progress
//! through [`log::Log`] events and results as typed values.

pub mod agent;
pub mod app;
pub mod build;
pub mod deploy;
pub mod docker;
pub mod error;
pub mod home;
pub mod log;
pub mod net;
pub mod outcome;
pub mod plugin;
pub mod prune;
pub mod release;
pub mod run;
pub mod secrets;
pub mod source;
pub mod status;
pub mod store;
pub mod system;
pub mod template;
pub mod token;
pub mod util;

pub use error::{Error, Result};
