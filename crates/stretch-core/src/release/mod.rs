//! Releases: the deterministic archive of a build's tree and the memorable names of releases.

pub mod archive;
pub mod config;
pub mod name;
