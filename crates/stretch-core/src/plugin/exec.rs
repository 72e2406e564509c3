//! The built-in `exec` plugin: `{build: CMD, pre_deploy: CMD, post_deploy: CMD, path: DIR}`
//! runs shell commands in the plugin's folder (`env: [NAME, …]`: variables it may see).

use super::{Call, known_options, opt_str};
use crate::Result;
use crate::log::Log;
use crate::system::project::PluginDecl;

pub fn validate(decl: &PluginDecl) -> Result<()> {
    known_options(decl, &["build", "pre_deploy", "post_deploy", "path", "env"])?;
    for k in ["build", "pre_deploy", "post_deploy", "path"] {
        opt_str(decl, k)?;
    }
    Ok(())
}

pub async fn run(call: &Call<'_>, log: &Log) -> Result<()> {
    let Some(cmd) = opt_str(call.decl, call.hook.as_str())? else {
        return Ok(());
    };
    let dir = call.folder(call.tree, opt_str(call.decl, "path")?)?;
    log.line(format!("exec ({}): {cmd}", call.label()));
    let mut c = call.new_command("sh")?;
    c.arg("-c").arg(cmd).current_dir(dir);
    call.command(c, None, log).await
}
