//! TLS with rustls (ring): a server's identity (made on first start, or an operator's
//! certificate), and the client side's trust in a peer — a pinned fingerprint, trust on
//! first use, or certificate authorities.
//!
//! A fingerprint is `sha256:` + 64 lowercase hex digits, the SHA-256 of the leaf
//! certificate's DER, as `openssl x509 -fingerprint -sha256` computes it. Pinning
//! checks only that: like ssh host keys, a pinned certificate's names and dates do not
//! matter, and the key stays the agent's identity until an operator replaces it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

use crate::{Error, Result};

/// The crypto every config of ours uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sha256:` + hex of the SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = sha2::Sha256::digest(der);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A fingerprint as written by a user, normalized (lowercase; `:` between hex pairs,
/// as openssl prints them, allowed), or `None` when it is not one.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let text = text.trim();
    let (algo, hex) = text.split_once(':')?;
    if !algo.eq_ignore_ascii_case("sha256") {
        return None;
    }
    let hex: String = hex.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("sha256:{}", hex.to_ascii_lowercase()))
}

// ---------------------------------------------------------------------------------------
// server identity

/// A server's certificate chain and key. No `Debug`: it holds the private key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The leaf certificate's fingerprint.
    pub fn fingerprint(&self) -> String {
        self.chain
            .first()
            .map(|c| fingerprint(c.as_ref()))
            .unwrap_or_default()
    }

    /// An operator's certificate (PEM, leaf first, chain after) and key (PEM).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Identity> {
        let bad = |what: &Path, e: String| {
            Error::invalid(format!("cannot read TLS file `{}`: {e}", what.display()))
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, e.to_string()))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(bad(cert, "no PEM certificate in it".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
        let id = Identity { chain, key };
        id.server_config()?;
        Ok(id)
    }

    /// The identity kept in `dir` (`cert.pem`, `key.pem` 0600), made on first use: a
    /// self-signed ECDSA P-256 certificate. Returns it and whether it was just made.
    pub fn load_or_create(dir: &Path, subject: &str) -> Result<(Identity, bool)> {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        if cert.exists() && key.exists() {
            return Ok((Identity::from_files(&cert, &key)?, false));
        }
        let fail = |e: String| Error::failed("tls", format!("cannot make a TLS key: {e}"));
        let pair = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![subject.to_string()])
            .map_err(|e| fail(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, subject);
        let made = params.self_signed(&pair).map_err(|e| fail(e.to_string()))?;
        create_private_dir(dir)?;
        let write = |path: &PathBuf, data: &str| {
            crate::home::write_private(path, data.as_bytes()).map_err(|e| {
                Error::failed("tls", format!("cannot write `{}`: {e}", path.display()))
            })
        };
        // Key first: a crash between the two leaves no certificate without its key.
        write(&key, &pair.serialize_pem())?;
        write(&cert, &made.pem())?;
        Ok((Identity::from_files(&cert, &key)?, true))
    }

    /// A rustls server config for HTTP/1.1.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::failed("tls", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error::invalid(format!("the TLS certificate and key do not fit: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A TLS acceptor for listeners.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        Ok(tokio_rustls::TlsAcceptor::from(self.server_config()?))
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::failed("tls", format!("cannot create `{}`: {e}", dir.display())))
}

// ---------------------------------------------------------------------------------------
// client trust

/// Certificates of a PEM file (an operator's CA), for [`Expect::Roots`].
pub fn roots_from_pem(path: &Path) -> Result<RootCertStore> {
    let bad =
        |e: String| Error::invalid(format!("cannot read the CA file `{}`: {e}", path.display()));
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(roots)
}

/// The operating system's trusted roots (an empty set when it has none).
pub fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(found.certs);
    roots
}

/// What a client expects of the certificate a server presents.
#[derive(Clone)]
pub enum Expect {
    /// The leaf's fingerprint must be this one.
    Pinned(String),
    /// Trust on first use: the fingerprint recorded at the first contact, if any.
    /// Without one, any certificate is accepted (and should be recorded after).
    FirstUse(Option<String>),
    /// A chain to these roots, for the name the client connects to; or exactly one
    /// of these certificates (fingerprints): a server's own self-signed certificate
    /// given as a CA file, which the chain check refuses to see as a server's own.
    Roots(Arc<RootCertStore>, Vec<String>),
}

impl std::fmt::Debug for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Pinned(p) => write!(f, "Pinned({p})"),
            Expect::FirstUse(p) => write!(f, "FirstUse({p:?})"),
            Expect::Roots(r, exact) => {
                write!(f, "Roots({} certificates, {} exact)", r.len(), exact.len())
            }
        }
    }
}

/// Why a server's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Its fingerprint is not the expected one.
    Mismatch { expected: String, presented: String },
    /// No chain to the trusted roots (or not for this name).
    Untrusted { presented: String, reason: String },
}

/// The verifier of one client: checks what [`Expect`] says and remembers what it saw,
/// so that a refused handshake can be explained and a first contact recorded.
#[derive(Debug)]
pub struct PeerCheck {
    expect: Expect,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<String>>,
    refusal: Mutex<Option<Refusal>>,
    handshakes: std::sync::atomic::AtomicUsize,
    /// Trust on first use: the certificate of this client's first handshake, which
    /// every later handshake (a reconnection) must present again.
    first: Mutex<Option<String>>,
}

impl PeerCheck {
    pub fn new(expect: Expect) -> Result<Arc<PeerCheck>> {
        let provider = provider();
        let webpki = match &expect {
            Expect::Roots(roots, _) => Some(
                WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| Error::invalid(format!("bad trusted certificates: {e}")))?,
            ),
            _ => None,
        };
        Ok(Arc::new(PeerCheck {
            expect,
            webpki,
            provider,
            seen: Mutex::new(None),
            refusal: Mutex::new(None),
            handshakes: std::sync::atomic::AtomicUsize::new(0),
            first: Mutex::new(None),
        }))
    }

    /// The fingerprint the server presented last, if a handshake got that far.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().ok().and_then(|s| s.clone())
    }

    /// How many certificates this check saw: full handshakes (resumed ones show none).
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the last refused certificate was refused.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal.lock().ok().and_then(|s| s.clone())
    }

    /// A rustls client config using this check (no ALPN: hyper-rustls sets it).
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig> {
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::failed("tls", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        Ok(config)
    }

    fn refuse(&self, r: Refusal) -> rustls::Error {
        if let Ok(mut slot) = self.refusal.lock() {
            *slot = Some(r);
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    }
}

impl ServerCertVerifier for PeerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint(end_entity.as_ref());
        self.handshakes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(presented.clone());
        }
        let first;
        let expected = match &self.expect {
            Expect::Pinned(p) | Expect::FirstUse(Some(p)) => Some(p),
            Expect::FirstUse(None) => {
                let mut slot = self.first.lock().unwrap_or_else(|e| e.into_inner());
                first = slot.get_or_insert_with(|| presented.clone()).clone();
                Some(&first)
            }
            Expect::Roots(_, exact) if exact.contains(&presented) => {
                return Ok(ServerCertVerified::assertion());
            }
            Expect::Roots(..) => {
                let Some(webpki) = &self.webpki else {
                    return Err(rustls::Error::General("no trusted roots".into()));
                };
                return webpki
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                    .map_err(|e| {
                        self.refuse(Refusal::Untrusted {
                            presented,
                            reason: e.to_string(),
                        })
                    });
            }
        };
        match expected {
            Some(p) if *p != presented => Err(self.refuse(Refusal::Mismatch {
                expected: p.clone(),
                presented,
            })),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_and_normalize() {
        let hex = "AB".repeat(32);
        assert_eq!(
            parse_fingerprint(&format!("sha256:{hex}")),
            Some(format!("sha256:{}", "ab".repeat(32)))
        );
        let colons: Vec<String> = (0..32).map(|_| "ab".to_string()).collect();
        assert_eq!(
            parse_fingerprint(&format!("SHA256:{}", colons.join(":"))),
            Some(format!("sha256:{}", "ab".repeat(32)))
        );
        for bad in [
            "",
            "sha256:",
            "sha1:abcd",
            &format!("sha256:{}", "ab".repeat(31)),
            &format!("sha256:{}zz", "ab".repeat(31)),
            &"ab".repeat(32),
        ] {
            assert_eq!(parse_fingerprint(bad), None, "{bad}");
        }
    }

    #[test]
    fn identity_is_made_once_private_and_fingerprinted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let (a, made) = Identity::load_or_create(&tls, "stretch-agent").unwrap();
        assert!(made);
        let (b, made) = Identity::load_or_create(&tls, "stretch-agent").unwrap();
        assert!(!made);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(parse_fingerprint(&a.fingerprint()).is_some());
        let mode = std::fs::metadata(tls.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&tls).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn pinned_check_refuses_another_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(dir.path(), "x").unwrap();
        let name = ServerName::try_from("x").unwrap();
        let now = UnixTime::now();
        let leaf = &id.chain[0];

        let ok = PeerCheck::new(Expect::Pinned(id.fingerprint())).unwrap();
        assert!(ok.verify_server_cert(leaf, &[], &name, &[], now).is_ok());

        let other = format!("sha256:{}", "0".repeat(64));
        let pinned = PeerCheck::new(Expect::Pinned(other.clone())).unwrap();
        assert!(
            pinned
                .verify_server_cert(leaf, &[], &name, &[], now)
                .is_err()
        );
        assert_eq!(
            pinned.refusal(),
            Some(Refusal::Mismatch {
                expected: other,
                presented: id.fingerprint()
            })
        );

        let first = PeerCheck::new(Expect::FirstUse(None)).unwrap();
        assert!(first.verify_server_cert(leaf, &[], &name, &[], now).is_ok());
        assert_eq!(first.seen(), Some(id.fingerprint()));
        // A reconnection of the same client must meet the same certificate.
        let other_dir = tempfile::tempdir().unwrap();
        let (other_id, _) = Identity::load_or_create(other_dir.path(), "x").unwrap();
        assert!(
            first
                .verify_server_cert(&other_id.chain[0], &[], &name, &[], now)
                .is_err()
        );
        assert!(first.verify_server_cert(leaf, &[], &name, &[], now).is_ok());

        let roots = Arc::new(RootCertStore::empty());
        assert!(PeerCheck::new(Expect::Roots(roots, vec![])).is_err());
    }
}
