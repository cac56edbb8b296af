//! `smpft libvirt`: fault tolerance turned on and off for domains libvirt runs, as an operator
//! does it in one command, through libvirt's own API (the `virt` crate) on any libvirt URI.
//!
//! - `protect DOMAIN --to URI`: the standby domain is built from the running domain's XML on the
//!   target (each disk a new volume of the same size and format in `--pool`, each NIC on the
//!   bridge or network of the same name), started paused, and the running primary is protected
//!   onto it without a restart (QMP `x-smpft-protect` with its settings). Both domains keep
//!   their FT settings in their metadata, so later restarts keep the pair. On any failure what
//!   was created is undone, and the command says why.
//! - `unprotect DOMAIN`: protection off (QMP `x-smpft-unprotect`), the standby domain stopped
//!   and undefined (its volumes kept unless `--delete-storage`), the metadata cleared.
//! - `status`: the domains of a host with FT settings: role, state, peer and lag.
//!
//! Identities come from a site CA (`smpft keygen --ca-sign`): each host has its own key and
//! certificate in the same directory (`--identity`), and each side accepts the other by the
//! host name libvirt reports for it.

mod protect;
pub mod standby_xml;
mod status;

use serde_json::Value;
use std::path::PathBuf;
use virt::connect::Connect;
use virt::domain::Domain;

pub(crate) use protect::protect;
pub(crate) use status::{status, unprotect};

/// `smpft libvirt ...`.
#[derive(clap::Subcommand, Clone)]
pub(crate) enum LibvirtCommand {
    /// Turn fault tolerance on for a running domain: create its standby on another host (disks
    /// copied while it runs) and protect it, with no restart.
    Protect(Box<ProtectArgs>),
    /// Turn fault tolerance off: the primary runs on unprotected, its standby domain is stopped
    /// and undefined on its host (its volumes kept unless --delete-storage).
    Unprotect(UnprotectArgs),
    /// List this host's domains with FT settings: role, state, peer and lag.
    Status(StatusArgs),
}

#[derive(clap::Args, Clone)]
pub(crate) struct ProtectArgs {
    /// The running domain to protect.
    pub(crate) domain: String,
    /// The libvirt URI of the standby's host (e.g. qemu+ssh://host-b/system).
    #[arg(long, value_name = "URI")]
    pub(crate) to: String,
    /// The storage pool on the standby's host for the copies of the disks.
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub(crate) pool: String,
    /// The libvirt URI of the domain's host.
    #[arg(long, short = 'c', value_name = "URI", default_value = "qemu:///system")]
    pub(crate) connect: String,
    /// Where the standby listens for its primary, as the primary reaches it (default: the host
    /// of --to, port 7400).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) standby_addr: Option<String>,
    /// A directory on storage both hosts share, at the same path on both: the pair's
    /// tie-breaker is a file there named after the domain's UUID.
    #[arg(long, value_name = "DIR", env = "SMPFT_TIEBREAK_DIR")]
    pub(crate) tiebreak_dir: PathBuf,
    /// This host's FT identity (key.pem, cert.pem and the site CA's ca.pem; see `smpft keygen
    /// --ca-sign`).
    #[arg(long, value_name = "DIR", default_value = "/etc/smpft/identity")]
    pub(crate) identity: PathBuf,
    /// The standby host's identity directory, on that host (default: the same path).
    #[arg(long, value_name = "DIR")]
    pub(crate) standby_identity: Option<PathBuf>,
    /// The host name this host's certificate carries (default: libvirt's name for the host).
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// The host name the standby host's certificate carries (default: libvirt's name for it).
    #[arg(long, value_name = "NAME")]
    pub(crate) standby_name: Option<String>,
    /// Another FT setting for both domains, as the metadata names it (e.g. timeout=600ms).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) settings: Vec<String>,
}

#[derive(clap::Args, Clone)]
pub(crate) struct UnprotectArgs {
    /// The protected (primary) domain.
    pub(crate) domain: String,
    /// The libvirt URI of the domain's host.
    #[arg(long, short = 'c', value_name = "URI", default_value = "qemu:///system")]
    pub(crate) connect: String,
    /// Also delete the standby's volumes (its copies of the disks).
    #[arg(long)]
    pub(crate) delete_storage: bool,
}

#[derive(clap::Args, Clone)]
pub(crate) struct StatusArgs {
    /// The libvirt URI of the host.
    #[arg(long, short = 'c', value_name = "URI", default_value = "qemu:///system")]
    pub(crate) connect: String,
    /// One JSON object per domain instead of a line.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(cmd: &LibvirtCommand) -> Result<(), String> {
    // libvirt's default error handler prints every error on stderr; this command says them once.
    virt::error::clear_error_callback();
    match cmd {
        LibvirtCommand::Protect(a) => protect(a),
        LibvirtCommand::Unprotect(a) => unprotect(a),
        LibvirtCommand::Status(a) => status(a),
    }
}

/// The element of smpft's metadata that names the standby's libvirt URI (on the primary).
pub use smp_ft::config::metadata::STANDBY_URI;

/// libvirt's message alone (its Display adds codes an operator does not need).
pub(crate) fn msg(e: &virt::error::Error) -> String {
    e.message().to_string()
}

pub(crate) fn open(uri: &str) -> Result<Connect, String> {
    Connect::open(Some(uri)).map_err(|e| format!("cannot connect to libvirt at {uri}: {}", msg(&e)))
}

pub(crate) fn domain(conn: &Connect, uri: &str, name: &str) -> Result<Domain, String> {
    Domain::lookup_by_name(conn, name).map_err(|e| format!("no domain '{name}' at {uri}: {}", msg(&e)))
}

/// One of smpft's QMP commands on a domain's monitor (through libvirt); its `return`.
pub(crate) fn qmp(dom: &Domain, execute: &str, arguments: Option<Value>) -> Result<Value, String> {
    let mut cmd = serde_json::json!({ "execute": execute });
    if let Some(a) = arguments {
        cmd["arguments"] = a;
    }
    let name = dom.get_name().unwrap_or_default();
    let out =
        dom.qemu_monitor_command(&cmd.to_string(), 0).map_err(|e| format!("domain {name}: {execute}: {}", msg(&e)))?;
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("domain {name}: {execute}: {e}"))?;
    match v.get("error") {
        Some(e) => Err(format!("domain {name}: {}", e["desc"].as_str().unwrap_or("error"))),
        None => Ok(v["return"].clone()),
    }
}

/// The domain's FT state (`x-smpft-query-ft`).
pub(crate) fn query_ft(dom: &Domain) -> Result<Value, String> {
    qmp(dom, "x-smpft-query-ft", None)
}

/// The FT settings in a domain's metadata, if any.
pub(crate) fn settings(dom: &Domain) -> Result<Option<crate::persona::libvirt_ft::Settings>, String> {
    let xml = dom.get_xml_desc(0).map_err(|e| msg(&e))?;
    crate::persona::libvirt_ft::from_domain_xml(&xml)
}
