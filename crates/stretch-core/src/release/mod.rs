//! Releases: the deterministic archive of a build's tree, the memorable names of releases,
//! their configuration sealed at rest, and their copies in the registry.

pub mod archive;
pub mod config;
pub mod name;
pub mod remote;
pub mod sealed;
