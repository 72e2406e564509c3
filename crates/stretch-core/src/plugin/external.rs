//! External plugins: `plugins/NAME` in the tree, else `stretch-plugin-NAME` on `PATH`,
//! run once per hook with a JSON document on stdin. Their `env` option declares the
//! variables they may see, as for the built-ins.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Call;
use crate::log::Log;
use crate::system::project::PluginDecl;
use crate::{Error, Result};

/// The executable implementing `decl`.
pub fn find(decl: &PluginDecl, tree: &Path) -> Result<PathBuf> {
    let local = tree.join("plugins").join(&decl.name);
    if local.is_file() {
        return Ok(local);
    }
    let exe = format!("stretch-plugin-{}", decl.name);
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(&exe);
            if p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
            {
                return Ok(p);
            }
        }
    }
    Err(Error::invalid_with_help(
        format!(
            "unknown plugin `{}`: no `plugins/{}` in the sources and no `{exe}` on PATH",
            decl.name, decl.name
        ),
        "built-in plugins are `exec` and `migrations`",
    ))
}

pub async fn run(call: &Call<'_>, log: &Log) -> Result<()> {
    let exe = find(call.decl, call.tree)?;
    let f = call.facts;
    let input = serde_json::json!({
        "hook": call.hook.as_str(),
        "plugin": call.decl.name,
        "options": call.decl.options,
        "system": f.system,
        "environment": f.environment,
        "kind": f.kind,
        "node": call.decl.node,
        "path": call.tree.join(&call.decl.dir),
        "release": f.release,
        "existing_release": f.existing_release,
    });
    let data =
        serde_json::to_vec(&input).map_err(|e| Error::failed(call.hook.as_str(), e.to_string()))?;
    let mut c = call.new_command(&exe)?;
    c.current_dir(call.tree.join(&call.decl.dir));
    call.command(c, Some(data), log).await
}
