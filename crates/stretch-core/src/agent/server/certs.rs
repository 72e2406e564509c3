//! Certificates the edge presents: read from PEM (a release's files or the ACME
//! store), checked (the key fits, the names cover the group's domains, not expired),
//! and described for `status` (names, issuer, expiry).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::edge::{Served, certified};
use crate::agent::api::CertificateStatus;

/// A chain (leaf first) and its key, PEM, ready to serve. `source` says where it
/// came from (`release` or `acme`).
pub fn served_from_pem(cert: &str, key: &str, source: &str) -> Result<Served, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err("the certificate file holds no PEM certificate".into());
    };
    let (info, not_after) = describe(leaf.as_ref(), source)?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| format!("the key is not a PEM private key: {e}"))?;
    Ok(Served {
        key: certified(chain, key)?,
        info,
        not_after,
    })
}

/// What `status` shows of a leaf certificate, and its expiry (Unix seconds).
pub fn describe(der: &[u8], source: &str) -> Result<(CertificateStatus, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate cannot be read: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        // Old-style certificates name their host in the subject's common name only.
        for cn in cert.subject().iter_common_name() {
            if let Ok(n) = cn.as_str() {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    let not_after = cert.validity().not_after.timestamp();
    Ok((
        CertificateStatus {
            names,
            issuer: cert.issuer().to_string(),
            not_after: crate::util::rfc3339(not_after, 0),
            source: source.to_string(),
            renewal_error: None,
        },
        not_after,
    ))
}

/// Whether certificate name `pattern` (maybe `*.example.com`) covers host `name`.
fn name_covers(pattern: &str, name: &str) -> bool {
    if pattern == name {
        return true;
    }
    match (pattern.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => !label.is_empty() && rest == suffix,
        _ => false,
    }
}

/// The domains that none of `names` covers.
pub fn uncovered<'a>(names: &[String], domains: &'a [String]) -> Vec<&'a str> {
    domains
        .iter()
        .filter(|d| !names.iter().any(|n| name_covers(n, d) || *n == **d))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(names: &[&str]) -> (String, String) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&pair).unwrap();
        (cert.pem(), pair.serialize_pem())
    }

    #[test]
    fn a_certificate_is_described_and_checked() {
        let (cert, key) = make(&["shop.example.com", "*.shop.example.com"]);
        let served = served_from_pem(&cert, &key, "release").unwrap();
        assert_eq!(
            served.info.names,
            ["shop.example.com", "*.shop.example.com"]
        );
        assert_eq!(served.info.source, "release");
        assert!(
            served.info.not_after.ends_with('Z'),
            "{}",
            served.info.not_after
        );
        let d = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            uncovered(
                &served.info.names,
                &d(&["shop.example.com", "www.shop.example.com"])
            )
            .is_empty()
        );
        assert_eq!(
            uncovered(
                &served.info.names,
                &d(&["a.b.shop.example.com", "example.com"])
            ),
            ["a.b.shop.example.com", "example.com"]
        );

        let (_, other_key) = make(&["x"]);
        let why = served_from_pem(&cert, &other_key, "release").err().unwrap();
        assert!(why.contains("does not belong"), "{why}");
        let why = served_from_pem("nothing here", &key, "release")
            .err()
            .unwrap();
        assert!(why.contains("no PEM certificate"), "{why}");
        let why = served_from_pem(&cert, "not a key", "release")
            .err()
            .unwrap();
        assert!(why.contains("not a PEM private key"), "{why}");
    }
}
