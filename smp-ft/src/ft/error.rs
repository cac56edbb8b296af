//! What can go wrong in the FT engine, as the roles report it.

use super::tiebreak::TieBreakError;
use super::wire::WireError;
use crate::vmm::VmError;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum FtError {
    #[error(transparent)]
    TieBreak(#[from] TieBreakError),
    #[error("FT channel")]
    Channel(#[from] transport::ChannelError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("this standby could not go live")]
    CannotGoLive(#[source] VmError),
    #[error("cannot build the VM to go live")]
    GoLive(#[source] VmError),
    #[error("the primary sent no Hello")]
    NoHello,
    #[error("refusing primary {peer}: {why}")]
    Refused { peer: SocketAddr, why: String },
    #[error("cannot accept primaries")]
    Accept(#[source] transport::ChannelError),
    #[error("the thread accepting primaries ended")]
    AcceptEnded,
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("pre-copy round {0} came after the copy was complete, or out of order")]
    LatePreCopy(u64),
    #[error("checkpoint {0} is stale or invalid")]
    Stale(u64),
    #[error("checkpoint {epoch} was acknowledged but not applied (last applied: {applied:?})")]
    NotApplied { epoch: u64, applied: Option<u64> },
    #[error("no machine state to go live from")]
    NoState,
    #[error("the host resources were already used")]
    HostUsed,
    #[error("'{addr}' is not a host:port address")]
    Address { addr: String, source: std::io::Error },
    #[error("'{0}' resolves to no address")]
    NoAddress(String),
    #[error("disk: {0}")]
    Disk(String),
    #[error("the VM is already {state} (standby {peer:?})")]
    Busy { state: &'static str, peer: Option<SocketAddr> },
}

/// Resolves `host:port` to one address.
pub fn resolve(addr: &str) -> Result<SocketAddr, FtError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|source| FtError::Address { addr: addr.into(), source })?
        .next()
        .ok_or_else(|| FtError::NoAddress(addr.into()))
}

/// Resolves a comma-separated list of `host:port` (spares, in order).
pub fn resolve_all(addrs: &str) -> Result<Vec<SocketAddr>, FtError> {
    let list: Vec<&str> = addrs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    if list.is_empty() {
        return Err(FtError::NoAddress(addrs.into()));
    }
    list.into_iter().map(resolve).collect()
}
