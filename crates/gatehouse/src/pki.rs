//! A development PKI (`gatehouse pki init|issue`): a CA, Gatehouse's server certificate and
//! client certificates carrying a SPIFFE ID or a DNS name. ECDSA P-256, explicit validity,
//! random serials, key usages and EKUs; private keys written mode 0600. For production, use your
//! mesh's or cert-manager's CA: Gatehouse only needs PEM files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid name `{0}`: use letters, digits, `-`, `_` or `.`")]
    BadName(String),
    #[error("invalid SAN `{0}`")]
    BadSan(String),
    #[error("the operating system's random generator failed")]
    Random,
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// One subject alternative name.
#[derive(Clone, Debug)]
pub enum San {
    Uri(String),
    Dns(String),
    Ip(IpAddr),
}

/// What to put in a leaf certificate. Tests build odd ones (expired, two URIs, CA-flagged) on purpose.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub common_name: String,
    pub sans: Vec<San>,
    pub server: bool,
    pub client: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
}

impl LeafSpec {
    /// A client certificate valid from an hour ago for `days`.
    pub fn client(common_name: &str, sans: Vec<San>, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: common_name.into(),
            sans,
            server: false,
            client: true,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
            is_ca: false,
        }
    }
}

fn serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = crate::crypto::random_bytes::<16>().map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f; // positive INTEGER
    Ok(SerialNumber::from_slice(&bytes))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Gatehouse dev PKI");
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(cn: &str, days: i64) -> Result<CertificateParams, PkiError> {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
    p.serial_number = Some(serial()?);
    Ok(p)
}

/// A new self-signed CA.
pub fn new_ca(common_name: &str, days: i64) -> Result<Issued, PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params(common_name, days)?.self_signed(&key)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Issue a leaf signed by the CA (PEM cert and key).
pub fn issue(ca: &Issued, spec: &LeafSpec) -> Result<Issued, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&spec.common_name);
    p.not_before = spec.not_before;
    p.not_after = spec.not_after;
    p.serial_number = Some(serial()?);
    p.use_authority_key_identifier_extension = true;
    if spec.is_ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    } else {
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    if spec.server {
        p.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if spec.client {
        p.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    for san in &spec.sans {
        let s = match san {
            San::Uri(u) => SanType::URI(u.as_str().try_into().map_err(|_| PkiError::BadSan(u.clone()))?),
            San::Dns(d) => SanType::DnsName(d.as_str().try_into().map_err(|_| PkiError::BadSan(d.clone()))?),
            San::Ip(ip) => SanType::IpAddress(*ip),
        };
        p.subject_alt_names.push(s);
    }
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { path: path.to_path_buf(), source };
    #[cfg(unix)]
    if secret {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Created 0600 from the start: the key is never readable by others, not even briefly.
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        return f.write_all(text.as_bytes()).map_err(io);
    }
    let _ = secret;
    std::fs::write(path, text).map_err(io)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.');
    if ok { Ok(()) } else { Err(PkiError::BadName(name.into())) }
}

/// `gatehouse pki init --out DIR`: `ca.crt`, `ca.key`, and `gatehouse.crt`/`gatehouse.key` for
/// the internal listener (DNS `localhost`, IP `127.0.0.1`).
pub fn init(out: &Path) -> Result<Vec<PathBuf>, PkiError> {
    init_with_sans(out, &[])
}

/// `pki init --san NAME …`: the server certificate also names these (DNS names or IP
/// addresses), e.g. the in-cluster Service names `gatehouse-internal.auth.svc`.
pub fn init_with_sans(out: &Path, extra: &[String]) -> Result<Vec<PathBuf>, PkiError> {
    let mut sans = vec![San::Dns("localhost".into()), San::Ip(IpAddr::from([127, 0, 0, 1]))];
    for name in extra {
        sans.push(match name.parse::<IpAddr>() {
            Ok(ip) => San::Ip(ip),
            Err(_) => San::Dns(
                crate::tls::identity::parse_dns_name(name).map_err(|why| PkiError::BadSan(format!("{name}: {why}")))?,
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(|source| PkiError::Io { path: out.to_path_buf(), source })?;
    let ca = new_ca("Gatehouse dev CA", 365)?;
    let now = OffsetDateTime::now_utc();
    let server = issue(
        &ca,
        &LeafSpec {
            common_name: "gatehouse".into(),
            sans,
            server: true,
            client: false,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(90),
            is_ca: false,
        },
    )?;
    let files = [
        ("ca.crt", &ca.cert_pem, false),
        ("ca.key", &ca.key_pem, true),
        ("gatehouse.crt", &server.cert_pem, false),
        ("gatehouse.key", &server.key_pem, true),
    ];
    let mut written = Vec::new();
    for (name, text, secret) in files {
        let p = out.join(name);
        write(&p, text, secret)?;
        written.push(p);
    }
    Ok(written)
}

/// `gatehouse pki issue --ca DIR --name NAME (--spiffe ID | --dns NAME) --out DIR`.
pub fn issue_to_dir(ca_dir: &Path, name: &str, san: San, out: &Path) -> Result<Vec<PathBuf>, PkiError> {
    check_name(name)?;
    // The same rules the allow-list applies: a certificate Gatehouse would refuse is never issued.
    match &san {
        San::Uri(u) => {
            crate::tls::identity::parse_spiffe_id(u).map_err(|why| PkiError::BadSan(format!("{u}: {why}")))?;
        }
        San::Dns(d) => {
            crate::tls::identity::parse_dns_name(d).map_err(|why| PkiError::BadSan(format!("{d}: {why}")))?;
        }
        San::Ip(_) => {}
    }
    let ca = Issued { cert_pem: read(&ca_dir.join("ca.crt"))?, key_pem: read(&ca_dir.join("ca.key"))? };
    let leaf = issue(&ca, &LeafSpec::client(name, vec![san], 90))?;
    std::fs::create_dir_all(out).map_err(|source| PkiError::Io { path: out.to_path_buf(), source })?;
    let (crt, key) = (out.join(format!("{name}.crt")), out.join(format!("{name}.key")));
    write(&crt, &leaf.cert_pem, false)?;
    write(&key, &leaf.key_pem, true)?;
    Ok(vec![crt, key])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_issue_write_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        issue_to_dir(
            dir.path(),
            "pocketbase",
            San::Uri("spiffe://gatehouse.local/ns/data/sa/pocketbase".into()),
            dir.path(),
        )
        .unwrap();
        #[cfg(unix)]
        for key in ["ca.key", "gatehouse.key", "pocketbase.key"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        let pem = std::fs::read_to_string(dir.path().join("pocketbase.crt")).unwrap();
        let der = rustls_pki_types::CertificateDer::from(pem_der(&pem));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let validity = cert.validity();
        assert!(
            validity.not_after.timestamp() - validity.not_before.timestamp() < 100 * 86400,
            "explicit, short validity"
        );
        assert!(cert.raw_serial().len() >= 8, "random serial");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn bad_names_and_non_spiffe_uris_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(issue_to_dir(dir.path(), "../evil", San::Dns("x".into()), dir.path()).is_err());
        assert!(issue_to_dir(dir.path(), "svc", San::Uri("https://x".into()), dir.path()).is_err());
        // What the allow-list would refuse is never issued: one parser for both.
        for bad in ["spiffe://Cluster.local/ns/a", "spiffe://cluster.local:8443/ns/a", "spiffe://cluster.local/ns//a"] {
            assert!(issue_to_dir(dir.path(), "svc", San::Uri(bad.into()), dir.path()).is_err(), "{bad}");
            assert!(crate::tls::identity::parse_allow_entry(bad).is_err(), "{bad}");
        }
        for bad in ["Pocketbase.svc", "pocket_base.svc", "-x.svc", "a..b", "x.svc."] {
            assert!(issue_to_dir(dir.path(), "svc", San::Dns(bad.into()), dir.path()).is_err(), "{bad}");
            assert!(crate::tls::identity::parse_allow_entry(bad).is_err(), "{bad}");
        }
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }
}
