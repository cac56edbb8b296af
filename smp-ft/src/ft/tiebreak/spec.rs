//! Where a VM's tie-breaker record is, as `--tiebreak` and `<smpft:tiebreak>` name it: a path,
//! or `etcd://HOST:PORT[,HOST:PORT...]/KEY-PREFIX/VM[?cacert=CA.pem&cert=CERT.pem&key=KEY.pem]`.
//!
//! With `cacert` the members are reached over TLS and must present a certificate the CA signed
//! for the address they are reached at; `cert` and `key` (both or neither) are this host's
//! client certificate, for a cluster that asks for one (`--client-cert-auth`). The PEM files are
//! read when the setting is read, so a missing or unreadable one stops the start.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    File(PathBuf),
    Etcd(EtcdSpec),
}

#[derive(Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// `host:port` of each member, in the order given (tried in turn).
    pub endpoints: Vec<String>,
    /// The record's key: `/KEY-PREFIX/VM`.
    pub key: String,
    pub tls: Option<EtcdTls>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub ca_pem: Vec<u8>,
    /// This host's certificate and key (PEM texts).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("'{0}': {1}")]
    Invalid(String, String),
    #[error("cannot read {0}: {1}")]
    Pem(PathBuf, String),
}

const FORM: &str = "etcd://HOST:PORT[,HOST:PORT...]/KEY-PREFIX/VM[?cacert=CA.pem&cert=CERT.pem&key=KEY.pem]";

impl Spec {
    /// Reads a `--tiebreak` value: `etcd://...`, or a path. Another `SCHEME://` is refused (a
    /// mistyped URL must not become a relative path).
    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let invalid = |why: &str| SpecError::Invalid(text.to_string(), why.to_string());
        if let Some(rest) = text.strip_prefix("etcd://") {
            return parse_etcd(rest).map(Spec::Etcd).map_err(|e| match e {
                SpecError::Invalid(_, why) => invalid(&why),
                other => other,
            });
        }
        if let Some((scheme, _)) = text.split_once("://") {
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
                return Err(invalid(&format!("'{scheme}://' is not a tie-breaker: give a path, or {FORM}")));
            }
        }
        if text.trim().is_empty() {
            return Err(invalid("the path is empty"));
        }
        Ok(Spec::File(PathBuf::from(text)))
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Spec::File(_) => "file",
            Spec::Etcd(_) => "etcd",
        }
    }
}

fn parse_etcd(rest: &str) -> Result<EtcdSpec, SpecError> {
    let bad = |why: String| SpecError::Invalid(String::new(), why);
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (hosts, key) = rest.split_once('/').ok_or_else(|| bad(format!("no key: the form is {FORM}")))?;
    let mut endpoints = Vec::new();
    for h in hosts.split(',') {
        endpoints.push(endpoint(h).map_err(|why| bad(format!("member '{h}': {why}")))?);
    }
    let segments: Vec<&str> = key.split('/').collect();
    if segments.len() < 2 || segments.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return Err(bad(format!("the key must be KEY-PREFIX/VM (non-empty parts): the form is {FORM}")));
    }
    let mut files: [Option<PathBuf>; 3] = Default::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| bad(format!("'{pair}' is not NAME=VALUE")))?;
        let slot = match k {
            "cacert" => 0,
            "cert" => 1,
            "key" => 2,
            _ => return Err(bad(format!("unknown option '{k}' (cacert, cert and key are)"))),
        };
        if v.is_empty() {
            return Err(bad(format!("{k} is empty")));
        }
        files[slot] = Some(PathBuf::from(v));
    }
    let tls = match files {
        [None, None, None] => None,
        [Some(ca), None, None] => Some(EtcdTls { ca_pem: pem(&ca)?, ca, client: None }),
        [Some(ca), Some(cert), Some(key)] => {
            Some(EtcdTls { ca_pem: pem(&ca)?, ca, client: Some((pem(&cert)?, pem(&key)?)) })
        }
        [None, ..] => {
            return Err(bad("cert and key need cacert (the CA the members' certificates are checked against)".into()))
        }
        _ => return Err(bad("cert and key go together".into())),
    };
    Ok(EtcdSpec { endpoints, key: format!("/{key}"), tls })
}

/// `host:port`, with a port; IPv6 addresses in brackets.
fn endpoint(h: &str) -> Result<String, String> {
    let (host, port) = h.rsplit_once(':').ok_or("no port (HOST:PORT)")?;
    port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("'{port}' is not a port"))?;
    let plain = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let v6 = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
    if !plain && !v6 {
        return Err(format!("'{host}' is not a host name or address"));
    }
    Ok(h.to_string())
}

fn pem(path: &Path) -> Result<Vec<u8>, SpecError> {
    let text = std::fs::read(path).map_err(|e| SpecError::Pem(path.to_path_buf(), e.to_string()))?;
    if !String::from_utf8_lossy(&text).contains("-----BEGIN ") {
        return Err(SpecError::Pem(path.to_path_buf(), "not a PEM file".into()));
    }
    Ok(text)
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::File(p) => write!(f, "{}", p.display()),
            Spec::Etcd(e) => e.fmt(f),
        }
    }
}

impl fmt::Display for EtcdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.key)?;
        if self.tls.is_some() {
            write!(f, " (TLS)")?;
        }
        Ok(())
    }
}

impl fmt::Debug for EtcdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EtcdTls({})", self.ca.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(s: &str) -> EtcdSpec {
        match Spec::parse(s).unwrap() {
            Spec::Etcd(e) => e,
            other => panic!("{other:?}"),
        }
    }

    fn err(s: &str) -> String {
        Spec::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn paths_and_etcd_urls() {
        assert_eq!(Spec::parse("/shared/vm1.tb").unwrap(), Spec::File("/shared/vm1.tb".into()));
        assert_eq!(Spec::parse("relative/tb").unwrap(), Spec::File("relative/tb".into()));
        let e = etcd("etcd://10.0.0.1:2379,etcd-b.example:2379,[::1]:2379/smpft/vm1");
        assert_eq!(e.endpoints, ["10.0.0.1:2379", "etcd-b.example:2379", "[::1]:2379"]);
        assert_eq!((e.key.as_str(), e.tls.is_none()), ("/smpft/vm1", true));
        assert_eq!(e.to_string(), "etcd://10.0.0.1:2379,etcd-b.example:2379,[::1]:2379/smpft/vm1");
        assert_eq!(etcd("etcd://h:1/a/b/c").key, "/a/b/c");
    }

    #[test]
    fn tls_files_are_read_at_once() {
        let d = tempfile::tempdir().unwrap();
        let f = |n: &str| {
            let p = d.path().join(n);
            std::fs::write(&p, "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n").unwrap();
            p.display().to_string()
        };
        let (ca, cert, key) = (f("ca.pem"), f("cert.pem"), f("key.pem"));
        let e = etcd(&format!("etcd://h:2379/p/vm?cacert={ca}&cert={cert}&key={key}"));
        let tls = e.tls.as_ref().unwrap();
        assert!(tls.client.is_some() && tls.ca_pem.starts_with(b"-----BEGIN"));
        assert_eq!(e.to_string(), "etcd://h:2379/p/vm (TLS)");
        assert!(etcd(&format!("etcd://h:2379/p/vm?cacert={ca}")).tls.unwrap().client.is_none());
        let missing = err("etcd://h:2379/p/vm?cacert=/nonexistent/ca.pem");
        assert!(missing.starts_with("cannot read /nonexistent/ca.pem: "), "{missing}");
        std::fs::write(d.path().join("junk"), "junk").unwrap();
        let junk = err(&format!("etcd://h:2379/p/vm?cacert={}", d.path().join("junk").display()));
        assert!(junk.ends_with("not a PEM file"), "{junk}");
        assert!(err(&format!("etcd://h:2379/p/vm?cacert={ca}&cert={cert}")).contains("cert and key go together"));
        assert!(err(&format!("etcd://h:2379/p/vm?cert={cert}&key={key}")).contains("need cacert"));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (s, why) in [
            ("etcd://h:2379", "no key"),
            ("etcd://h:2379/vm", "KEY-PREFIX/VM"),
            ("etcd://h:2379/p//vm", "KEY-PREFIX/VM"),
            ("etcd://h:2379/p/../vm", "KEY-PREFIX/VM"),
            ("etcd://h/p/vm", "member 'h': no port"),
            ("etcd://h:0/p/vm", "'0' is not a port"),
            ("etcd://h:99999/p/vm", "not a port"),
            ("etcd://,h:1/p/vm", "member '': no port"),
            ("etcd://h_x:1/p/vm", "not a host name"),
            ("etcd://h:1/p/vm?ca=x", "unknown option 'ca'"),
            ("etcd://h:1/p/vm?cacert", "not NAME=VALUE"),
            ("etcd://h:1/p/vm?cacert=", "cacert is empty"),
            ("etcds://h:1/p/vm", "'etcds://' is not a tie-breaker"),
            ("http://h:1/p/vm", "'http://' is not a tie-breaker"),
            ("", "the path is empty"),
        ] {
            let e = err(s);
            assert!(e.starts_with(&format!("'{s}': ")) && e.contains(why), "{s}: {e}");
        }
    }
}
