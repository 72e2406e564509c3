//! One module per subcommand; each takes settings and typed arguments, never clap types
//! beyond its own argument struct.

mod agent;
mod app;
mod build;
mod deploy;
mod dev;
mod init;
mod keys;
mod runs;
mod secrets;
mod serve;

use std::path::Path;

use stretch_core::Result;
use stretch_core::home::Home;
use stretch_core::store::Store;
use stretch_core::system::System;

use crate::cli::Command;
use crate::printer::Printer;
use crate::settings::Settings;

/// Run one command; its exit status when it succeeds (0 but for `app exec`, which
/// exits with its command's).
pub async fn run(command: Command, settings: &Settings, printer: &Printer) -> Result<u8> {
    // `--server URL`: the commands a server offers go through its API instead.
    let command = match &settings.server {
        Some(server) => match crate::remote::run(server, command, printer).await? {
            Some(local) => local,
            None => return Ok(0),
        },
        None => command,
    };
    if let Command::App(cmd) = command {
        return app::run(cmd, settings, printer).await;
    }
    run_one(command, settings, printer).await.map(|()| 0)
}

async fn run_one(command: Command, settings: &Settings, printer: &Printer) -> Result<()> {
    match command {
        Command::Build(args) => build::run(args, settings, printer).await,
        Command::Releases { remote: false } => runs::releases(settings, printer),
        Command::Releases { remote: true } => runs::remote_releases(settings, printer).await,
        Command::Prune { keep, dry_run } => runs::prune(keep, dry_run, settings, printer).await,
        Command::History { environment } => {
            runs::history(environment.as_deref(), settings, printer)
        }
        Command::Logs { id, follow } => runs::logs(id, follow, settings, printer).await,
        Command::Deploy(a) => {
            deploy::deploy(a, stretch_core::deploy::Kind::Deploy, settings, printer).await
        }
        Command::Rollback(a) => {
            deploy::deploy(a, stretch_core::deploy::Kind::Rollback, settings, printer).await
        }
        Command::Apply {
            environment,
            dry_run,
            wait,
        } => deploy::apply(&environment, dry_run, wait, settings, printer).await,
        Command::Dev(a) => dev::run(a, settings, printer).await,
        Command::Status { environment } => deploy::status(&environment, settings, printer).await,
        Command::Init { dir } => init::run(dir, printer),
        Command::Agent(a) => agent::run(a).await,
        Command::Serve(a) => serve::run(a, settings).await,
        Command::Keys(k) => keys::run(k, printer),
        Command::Secrets(s) => secrets::run(s, printer),
        Command::App(_) => Ok(()),
    }
}

/// The system file, loaded and validated.
pub fn load_system(settings: &Settings) -> Result<System> {
    System::load(&settings.system_file)
}

/// The home folder and its store.
pub fn open_home(settings: &Settings) -> Result<(Home, Store)> {
    let home = Home::open(&settings.home)?;
    let store = Store::open(&home.db())?;
    Ok((home, store))
}

/// The home folder's store, without creating anything when there is none yet.
pub fn open_store_if_any(settings: &Settings) -> Result<Option<Store>> {
    if !Path::new(&settings.home).join("stretch.db").exists() {
        return Ok(None);
    }
    open_home(settings).map(|(_, s)| Some(s))
}

/// The text of a token file, else of the environment variable `env` (empty if unset).
fn token_text(file: Option<&Path>, env: &str) -> Result<String> {
    match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            stretch_core::Error::invalid(format!(
                "cannot read the token file `{}`: {e}",
                path.display()
            ))
        }),
        None => Ok(std::env::var(env).unwrap_or_default()),
    }
}
