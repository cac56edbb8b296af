//! Identities and trust. Each side has a key and a certificate (`smpft keygen`) and accepts its
//! peer one of two ways, on both sides (mutual TLS):
//! - **pinned**: the peer's own certificate (or its SHA-256 fingerprint), exchanged between each
//!   pair of hosts;
//! - **site CA**: any certificate that chains to the CA's (`--ca FILE`) and names the host the
//!   peer is expected to be (`--peer-name`), so a new host needs one signed certificate instead
//!   of an exchange with every other host (`smpft keygen --ca-sign`, or any CA).
//!
//! Nothing else is accepted: there is no "insecure" mode.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const KEY_FILE: &str = "key.pem";
pub const CERT_FILE: &str = "cert.pem";
/// In an identity a CA signed (`smpft keygen --ca-sign`): the CA's certificate, for `--ca`.
pub const CA_FILE: &str = "ca.pem";

/// Who signs a new certificate.
pub enum Issuer {
    /// The key itself (a pinned identity).
    SelfSigned,
    /// The key itself, as a new CA that may sign others.
    NewCa,
    /// A CA: its certificate and its key (PEM).
    Ca { cert: CertificateDer<'static>, key_pem: String },
}

impl Issuer {
    /// The CA in `DIR/cert.pem` and `DIR/key.pem` (made by `smpft keygen --new-ca`, or any CA's
    /// files put there); refused if its certificate may not sign others.
    pub fn ca_dir(dir: &Path) -> Result<Issuer, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let cert = load_cert(&cert_path)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|_| IdentityError::BadCert { path: cert_path.clone() })?;
        if !parsed.is_ca() {
            return Err(IdentityError::NotCa { path: cert_path });
        }
        let key_path = dir.join(KEY_FILE);
        let key_pem = String::from_utf8_lossy(&read(&key_path)?).into_owned();
        Ok(Issuer::Ca { cert, key_pem })
    }
}

/// A certificate as PEM text.
fn pem_of(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCert { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path} is not a valid X.509 certificate")]
    BadCert { path: PathBuf },
    #[error("'{0}' is not a certificate fingerprint; use sha256:<64 hex digits>")]
    BadFingerprint(String),
    #[error("cannot generate a key pair: {0}")]
    Generate(String),
    #[error("{dir} already holds an identity; remove it first to replace it")]
    Exists { dir: PathBuf },
    #[error("{path} is not a CA certificate (it may not sign others)")]
    NotCa { path: PathBuf },
    #[error("'{0}' is not a host name a certificate can name")]
    BadName(String),
}

/// This side's key and certificate.
#[derive(Debug)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// Certificates between `cert` and a CA's, presented with it (the rest of cert.pem).
    pub chain: Vec<CertificateDer<'static>>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { cert: self.cert.clone(), key: self.key.clone_key(), chain: self.chain.clone() }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read { path: path.to_path_buf(), source })
}

/// Reads the first certificate of a PEM file and checks that it parses as X.509.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, IdentityError> {
    let mut certs = load_certs(path)?;
    Ok(certs.remove(0))
}

/// Every certificate of a PEM file, in order (at least one), each checked to parse as X.509.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice()).map_while(Result::ok).collect();
    if certs.is_empty() {
        return Err(IdentityError::NoCert { path: path.to_path_buf() });
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c).map_err(|_| IdentityError::BadCert { path: path.to_path_buf() })?;
    }
    Ok(certs)
}

impl Identity {
    /// Loads `DIR/key.pem` and `DIR/cert.pem`.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let mut chain = load_certs(&dir.join(CERT_FILE))?;
        let cert = chain.remove(0);
        let key_path = dir.join(KEY_FILE);
        let pem = read(&key_path)?;
        let key = rustls_pemfile::private_key(&mut pem.as_slice())
            .ok()
            .flatten()
            .ok_or(IdentityError::NoKey { path: key_path })?;
        Ok(Identity { cert, key, chain })
    }

    /// A new key and self-signed certificate for `name`, valid for `days` from now.
    pub fn generate(name: &str, days: i64) -> Result<(Identity, String, String), IdentityError> {
        let now = time_now();
        Self::generate_valid(name, now - 60, now + days * 86_400)
    }

    /// As [`Identity::generate`], valid between two Unix times (tests make expired ones).
    pub fn generate_valid(
        name: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<(Identity, String, String), IdentityError> {
        Self::generate_as(name, not_before, not_after, &Issuer::SelfSigned)
    }

    /// A new key and a certificate for `name` that `issuer` signs (or a new CA's).
    pub fn generate_as(
        name: &str,
        not_before: i64,
        not_after: i64,
        issuer: &Issuer,
    ) -> Result<(Identity, String, String), IdentityError> {
        use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose as Eku, IsCa, KeyUsagePurpose as Ku};
        let gen = |e: rcgen::Error| IdentityError::Generate(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let mut params = match issuer {
            Issuer::NewCa => rcgen::CertificateParams::default(),
            _ => {
                ServerName::try_from(name.to_string()).map_err(|_| IdentityError::BadName(name.to_string()))?;
                rcgen::CertificateParams::new(vec![name.to_string()]).map_err(gen)?
            }
        };
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_before.max(0) as u64);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_after.max(0) as u64);
        let cert = match issuer {
            Issuer::SelfSigned => params.self_signed(&key).map_err(gen)?,
            Issuer::NewCa => {
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
                params.self_signed(&key).map_err(gen)?
            }
            Issuer::Ca { cert, key_pem } => {
                params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
                params.key_usages = vec![Ku::DigitalSignature];
                let ca_key = rcgen::KeyPair::from_pem(key_pem).map_err(gen)?;
                let ca =
                    rcgen::CertificateParams::from_ca_cert_der(cert).map_err(gen)?.self_signed(&ca_key).map_err(gen)?;
                params.signed_by(&key, &ca, &ca_key).map_err(gen)?
            }
        };
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((Identity { cert: cert.der().clone(), key, chain: Vec::new() }, cert_pem, key_pem))
    }

    /// Writes a new identity to `DIR/key.pem` (mode 0600) and `DIR/cert.pem`; refuses to
    /// overwrite one. Returns the certificate's fingerprint.
    pub fn generate_into(dir: &Path, name: &str, days: i64) -> Result<String, IdentityError> {
        Self::generate_into_as(dir, name, days, &Issuer::SelfSigned)
    }

    /// As [`Identity::generate_into`], the certificate signed by `issuer` (whose certificate is
    /// then copied to `DIR/ca.pem`, the file `--ca` names) or a new CA's.
    pub fn generate_into_as(dir: &Path, name: &str, days: i64, issuer: &Issuer) -> Result<String, IdentityError> {
        if dir.join(KEY_FILE).exists() || dir.join(CERT_FILE).exists() {
            return Err(IdentityError::Exists { dir: dir.to_path_buf() });
        }
        let write_err = |path: PathBuf| move |source| IdentityError::Write { path, source };
        std::fs::create_dir_all(dir).map_err(write_err(dir.to_path_buf()))?;
        let now = time_now();
        let (id, cert_pem, key_pem) = Identity::generate_as(name, now - 60, now + days * 86_400, issuer)?;
        let key_path = dir.join(KEY_FILE);
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(write_err(key_path.clone()))?;
            f.write_all(key_pem.as_bytes()).map_err(write_err(key_path.clone()))?;
        }
        let cert_path = dir.join(CERT_FILE);
        std::fs::write(&cert_path, cert_pem).map_err(write_err(cert_path.clone()))?;
        if let Issuer::Ca { cert, .. } = issuer {
            let ca_path = dir.join(CA_FILE);
            std::fs::write(&ca_path, pem_of(cert)).map_err(write_err(ca_path.clone()))?;
        }
        Ok(fingerprint(&id.cert))
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// The certificates shown to the peer: this side's, then its chain.
    fn presented(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.cert.clone()).chain(self.chain.iter().cloned()).collect()
    }
}

fn time_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `sha256:<hex>` of a certificate's DER.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let mut s = String::from("sha256:");
    for b in sha256(cert) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Which peer this side accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerTrust {
    /// Exactly this certificate.
    Cert(Vec<u8>),
    /// A certificate with this SHA-256 fingerprint.
    Fingerprint([u8; 32]),
    /// A certificate that chains to one of these CA certificates (DER) and names `name`.
    Ca { roots: Vec<Vec<u8>>, name: String },
}

/// Which side of the TLS handshake the peer is (the key usage its certificate must allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerRole {
    Client,
    Server,
}

impl PeerTrust {
    /// `sha256:<hex>` or the path of the peer's PEM certificate.
    pub fn parse(s: &str) -> Result<PeerTrust, IdentityError> {
        if let Some(hex) = s.strip_prefix("sha256:") {
            let bad = || IdentityError::BadFingerprint(s.to_string());
            if hex.len() != 64 {
                return Err(bad());
            }
            let mut fp = [0u8; 32];
            for (i, b) in fp.iter_mut().enumerate() {
                *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
            }
            return Ok(PeerTrust::Fingerprint(fp));
        }
        Ok(PeerTrust::Cert(load_cert(Path::new(s))?.to_vec()))
    }

    /// The CA certificates in the PEM file `ca` (every one is a root), and the host name the
    /// peer's certificate must carry.
    pub fn ca(ca: &Path, name: &str) -> Result<PeerTrust, IdentityError> {
        ServerName::try_from(name.to_string()).map_err(|_| IdentityError::BadName(name.to_string()))?;
        let roots = load_certs(ca)?;
        for r in &roots {
            webpki::anchor_from_trusted_cert(r).map_err(|_| IdentityError::BadCert { path: ca.to_path_buf() })?;
        }
        Ok(PeerTrust::Ca { roots: roots.into_iter().map(|r| r.to_vec()).collect(), name: name.to_string() })
    }

    fn check(
        &self,
        cert: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
        provider: &CryptoProvider,
    ) -> Result<(), TlsError> {
        let matches = match self {
            PeerTrust::Cert(der) => der.as_slice() == cert.as_ref(),
            PeerTrust::Fingerprint(fp) => sha256(cert) == *fp,
            PeerTrust::Ca { roots, name } => return chains_to(roots, name, cert, intermediates, now, role, provider),
        };
        if !matches {
            return Err(TlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
        let now = now.as_secs() as i64;
        let validity = parsed.validity();
        if now < validity.not_before.timestamp() {
            return Err(TlsError::InvalidCertificate(CertificateError::NotValidYet));
        }
        if now > validity.not_after.timestamp() {
            return Err(TlsError::InvalidCertificate(CertificateError::Expired));
        }
        Ok(())
    }
}

/// Whether `cert` chains to one of `roots` (through `intermediates`), is valid `now` for its
/// `role`, and names the host `name`: the checks of rustls's own verifier (webpki), with the
/// expected name given here instead of taken from the connection.
fn chains_to(
    roots: &[Vec<u8>],
    name: &str,
    cert: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
    provider: &CryptoProvider,
) -> Result<(), TlsError> {
    let bad = |e: webpki::Error| TlsError::InvalidCertificate(cert_error(e));
    let roots: Vec<CertificateDer<'_>> = roots.iter().map(|r| CertificateDer::from(r.as_slice())).collect();
    let anchors = roots.iter().map(webpki::anchor_from_trusted_cert).collect::<Result<Vec<_>, _>>().map_err(bad)?;
    let ee = webpki::EndEntityCert::try_from(cert).map_err(bad)?;
    let usage = match role {
        PeerRole::Client => webpki::KeyUsage::client_auth(),
        PeerRole::Server => webpki::KeyUsage::server_auth(),
    };
    let algs = provider.signature_verification_algorithms.all;
    ee.verify_for_usage(algs, &anchors, intermediates, now, usage, None, None).map_err(bad)?;
    let expected = ServerName::try_from(name).map_err(|_| TlsError::General(format!("'{name}' is not a host name")))?;
    ee.verify_is_valid_for_subject_name(&expected).map_err(|e| match e {
        webpki::Error::CertNotValidForName(_) => {
            TlsError::General(format!("the peer's certificate does not name {name}"))
        }
        e => bad(e),
    })
}

/// rustls's words for webpki's errors (the ones a misconfigured peer causes).
fn cert_error(e: webpki::Error) -> CertificateError {
    match e {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::CertNotValidForName(_) => CertificateError::NotValidForName,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    }
}

/// Accepts exactly the pinned peer, in either role.
#[derive(Debug)]
pub struct PinnedVerifier {
    trust: PeerTrust,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub fn new(trust: PeerTrust, provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(PinnedVerifier { trust, provider })
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.trust
            .check(end_entity, intermediates, now, PeerRole::Server, &self.provider)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.trust
            .check(end_entity, intermediates, now, PeerRole::Client, &self.provider)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// TLS 1.3 client configuration: presents `id`, accepts only `trust` (used by the QUIC channel
/// and by the TLS-over-TCP benchmark baseline).
pub fn tls_client(id: &Identity, trust: &PeerTrust) -> Result<rustls::ClientConfig, TlsError> {
    let p = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(PinnedVerifier::new(trust.clone(), p))
        .with_client_auth_cert(id.presented(), id.key.clone_key())
}

/// TLS 1.3 server configuration requiring the client certificate `trust` names.
pub fn tls_server(id: &Identity, trust: &PeerTrust) -> Result<rustls::ServerConfig, TlsError> {
    let p = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(PinnedVerifier::new(trust.clone(), p))
        .with_single_cert(id.presented(), id.key.clone_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_load_and_fingerprint() {
        let dir = std::env::temp_dir().join(format!("smpft-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fp = Identity::generate_into(&dir, "primary", 30).unwrap();
        let id = Identity::load(&dir).unwrap();
        assert_eq!(id.fingerprint(), fp);
        assert!(matches!(Identity::generate_into(&dir, "primary", 30), Err(IdentityError::Exists { .. })));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(PeerTrust::parse(&fp).unwrap(), PeerTrust::Fingerprint(sha256(&id.cert)));
        assert_eq!(PeerTrust::parse(dir.join(CERT_FILE).to_str().unwrap()).unwrap(), PeerTrust::Cert(id.cert.to_vec()));
        std::fs::write(dir.join("garbage.pem"), "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n")
            .unwrap();
        assert!(matches!(
            PeerTrust::parse(dir.join("garbage.pem").to_str().unwrap()),
            Err(IdentityError::BadCert { .. })
        ));
        assert!(matches!(PeerTrust::parse("sha256:abc"), Err(IdentityError::BadFingerprint(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn trust_checks_identity_and_validity() {
        let (a, _, _) = Identity::generate("a", 1).unwrap();
        let (b, _, _) = Identity::generate("b", 1).unwrap();
        let now = UnixTime::now();
        let p = rustls::crypto::ring::default_provider();
        let check = |t: &PeerTrust, c: &CertificateDer<'_>| t.check(c, &[], now, PeerRole::Server, &p);
        let t = PeerTrust::Cert(a.cert.to_vec());
        assert!(check(&t, &a.cert).is_ok());
        assert!(check(&t, &b.cert).is_err());
        let past = time_now() - 10 * 86_400;
        let (old, _, _) = Identity::generate_valid("old", past - 86_400, past).unwrap();
        let t = PeerTrust::Cert(old.cert.to_vec());
        assert_eq!(check(&t, &old.cert), Err(TlsError::InvalidCertificate(CertificateError::Expired)));
    }

    #[test]
    fn a_site_ca_admits_the_host_it_names_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, other_ca) = (dir.path().join("ca"), dir.path().join("other-ca"));
        Identity::generate_into_as(&ca, "site CA", 30, &Issuer::NewCa).unwrap();
        Identity::generate_into_as(&other_ca, "other CA", 30, &Issuer::NewCa).unwrap();
        let sign = |by: &Path, host: &str| {
            let out = dir.path().join(format!("{host}-by-{}", by.file_name().unwrap().to_string_lossy()));
            Identity::generate_into_as(&out, host, 30, &Issuer::ca_dir(by).unwrap()).unwrap();
            out
        };
        let (a, b, b_other) = (sign(&ca, "host-a"), sign(&ca, "host-b"), sign(&other_ca, "host-b"));
        let pinned_b = dir.path().join("pinned-b");
        Identity::generate_into(&pinned_b, "host-b", 30).unwrap();
        // What `keygen --ca-sign` leaves beside the identity is the file `--ca` names.
        assert_eq!(load_cert(&b.join(CA_FILE)).unwrap(), load_cert(&ca.join(CERT_FILE)).unwrap());
        let trust = PeerTrust::ca(&a.join(CA_FILE), "host-b").unwrap();
        let p = rustls::crypto::ring::default_provider();
        let now = UnixTime::now();
        let check = |dir: &Path, role| trust.check(&Identity::load(dir).unwrap().cert, &[], now, role, &p);
        for role in [PeerRole::Client, PeerRole::Server] {
            assert_eq!(check(&b, role), Ok(()), "{role:?}");
            let e = |c: CertificateError| Err(TlsError::InvalidCertificate(c));
            assert_eq!(check(&b_other, role), e(CertificateError::UnknownIssuer), "another CA's");
            assert_eq!(check(&pinned_b, role), e(CertificateError::UnknownIssuer), "self-signed");
            let wrong = check(&a, role).unwrap_err().to_string();
            assert!(wrong.contains("does not name host-b"), "another host's: {wrong}");
        }
        // A host's certificate cannot sign others; names a certificate cannot carry are refused.
        assert!(matches!(Issuer::ca_dir(&a), Err(IdentityError::NotCa { .. })));
        assert!(matches!(PeerTrust::ca(&a.join(CA_FILE), "not a name"), Err(IdentityError::BadName(_))));
        assert!(matches!(PeerTrust::ca(&dir.path().join("none.pem"), "host-b"), Err(IdentityError::Read { .. })));
    }
}
