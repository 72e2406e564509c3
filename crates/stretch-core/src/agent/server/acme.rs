//! Certificates from an ACME directory (Let's Encrypt, or any RFC 8555 server) for
//! groups with `tls: {acme: …}`: one account per directory and email, HTTP-01
//! challenges answered on the agent's HTTP port, each certificate and its key kept in
//! `DATA_DIR/acme/` (0600) and renewed in the background before it expires.
//!
//! The directory is reached over HTTPS trusting the system's roots (or those of
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` when set). One order runs at a time, bounded by
//! [`ORDER_TIME`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

use super::certs::{served_from_pem, uncovered};
use super::edge::{CertSlot, Edge, Served};
use crate::log::Log;
use crate::{Error, Result};

/// Longest an order may take, challenges and issuance included.
pub const ORDER_TIME: Duration = Duration::from_secs(180);

/// A certificate a group wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub domains: Vec<String>,
    pub email: Option<String>,
    pub directory: String,
}

impl Want {
    /// The file name of its certificate: the first domain and a hash of the rest.
    fn name(&self) -> String {
        let mut domains = self.domains.clone();
        domains.sort();
        let hash = blake3::hash(format!("{}\n{}", self.directory, domains.join("\n")).as_bytes());
        let first: String = self
            .domains
            .first()
            .map(|d| {
                d.chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!("{first}-{}", &hash.to_hex()[..16])
    }
}

pub struct Acme {
    dir: PathBuf,
    edge: Arc<Edge>,
    renew_before: Duration,
    log: Log,
    /// Certificates in use, by [`Want::name`].
    slots: Mutex<HashMap<String, Arc<CertSlot>>>,
    orders: tokio::sync::Mutex<()>,
}

/// Our HTTPS client, as instant-acme's transport.
struct Https(Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>);

impl HttpClient for Https {
    fn request(
        &self,
        req: hyper::Request<BodyWrapper<Bytes>>,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = std::result::Result<BytesResponse, instant_acme::Error>,
                > + Send,
        >,
    > {
        let sent = self.0.request(req);
        Box::pin(async move {
            match sent.await {
                Ok(resp) => Ok(BytesResponse::from(resp)),
                Err(e) => Err(instant_acme::Error::Other(Box::new(e))),
            }
        })
    }
}

fn acme_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::failed("acme", format!("{what}: {e}"))
}

impl Acme {
    pub fn new(dir: PathBuf, edge: Arc<Edge>, renew_before: Duration, log: Log) -> Acme {
        Acme {
            dir,
            edge,
            renew_before,
            log,
            slots: Mutex::new(HashMap::new()),
            orders: tokio::sync::Mutex::new(()),
        }
    }

    /// The certificate for `want`: the one in use, else the stored one (even if due:
    /// renewal takes care of it), else a new order when `order` allows.
    pub async fn slot(&self, want: &Want, order: bool) -> Result<Arc<CertSlot>> {
        let name = want.name();
        if let Some(s) = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
        {
            return Ok(s.clone());
        }
        let served = match self.stored(want) {
            Some(s) if s.not_after > crate::util::unix_now() => s,
            _ if order => self.obtain(want).await?,
            _ => {
                return Err(Error::failed(
                    "acme",
                    format!("no valid certificate for {} yet", want.domains.join(", ")),
                ));
            }
        };
        let slot = CertSlot::new(served);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Ok(slots.entry(name).or_insert(slot).clone())
    }

    /// Renew what is due among `wants` (the ACME groups' certificates); a failure is
    /// logged, kept for `status`, and tried again at the next check.
    pub async fn renew_due(&self, wants: &[Want]) {
        for want in wants {
            let slot = {
                let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                slots.get(&want.name()).cloned()
            };
            let Some(slot) = slot else { continue };
            let left = slot.get().not_after - crate::util::unix_now();
            if left > self.renew_before.as_secs() as i64 {
                continue;
            }
            let names = want.domains.join(", ");
            self.log
                .line(format!("acme: renewing the certificate of {names}"));
            match self.obtain(want).await {
                Ok(served) => {
                    self.log.line(format!(
                        "acme: renewed {names}, valid until {}",
                        served.info.not_after
                    ));
                    slot.set(served);
                }
                Err(e) => {
                    self.log.line(format!("acme: renewing {names} failed: {e}"));
                    slot.renewal_failed(e.to_string());
                }
            }
        }
    }

    fn paths(&self, want: &Want) -> (PathBuf, PathBuf) {
        let name = want.name();
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }

    fn stored(&self, want: &Want) -> Option<Served> {
        let (cert, key) = self.paths(want);
        let cert = std::fs::read_to_string(cert).ok()?;
        let key = std::fs::read_to_string(key).ok()?;
        let served = served_from_pem(&cert, &key, "acme").ok()?;
        uncovered(&served.info.names, &want.domains)
            .is_empty()
            .then_some(served)
    }

    /// Order a certificate, bounded by [`ORDER_TIME`], and store it.
    async fn obtain(&self, want: &Want) -> Result<Served> {
        let _one = self.orders.lock().await;
        let names = want.domains.join(", ");
        self.log.line(format!(
            "acme: ordering a certificate for {names} from {}",
            want.directory
        ));
        let (cert, key) = tokio::time::timeout(ORDER_TIME, self.order(want))
            .await
            .map_err(|_| {
                acme_error(
                    &format!("the order for {names}"),
                    format!("not done after {}s", ORDER_TIME.as_secs()),
                )
            })??;
        let served = served_from_pem(&cert, &key, "acme")
            .map_err(|e| acme_error("the issued certificate", e))?;
        let (cert_path, key_path) = self.paths(want);
        self.create_dir()?;
        // Key first: a crash between the two leaves no certificate without its key.
        let write = |path: &PathBuf, data: &str| {
            crate::home::write_private(path, data.as_bytes())
                .map_err(|e| acme_error(&format!("cannot write `{}`", path.display()), e))
        };
        write(&key_path, &key)?;
        write(&cert_path, &cert)?;
        self.log.line(format!(
            "acme: certificate for {names} from {}, valid until {}",
            served.info.issuer, served.info.not_after
        ));
        Ok(served)
    }

    fn create_dir(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| acme_error(&format!("cannot create `{}`", self.dir.display()), e))
    }

    /// The certificate chain and key (PEM) of a new order.
    async fn order(&self, want: &Want) -> Result<(String, String)> {
        let account = self.account(want).await?;
        let identifiers: Vec<Identifier> = want
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| acme_error("the directory refused the order", e))?;
        let mut answering = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(next) = authorizations.next().await {
            let mut authz = next.map_err(|e| acme_error("reading an authorization", e))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(acme_error("an authorization", format!("it is {other:?}")));
                }
            }
            let domain = authz.identifier().to_string();
            let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| {
                acme_error(
                    &format!("the authorization of {domain}"),
                    "the directory offers no HTTP-01 challenge",
                )
            })?;
            let answer = challenge.key_authorization();
            answering.push(
                self.edge
                    .challenge(&challenge.token, answer.as_str())
                    .await?,
            );
            challenge
                .set_ready()
                .await
                .map_err(|e| acme_error(&format!("the challenge of {domain}"), e))?;
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(ORDER_TIME);
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(|e| acme_error("validating the challenges", e))?;
        if status != OrderStatus::Ready {
            return Err(acme_error(
                "validating the challenges",
                format!(
                    "the order is {status:?} (is port {} of this host reachable from the directory for the domains?)",
                    self.edge.http_port().unwrap_or(80)
                ),
            ));
        }
        let key = order
            .finalize()
            .await
            .map_err(|e| acme_error("finalizing the order", e))?;
        let chain = order
            .poll_certificate(&retries)
            .await
            .map_err(|e| acme_error("fetching the certificate", e))?;
        drop(answering);
        Ok((chain, key))
    }

    /// The account for the directory and email, made on first use and kept (0600).
    async fn account(&self, want: &Want) -> Result<Account> {
        let hash = blake3::hash(
            format!(
                "{}\n{}",
                want.directory,
                want.email.as_deref().unwrap_or_default()
            )
            .as_bytes(),
        );
        let path = self
            .dir
            .join(format!("account-{}.json", &hash.to_hex()[..16]));
        if let Ok(raw) = std::fs::read(&path)
            && let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&raw)
        {
            return Account::builder_with_http(Box::new(https_client()?))
                .from_credentials(creds)
                .await
                .map_err(|e| acme_error(&format!("the ACME directory {}", want.directory), e));
        }
        let contact = want.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, creds) = Account::builder_with_http(Box::new(https_client()?))
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                want.directory.clone(),
                None,
            )
            .await
            .map_err(|e| acme_error(&format!("the ACME directory {}", want.directory), e))?;
        self.create_dir()?;
        let raw = serde_json::to_vec(&creds).map_err(|e| acme_error("the account", e))?;
        crate::home::write_private(&path, &raw)
            .map_err(|e| acme_error(&format!("cannot write `{}`", path.display()), e))?;
        Ok(account)
    }
}

/// HTTPS only, to the system's roots (or `SSL_CERT_FILE`'s).
fn https_client() -> Result<Https> {
    let roots = crate::net::tls::system_roots();
    if roots.is_empty() {
        return Err(Error::failed(
            "acme",
            "no trusted root certificate on this host (install ca-certificates, or set SSL_CERT_FILE)",
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::net::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| acme_error("TLS setup", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Https(
        Client::builder(TokioExecutor::new()).build(connector),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_file_safe() {
        let w = |d: &[&str], dir: &str| Want {
            domains: d.iter().map(|s| s.to_string()).collect(),
            email: None,
            directory: dir.into(),
        };
        let a = w(
            &["shop.example.com", "www.shop.example.com"],
            "https://acme/dir",
        );
        let b = w(
            &["shop.example.com", "www.shop.example.com"],
            "https://acme/dir",
        );
        assert_eq!(a.name(), b.name());
        assert!(a.name().starts_with("shop.example.com-"));
        assert_ne!(
            a.name(),
            w(&["shop.example.com"], "https://acme/dir").name()
        );
        assert_ne!(
            a.name(),
            w(
                &["shop.example.com", "www.shop.example.com"],
                "https://other/dir"
            )
            .name()
        );
        assert!(
            w(&["*.example.com"], "d")
                .name()
                .starts_with("_.example.com-")
        );
    }
}
