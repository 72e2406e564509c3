//! Registry credentials the Docker way: `STRETCH_REGISTRY_USERNAME`/`_PASSWORD`, else
//! the Docker client's `config.json` (`credHelpers`, `auths`, `credsStore`, in the
//! order `docker` itself tries them) with the `docker-credential-*` helper protocol.
//! Credentials go to the engine with each push or pull and are never printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use bollard::auth::DockerCredentials;
use serde::Deserialize;

use crate::{Error, Result};

pub const USERNAME_ENV: &str = "STRETCH_REGISTRY_USERNAME";
pub const PASSWORD_ENV: &str = "STRETCH_REGISTRY_PASSWORD";

/// A login for one registry. `Debug` shows no secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    secret: String,
    /// The secret is an identity (refresh) token, not a password.
    token: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

impl Credentials {
    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    /// What the engine takes with a push or pull of `registry`.
    pub fn for_engine(&self, registry: &str) -> DockerCredentials {
        let (password, identitytoken) = if self.token {
            (None, Some(self.secret.clone()))
        } else {
            (Some(self.secret.clone()), None)
        };
        DockerCredentials {
            username: Some(self.username.clone()).filter(|_| !self.token),
            password,
            identitytoken,
            serveraddress: Some(registry.to_string()),
            ..Default::default()
        }
    }
}

/// What a lookup found, and where it looked (for errors).
#[derive(Debug, Clone)]
pub struct Lookup {
    pub credentials: Option<Credentials>,
    pub searched: String,
}

/// The Docker configuration folder: `dir`, else `$DOCKER_CONFIG`, else `~/.docker`.
pub fn config_dir(dir: Option<&Path>) -> PathBuf {
    if let Some(d) = dir {
        return d.to_path_buf();
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return PathBuf::from(d);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".docker")
}

/// The credentials for `registry` (`HOST[:PORT]`).
pub fn lookup(registry: &str, dir: Option<&Path>) -> Result<Lookup> {
    if let (Ok(username), Ok(secret)) = (std::env::var(USERNAME_ENV), std::env::var(PASSWORD_ENV)) {
        return Ok(Lookup {
            credentials: Some(Credentials {
                username,
                secret,
                token: false,
            }),
            searched: format!("{USERNAME_ENV} and {PASSWORD_ENV}"),
        });
    }
    let file = config_dir(dir).join("config.json");
    let searched = format!("{} (or {USERNAME_ENV}/{PASSWORD_ENV})", file.display());
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Lookup {
                credentials: None,
                searched,
            });
        }
        Err(e) => {
            return Err(Error::invalid(format!(
                "cannot read Docker's configuration `{}`: {e}",
                file.display()
            )));
        }
    };
    let config: Config = serde_json::from_str(&text).map_err(|e| {
        Error::invalid(format!(
            "Docker's configuration `{}` is not valid: {e}",
            file.display()
        ))
    })?;
    let credentials = find(&config, registry, &file, &run_helper)?;
    Ok(Lookup {
        credentials,
        searched,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// `https://host:port/v1/` → `host:port`, as `docker login` may have written it.
fn host_of(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

type Helper<'a> = &'a dyn Fn(&str, &str) -> Result<Option<Credentials>>;

fn find(
    config: &Config,
    registry: &str,
    file: &Path,
    helper: Helper,
) -> Result<Option<Credentials>> {
    let bad = |what: &str| {
        Error::invalid(format!(
            "Docker's configuration `{}`: the entry for {registry} {what}",
            file.display()
        ))
    };
    if let Some((_, h)) = config
        .cred_helpers
        .iter()
        .find(|(k, _)| host_of(k) == registry)
    {
        return helper(h, registry);
    }
    if let Some((_, a)) = config.auths.iter().find(|(k, _)| host_of(k) == registry) {
        if let Some(token) = &a.identitytoken {
            return Ok(Some(Credentials {
                username: a.username.clone().unwrap_or_default(),
                secret: token.clone(),
                token: true,
            }));
        }
        if let (Some(u), Some(p)) = (&a.username, &a.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                secret: p.clone(),
                token: false,
            }));
        }
        if let Some(auth) = &a.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad("has an `auth` that is not base64"))?;
            let text = String::from_utf8(raw).map_err(|_| bad("has an `auth` that is not text"))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| bad("has an `auth` without `user:password`"))?;
            return Ok(Some(Credentials {
                username: u.to_string(),
                secret: p.to_string(),
                token: false,
            }));
        }
        // An entry without a secret (a `credsStore` holds it): fall through.
    }
    match &config.creds_store {
        Some(store) => helper(store, registry),
        None => Ok(None),
    }
}

/// When the engine says `registry` refused the login (or wanted one), the error that
/// says so: which registry, where credentials were looked for, never a credential.
pub fn refused(registry: &str, cause: &str, auth: &Lookup, stage: &str) -> Option<Error> {
    let c = cause.to_lowercase();
    let denied = [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "denied",
    ]
    .iter()
    .any(|w| c.contains(w));
    if !denied {
        return None;
    }
    let message = match &auth.credentials {
        Some(login) => format!(
            "registry {registry} refused the login of `{}` (from {})",
            login.username, auth.searched
        ),
        None => format!(
            "registry {registry} needs a login: none found in {}",
            auth.searched
        ),
    };
    Some(Error::Failed {
        stage: stage.to_string(),
        message,
        help: Some(format!(
            "`docker login {registry}` on this machine, or set {USERNAME_ENV} and {PASSWORD_ENV}"
        )),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// `docker-credential-NAME get`, with the registry on stdin. "Not found" is no login.
fn run_helper(name: &str, registry: &str) -> Result<Option<Credentials>> {
    let program = format!("docker-credential-{name}");
    let failed = |why: String| Error::failed("credentials", format!("`{program} get`: {why}"));
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run it: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(registry.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if said.to_lowercase().contains("not found") {
            return Ok(None);
        }
        return Err(failed(format!("exited with {}", out.status)));
    }
    let a: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|_| failed("its answer is not the helper protocol's JSON".into()))?;
    Ok(Some(Credentials {
        token: a.username == "<token>",
        username: a.username,
        secret: a.secret,
    }))
}

/// No login (for tests of anonymous registries).
#[cfg(test)]
pub fn tests_anonymous() -> Lookup {
    Lookup {
        credentials: None,
        searched: "nowhere".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Config {
        serde_json::from_str(json).unwrap()
    }

    fn no_helper(name: &str, _: &str) -> Result<Option<Credentials>> {
        panic!("helper {name} asked")
    }

    fn login(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials {
            username: u.into(),
            secret: p.into(),
            token: false,
        })
    }

    #[test]
    fn auths_in_every_form_docker_writes() {
        let f = Path::new("config.json");
        let c = config(
            r#"{"auths": {
                "https://r.example:5000/v1/": {"auth": "YWxpY2U6czNjcmV0"},
                "plain.example": {"username": "bob", "password": "pw"},
                "tok.example": {"identitytoken": "rt"}
            }}"#,
        );
        assert_eq!(
            find(&c, "r.example:5000", f, &no_helper).unwrap(),
            login("alice", "s3cret")
        );
        assert_eq!(
            find(&c, "plain.example", f, &no_helper).unwrap(),
            login("bob", "pw")
        );
        let t = find(&c, "tok.example", f, &no_helper).unwrap().unwrap();
        let engine = t.for_engine("tok.example");
        assert_eq!(engine.identitytoken.as_deref(), Some("rt"));
        assert_eq!(engine.password, None);
        assert_eq!(find(&c, "other.example", f, &no_helper).unwrap(), None);
        assert!(!format!("{t:?}").contains("rt,"));
        assert!(!format!("{:?}", login("u", "hunter2")).contains("hunter2"));
    }

    #[test]
    fn helpers_come_first_then_auths_then_the_store() {
        let f = Path::new("config.json");
        let c = config(
            r#"{"auths": {"a.example": {"auth": "dTpw"}, "b.example": {}},
                "credHelpers": {"a.example": "ecr"}, "credsStore": "pass"}"#,
        );
        let helper = |name: &str, reg: &str| Ok(login(name, reg));
        assert_eq!(
            find(&c, "a.example", f, &helper).unwrap(),
            login("ecr", "a.example")
        );
        assert_eq!(
            find(&c, "b.example", f, &helper).unwrap(),
            login("pass", "b.example")
        );
        assert_eq!(
            find(&c, "c.example", f, &helper).unwrap(),
            login("pass", "c.example")
        );
    }

    #[test]
    fn a_damaged_auth_is_an_error_naming_the_file_and_registry() {
        let f = Path::new("/home/x/.docker/config.json");
        let c = config(r#"{"auths": {"r.example": {"auth": "not base64!"}}}"#);
        let e = find(&c, "r.example", f, &no_helper)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/home/x/.docker/config.json") && e.contains("r.example"),
            "{e}"
        );
    }
}
