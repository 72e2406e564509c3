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
    pub server: Option<Server>,
    /// `--release-identity FILE` (or `STRETCH_RELEASE_IDENTITY`).
    pub release_identity: Option<PathBuf>,
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
            release_identity: g.release_identity.clone(),
            verbosity,
            server: g
                .server
                .clone()
                .map(|url| Server::from_env(url, g.server_ca.clone())),
        }
    }
}

/// `--server URL` as resolved: where the server is and how to trust and call it.
/// The environment variable holding the server's token.
pub const TOKEN_ENV: &str = "STRETCH_SERVER_TOKEN";
/// The environment variable pinning an `https://` server's certificate.
pub const FINGERPRINT_ENV: &str = "STRETCH_SERVER_FINGERPRINT";

#[derive(Clone)]
pub struct Server {
    pub url: String,
    pub token: Option<String>,
    /// `--server-ca`: a CA file trusted besides the system's.
    pub ca: Option<PathBuf>,
    /// `STRETCH_SERVER_FINGERPRINT` as given (checked when a client is made).
    pub fingerprint: Option<String>,
}

impl std::fmt::Debug for Server {
    // Not derived: the token stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("ca", &self.ca)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Server {
    pub fn from_env(url: String, ca: Option<PathBuf>) -> Server {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        };
        Server {
            url,
            token: var(TOKEN_ENV),
            ca,
            fingerprint: var(FINGERPRINT_ENV),
        }
    }
}
