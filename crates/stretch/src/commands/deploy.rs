//! `stretch deploy`, `stretch rollback` and `stretch status`.

use stretch_core::Result;
use stretch_core::deploy::apply::ApplyRequest;
use stretch_core::deploy::{self, DeployRequest, Kind};
use stretch_core::log::Log;
use stretch_core::outcome::Deployed;

use crate::cli::DeployArgs;
use crate::printer::Printer;
use crate::render;
use crate::settings::Settings;

pub async fn deploy(
    args: DeployArgs,
    kind: Kind,
    settings: &Settings,
    printer: &Printer,
) -> Result<()> {
    let system = super::load_system(settings)?;
    let (home, store) = super::open_home(settings)?;
    let req = DeployRequest {
        environment: args.environment,
        release: args.release,
        kind,
        wait: args.wait,
        release_identity: settings.release_identity.clone(),
    };
    let log = Log::new(vec![printer.progress()]);
    let outcome = deploy::deploy(&system, &home, &store, &req, &log).await?;
    render::show(printer, &Deployed::of(&outcome, kind, &req.environment));
    Ok(())
}

pub async fn apply(
    env: &str,
    dry_run: bool,
    wait: bool,
    settings: &Settings,
    printer: &Printer,
) -> Result<()> {
    let system = super::load_system(settings)?;
    let (home, store) = super::open_home(settings)?;
    let req = ApplyRequest {
        environment: env.to_string(),
        dry_run,
        wait,
        release_identity: settings.release_identity.clone(),
    };
    // The plan is printed before anything changes; progress follows.
    let log = Log::new(vec![printer.progress()]);
    let outcome = deploy::apply::apply(&system, &home, &store, &req, &log).await?;
    render::show(printer, &outcome);
    Ok(())
}

pub async fn status(env_name: &str, settings: &Settings, printer: &Printer) -> Result<()> {
    let system = super::load_system(settings)?;
    let store = super::open_store_if_any(settings)?;
    let home = stretch_core::home::Home::open(&settings.home)?;
    let log = Log::new(vec![printer.progress()]);
    let status =
        stretch_core::status::environment(&system, &home, store.as_ref(), env_name, true, &log)
            .await?;
    render::show(printer, &status);
    Ok(())
}
