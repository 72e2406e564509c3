//! The release configuration: every global and per-node setting of a release, with
//! secrets decrypted, in one JSON document stored beside the archive (mode 0600) so
//! that deploys need neither the key nor the sources. `config.yml` files stay
//! templates here: they are rendered at deploy time with the deploy context.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped when the document's shape changes incompatibly.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseConfig {
    pub format: u32,
    pub system: String,
    pub registry: String,
    /// System-level plugins.
    pub plugins: Vec<Plugin>,
    pub nodes: Vec<NodeConfig>,
    /// `config.yml` templates by path in the tree.
    pub config_files: BTreeMap<String, ConfigTemplate>,
    /// Decrypted `secrets.yml` documents by path in the tree.
    pub secrets: BTreeMap<String, serde_json::Value>,
    /// Decrypted `*.age` files (path without `.age` → base64 content).
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plugin {
    pub name: String,
    pub options: serde_json::Value,
    pub dir: String,
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigTemplate {
    pub template: String,
    /// The `secrets.yml` its `!secret` tags read.
    pub secrets: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub name: String,
    pub dir: String,
    /// Image repository with registry and system (`REGISTRY/SYSTEM/NODE`); the tag is the release id.
    pub image: String,
    pub port: Option<u16>,
    pub health: crate::system::project::Health,
    pub reload: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_signal: Option<String>,
    pub stop_timeout_ms: Option<u64>,
    /// Folder of the container templates in the tree (may not exist).
    pub templates: String,
    pub plugins: Vec<Plugin>,
    /// The root `config.yml` (gives `config` and `local_config`), then the node's own.
    pub root_config: Option<String>,
    pub config: Option<String>,
}

impl From<&crate::system::project::PluginDecl> for Plugin {
    fn from(p: &crate::system::project::PluginDecl) -> Self {
        Plugin {
            name: p.name.clone(),
            options: p.options.clone(),
            dir: p.dir.clone(),
            node: p.node.clone(),
        }
    }
}

impl From<&Plugin> for crate::system::project::PluginDecl {
    fn from(p: &Plugin) -> Self {
        crate::system::project::PluginDecl {
            name: p.name.clone(),
            options: p.options.clone(),
            dir: p.dir.clone(),
            node: p.node.clone(),
        }
    }
}
