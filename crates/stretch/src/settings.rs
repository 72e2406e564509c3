//! Global settings, resolved once from flags and environment.

use std::path::PathBuf;

use crate::cli::Cli;

#[derive(Debug, Clone)]
pub struct Settings {
    pub system_file: PathBuf,
    pub home: PathBuf,
    pub json: bool,
    pub verbosity: Verbosity,
    /// `--server URL`: commands that can go through a `stretch serve` do.
    pub server: Option<crate::remote::Server>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

impl Settings {
    pub fn from_args(cli: &Cli) -> Settings {
        let g = &cli.global;
        let home = g.home.clone().unwrap_or_else(|| {
            let dir = g.system.parent().map(PathBuf::from).unwrap_or_default();
            if dir.as_os_str().is_empty() {
                PathBuf::from(".stretch")
            } else {
                dir.join(".stretch")
            }
        });
        let verbosity = if g.quiet {
            Verbosity::Quiet
        } else if g.verbose {
            Verbosity::Verbose
        } else {
            Verbosity::Normal
        };
        Settings {
            system_file: g.system.clone(),
            home,
            json: g.json,
            verbosity,
            server: g
                .server
                .clone()
                .map(|url| crate::remote::Server::from_env(url, g.server_ca.clone())),
        }
    }
}
