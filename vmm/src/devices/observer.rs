//! The hook through which a layer above the VMM watches the disks' changes: every write,
//! write-zeroes, discard and flush a disk completes (on virtio-blk or virtio-scsi alike, through
//! [`crate::virtio::disk::DiskIo`]) is reported, with the disk's number, to the [`DiskObserver`]
//! installed on the VM's devices, which may also hold the disks' requests for a while (they wait
//! in their queues, and [`super::Devices::kick_disks`] serves them once the observer lets go).
//! Without an observer the disks just serve their requests.

use block::Op;
use std::any::Any;
use std::sync::{Arc, OnceLock};

/// Watches what the VM's disks change.
pub trait DiskObserver: Send + Sync + 'static {
    /// A request that changed disk number `disk` (or flushed it) completed, as `op`.
    fn completed(&self, disk: u32, op: Op);

    /// While true, the disks take no new requests: they wait in the virtqueues until
    /// [`super::Devices::kick_disks`] is called with this false again.
    fn hold(&self) -> bool {
        false
    }
}

struct Installed {
    observer: Arc<dyn DiskObserver>,
    /// The same observer, for handing it back with its type.
    any: Arc<dyn Any + Send + Sync>,
}

/// Where the VM's disks find their observer: shared by the disks, installed once.
#[derive(Default)]
pub struct ObserverSlot(OnceLock<Installed>);

impl ObserverSlot {
    /// The observer of type `O`, `make`'s if none is installed yet; `None` if one of another
    /// type is.
    pub fn get_or_install<O: DiskObserver>(&self, make: impl FnOnce() -> Arc<O>) -> Option<Arc<O>> {
        let installed = self.0.get_or_init(|| {
            let o = make();
            Installed { observer: o.clone(), any: o }
        });
        installed.any.clone().downcast::<O>().ok()
    }

    pub(crate) fn completed(&self, disk: u32, op: Op) {
        if let Some(i) = self.0.get() {
            i.observer.completed(disk, op);
        }
    }

    pub(crate) fn hold(&self) -> bool {
        self.0.get().is_some_and(|i| i.observer.hold())
    }
}
