//! Command-line types (clap). Commands never see these directly: `settings` turns the
//! global flags into [`crate::settings::Settings`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "stretch",
    version,
    about = "Build immutable releases and deploy them to hosts through agents"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The system file.
    #[arg(long, global = true, default_value = "system.yml", value_name = "FILE")]
    pub system: PathBuf,
    /// The home folder (default: `.stretch/` beside the system file).
    #[arg(long, global = true, env = "STRETCH_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print less (only results and errors).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more (every log line).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Go through a `stretch serve` at URL (`https://…`, or `http://…` on loopback)
    /// instead of the local home (token from STRETCH_SERVER_TOKEN); for build, deploy,
    /// rollback, apply, releases, history, logs.
    #[arg(long, global = true, env = "STRETCH_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The release identity: the age key of one of `release_recipients`, which opens
    /// the sealed configuration of releases (deploy, rollback, apply, auto_deploy,
    /// serve). Not the build's `--identity`.
    #[arg(
        long,
        global = true,
        env = "STRETCH_RELEASE_IDENTITY",
        value_name = "FILE"
    )]
    pub release_identity: Option<PathBuf>,
    /// With an `https://` server: also trust certificates this CA file (PEM) signed.
    /// STRETCH_SERVER_FINGERPRINT (`sha256:…`) instead trusts only that certificate.
    #[arg(long, global = true, env = "STRETCH_SERVER_CA", value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a release from the system's sources.
    Build(BuildArgs),
    /// List releases, newest first, with the environments that run each.
    Releases {
        /// List the releases in the system's registry (the store every home shares)
        /// instead of this home's.
        #[arg(long)]
        remote: bool,
    },
    /// Remove old releases: their archives, configurations, local images and registry
    /// manifests. Keeps the newest N and every release an environment runs or would
    /// roll back to.
    Prune {
        /// How many of the newest releases to keep in any case.
        #[arg(long, value_name = "N", default_value_t = stretch_core::prune::DEFAULT_KEEP)]
        keep: usize,
        /// Say what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Builds and deploys, newest first.
    History {
        /// Only runs of this environment.
        environment: Option<String>,
    },
    /// The log of one build or deploy (ID from `history`).
    Logs {
        id: i64,
        /// Keep printing new lines until the run ends.
        #[arg(long)]
        follow: bool,
    },
    /// Deploy a release (default: the newest) to an environment.
    Deploy(DeployArgs),
    /// Go back to an earlier release (default: the one before the current).
    Rollback(DeployArgs),
    /// Converge an environment on its `system.yml` definition without changing its
    /// release (config-only deploy).
    Apply {
        environment: String,
        /// Show what would change and stop.
        #[arg(long)]
        dry_run: bool,
        /// Wait for a deploy already running on the environment instead of failing.
        #[arg(long)]
        wait: bool,
    },
    /// Watch the `path:` sources and the system file; on each change rebuild and
    /// deploy to ENV (config-only, as `apply`, when only system.yml's environments
    /// changed). Git sources are built at their ref as usual, not watched. Ctrl-C stops.
    Dev(DevArgs),
    /// Where an environment stands: its release, and per host and group what runs.
    Status { environment: String },
    /// A deployed app, day to day: its logs, a command in it, a rolling restart.
    #[command(subcommand)]
    App(AppCommand),
    /// Write a working example system (`stretch build` then `stretch deploy local`).
    Init {
        /// Where to write it (default: the current folder).
        dir: Option<PathBuf>,
    },
    /// Run the agent daemon that manages this host's instances, over HTTPS.
    Agent(AgentArgs),
    /// Serve the HTTP API and the web view over this home folder.
    Serve(ServeArgs),
    /// Age keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Encrypt or show a `secrets.yml`.
    #[command(subcommand)]
    Secrets(SecretsCommand),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The age identity file that decrypts the sources' secrets.
    #[arg(short, long, env = "STRETCH_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Build a git source at another ref: `NAME=REF` (repeatable).
    #[arg(long = "source", value_name = "NAME=REF")]
    pub sources: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    pub environment: String,
    /// Release id, unique id prefix (6 or more characters) or name.
    pub release: Option<String>,
    /// Wait for a deploy already running on the environment instead of failing.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// The environment to deploy to (typically `local`).
    pub environment: String,
    /// The age identity file that decrypts the sources' secrets.
    #[arg(short, long, env = "STRETCH_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// How long the files must stay quiet before a cycle starts, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub debounce_ms: u64,
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// The instances' output (stdout and stderr) from every matching host, merged by
    /// time, each line prefixed with host, group and instance. Without `-n` or
    /// `--since`: the last 100 lines of each instance.
    Logs(AppLogsArgs),
    /// Run a command in a running instance (default: the first healthy one on the
    /// first host of the group), or with `--new` in a fresh container of the running
    /// release, configured as its instances are and removed afterwards. Exits with the
    /// command's status.
    Exec(AppExecArgs),
    /// Replace the running instances with fresh ones of the same release, batch by
    /// batch, without downtime (recorded in history as a `restart`).
    Restart {
        environment: String,
        /// Only this group.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// Wait for a deploy already running on the environment instead of failing.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Args)]
pub struct AppLogsArgs {
    pub environment: String,
    /// Only this group.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Only this host.
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Keep printing new lines, also from instances that start later (a deploy's),
    /// until Ctrl-C.
    #[arg(short, long)]
    pub follow: bool,
    /// Only lines of the last DURATION (`30s`, `10m`, `2h`, `1d`) or since a unix time.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Only the last N lines of each instance.
    #[arg(short = 'n', long = "lines", value_name = "N")]
    pub lines: Option<usize>,
}

#[derive(Debug, Args)]
pub struct AppExecArgs {
    pub environment: String,
    /// The group whose instance runs the command.
    #[arg(long, value_name = "GROUP")]
    pub group: String,
    /// Run on this host (default: the first of the group with a running instance).
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Run in this instance (its index) instead of the first healthy one.
    #[arg(long, value_name = "N", conflicts_with = "new")]
    pub instance: Option<u32>,
    /// Run in a new container of the running release (same image, configuration and
    /// environment as instance 0), removed when the command ends.
    #[arg(long)]
    pub new: bool,
    /// Pass this terminal's input to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal (with `-i`: an interactive console).
    #[arg(short, long)]
    pub tty: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new age identity and print its recipient (like `age-keygen`).
    Generate {
        /// Write the identity here (mode 0600) instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print a fresh agent or server token: 256 random bits as 64 hex characters.
    Token,
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Encrypt every clear leaf of FILE in place for the recipients.
    Encrypt {
        file: PathBuf,
        /// An age recipient (`age1…`), repeatable.
        #[arg(short, long = "recipient", required = true, value_name = "RECIPIENT")]
        recipients: Vec<String>,
    },
    /// Print FILE decrypted.
    Show {
        file: PathBuf,
        #[arg(short, long, env = "STRETCH_IDENTITY", value_name = "FILE")]
        identity: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address the agent's API (HTTPS) listens on, `HOST:PORT`.
    #[arg(
        long,
        value_name = "ADDR",
        required_unless_present = "print_fingerprint"
    )]
    pub listen: Option<String>,
    /// Where the agent keeps its state and instance files (created, mode 0700).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// File holding the token every request must carry (else env STRETCH_AGENT_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Address the group proxies listen on.
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub proxy_bind: std::net::IpAddr,
    /// Port that redirects HTTPS groups' domains from plain HTTP and answers ACME
    /// HTTP-01 challenges, opened while an HTTPS group or a challenge needs it
    /// (`0`: never; then ACME cannot work).
    #[arg(long, value_name = "PORT", default_value_t = 80)]
    pub http_port: u16,
    /// Renew ACME certificates that have less than this left (`30d`, `12h`).
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = duration)]
    pub acme_renew_before: std::time::Duration,
    /// How often to look for ACME certificates to renew.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = duration)]
    pub acme_check_every: std::time::Duration,
    /// Print the agent's certificate fingerprint (`sha256:…`, making its key if there is
    /// none) and exit; pin it as the host's `fingerprint:` in system.yml.
    #[arg(long)]
    pub print_fingerprint: bool,
    /// Serve this certificate (PEM, leaf first) instead of the agent's own.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of `--tls-cert` (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Docker's configuration folder with this host's registry logins (`config.json`,
    /// as `docker login` writes it). Default: `$DOCKER_CONFIG`, else `~/.docker`.
    #[arg(long, value_name = "DIR")]
    pub docker_config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, `HOST:PORT`.
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// File holding the accepted token(s), one a line (else env STRETCH_SERVER_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The age identity that builds started through the server decrypt secrets with.
    #[arg(short, long, env = "STRETCH_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Serve HTTPS with this certificate (PEM, leaf first, then its chain).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP on an address other than loopback (e.g. behind a proxy that
    /// terminates TLS): tokens and session cookies cross that network in the clear.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure_http: bool,
}

/// A duration as `system.yml` writes them: `500ms`, `30s`, `2m`, `12h`, `30d`.
fn duration(text: &str) -> Result<std::time::Duration, String> {
    stretch_core::system::project::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a duration (e.g. `30s`, `12h`, `30d`)"))
}
