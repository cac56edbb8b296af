//! Identities and trust. Each side has a key and a self-signed certificate (`smpft keygen`) and
//! is configured with its peer's certificate (or its SHA-256 fingerprint). The TLS verifiers
//! accept exactly that peer, on both sides (mutual TLS), and nothing else: there is no
//! "insecure" mode.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const KEY_FILE: &str = "key.pem";
pub const CERT_FILE: &str = "cert.pem";

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
}

/// This side's key and certificate.
#[derive(Debug)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { cert: self.cert.clone(), key: self.key.clone_key() }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read { path: path.to_path_buf(), source })
}

/// Reads the first certificate of a PEM file and checks that it parses as X.509.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, IdentityError> {
    let pem = read(path)?;
    let cert = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| IdentityError::NoCert { path: path.to_path_buf() })?;
    x509_parser::parse_x509_certificate(&cert).map_err(|_| IdentityError::BadCert { path: path.to_path_buf() })?;
    Ok(cert)
}

impl Identity {
    /// Loads `DIR/key.pem` and `DIR/cert.pem`.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let cert = load_cert(&dir.join(CERT_FILE))?;
        let key_path = dir.join(KEY_FILE);
        let pem = read(&key_path)?;
        let key = rustls_pemfile::private_key(&mut pem.as_slice())
            .ok()
            .flatten()
            .ok_or(IdentityError::NoKey { path: key_path })?;
        Ok(Identity { cert, key })
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
        let gen = |e: rcgen::Error| IdentityError::Generate(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(gen)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_before.max(0) as u64);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_after.max(0) as u64);
        let cert = params.self_signed(&key).map_err(gen)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let id = Identity { cert: cert.der().clone(), key: PrivateKeyDer::Pkcs8(key.serialize_der().into()) };
        Ok((id, cert_pem, key_pem))
    }

    /// Writes a new identity to `DIR/key.pem` (mode 0600) and `DIR/cert.pem`; refuses to
    /// overwrite one. Returns the certificate's fingerprint.
    pub fn generate_into(dir: &Path, name: &str, days: i64) -> Result<String, IdentityError> {
        if dir.join(KEY_FILE).exists() || dir.join(CERT_FILE).exists() {
            return Err(IdentityError::Exists { dir: dir.to_path_buf() });
        }
        let write_err = |path: PathBuf| move |source| IdentityError::Write { path, source };
        std::fs::create_dir_all(dir).map_err(write_err(dir.to_path_buf()))?;
        let (id, cert_pem, key_pem) = Identity::generate(name, days)?;
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
        Ok(fingerprint(&id.cert))
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
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

    fn check(&self, cert: &CertificateDer<'_>, now: UnixTime) -> Result<(), TlsError> {
        let matches = match self {
            PeerTrust::Cert(der) => der.as_slice() == cert.as_ref(),
            PeerTrust::Fingerprint(fp) => sha256(cert) == *fp,
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
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.trust.check(end_entity, now).map(|()| ServerCertVerified::assertion())
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
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.trust.check(end_entity, now).map(|()| ClientCertVerified::assertion())
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
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
}

/// TLS 1.3 server configuration requiring the client certificate `trust` names.
pub fn tls_server(id: &Identity, trust: &PeerTrust) -> Result<rustls::ServerConfig, TlsError> {
    let p = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(PinnedVerifier::new(trust.clone(), p))
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
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
        let t = PeerTrust::Cert(a.cert.to_vec());
        assert!(t.check(&a.cert, now).is_ok());
        assert!(t.check(&b.cert, now).is_err());
        let past = time_now() - 10 * 86_400;
        let (old, _, _) = Identity::generate_valid("old", past - 86_400, past).unwrap();
        let t = PeerTrust::Cert(old.cert.to_vec());
        assert_eq!(t.check(&old.cert, now), Err(TlsError::InvalidCertificate(CertificateError::Expired)));
    }
}
