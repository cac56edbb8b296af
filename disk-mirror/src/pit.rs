//! Point-in-time views of disks that keep being written, and read-only NBD exports of them.
//!
//! A standby's disks follow the primary epoch by epoch. A snapshot of the committed copy takes a
//! [`View`] of each disk at that instant: from then on, before [`Fleece`] lets a write (or a
//! write-zeroes, or a discard) through to the disk, it copies the old contents of every block
//! the write touches, once, into each view's overlay ("fleecing", as QEMU's backup export
//! does). A view reads a block from its overlay if the block was preserved, from the disk if
//! not. A view is an [`block::export::Image`]: [`block::export::Export`] serves it to backup
//! tools (`qemu-img convert`, `nbdcopy`) as a read-only NBD export on a unix socket.
//!
//! Reads race writes without a lock held across the disk read: a reader checks the overlay,
//! reads the disk, and checks the overlay again; a write preserves a block before it starts,
//! so a read that may have seen new data finds the block preserved on its second look.
//!
//! The overlay lives in memory, bounded: a view whose disk is rewritten by more than its limit
//! breaks (its reads fail with the reason) rather than grow without end.

use block::export::Image;
use block::{Backend, BackendError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Blocks are preserved whole, this large.
pub const BLOCK: u64 = 64 << 10;

struct ViewState {
    overlay: Mutex<HashMap<u64, Box<[u8]>>>,
    /// Bytes held in the overlay, and the most it may hold.
    held: AtomicU64,
    limit: u64,
    broken: AtomicBool,
}

/// A disk that keeps point-in-time views of itself as it is written.
pub struct Fleece {
    inner: Arc<dyn Backend>,
    views: Mutex<Vec<Weak<ViewState>>>,
}

impl Fleece {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Fleece> {
        Arc::new(Fleece { inner, views: Mutex::new(Vec::new()) })
    }

    /// The disk as it is now, for as long as the view lives; its overlay may hold at most
    /// `limit` bytes of blocks rewritten since.
    pub fn view(&self, limit: u64) -> View {
        let state = Arc::new(ViewState {
            overlay: Mutex::default(),
            held: AtomicU64::new(0),
            limit,
            broken: AtomicBool::new(false),
        });
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views.retain(|w| w.strong_count() > 0);
        views.push(Arc::downgrade(&state));
        View { state, inner: self.inner.clone() }
    }

    /// Preserves, in every live view, the blocks `offset..offset + len` touches.
    fn preserve(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let views: Vec<Arc<ViewState>> = {
            let mut v = self.views.lock().unwrap_or_else(|e| e.into_inner());
            if v.is_empty() || len == 0 {
                // No snapshot exported: the write goes straight through.
                return Ok(());
            }
            v.retain(|w| w.strong_count() > 0);
            v.iter().filter_map(Weak::upgrade).collect()
        };
        let size = self.inner.size();
        for block in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            let missing: Vec<&Arc<ViewState>> = views
                .iter()
                .filter(|v| !v.broken.load(Ordering::Relaxed))
                .filter(|v| !v.overlay.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&block))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let start = block * BLOCK;
            let mut old = vec![0u8; (size - start).min(BLOCK) as usize].into_boxed_slice();
            self.inner.read_at(&mut old, start)?;
            for v in missing {
                let held = v.held.fetch_add(old.len() as u64, Ordering::Relaxed) + old.len() as u64;
                if held > v.limit {
                    if !v.broken.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            limit_mib = v.limit >> 20,
                            "a point-in-time disk view broke: the disk was rewritten past its limit since"
                        );
                    }
                    v.overlay.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    continue;
                }
                v.overlay.lock().unwrap_or_else(|e| e.into_inner()).entry(block).or_insert_with(|| old.clone());
            }
        }
        Ok(())
    }
}

impl Backend for Fleece {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn readonly(&self) -> bool {
        self.inner.readonly()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        self.preserve(offset, data.len() as u64)?;
        self.inner.write_at(data, offset)
    }
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), BackendError> {
        for &(offset, data) in writes {
            self.preserve(offset, data.len() as u64)?;
        }
        self.inner.write_batch(writes)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.preserve(offset, len)?;
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.preserve(offset, len)?;
        self.inner.discard(offset, len)
    }
}

/// A disk as it was when the view was taken.
#[derive(Clone)]
pub struct View {
    state: Arc<ViewState>,
    inner: Arc<dyn Backend>,
}

impl View {
    pub fn size(&self) -> u64 {
        self.inner.size()
    }

    /// Bytes of rewritten blocks the view holds.
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::Relaxed)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            if self.state.broken.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("the disk was rewritten past this view's limit since it was taken"));
            }
            let at = offset + done as u64;
            let block = at / BLOCK;
            let within = (at - block * BLOCK) as usize;
            let n = (buf.len() - done).min(BLOCK as usize - within);
            let out = &mut buf[done..done + n];
            let from_overlay = |out: &mut [u8]| {
                let o = self.state.overlay.lock().unwrap_or_else(|e| e.into_inner());
                o.get(&block).map(|b| out.copy_from_slice(&b[within..within + out.len()])).is_some()
            };
            if !from_overlay(out) {
                self.inner.read_at(out, at).map_err(std::io::Error::other)?;
                // Rewritten while it was read: the old contents are in the overlay now.
                from_overlay(out);
            }
            done += n;
        }
        Ok(())
    }
}

impl Image for View {
    fn size(&self) -> u64 {
        View::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        View::read_at(self, buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::backend::RawFile;
    use block::export::Export;
    use std::io::Read;

    fn disk(size: u64, byte: u8) -> (tempfile::TempDir, Arc<dyn Backend>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        std::fs::write(&p, vec![byte; size as usize]).unwrap();
        (d, Arc::new(RawFile::open(&p, false).unwrap()))
    }

    fn read(v: &View, at: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        v.read_at(&mut b, at).unwrap();
        b
    }

    #[test]
    fn a_view_keeps_the_disk_as_it_was_while_writes_go_through() {
        let (_d, raw) = disk(4 * BLOCK, 1);
        let f = Fleece::new(raw.clone());
        f.write_at(&[2; 100], 10).unwrap();
        let v = f.view(1 << 20);
        f.write_at(&[3; 5000], BLOCK - 2000).unwrap(); // straddles blocks 0 and 1
        f.write_zeroes(2 * BLOCK, BLOCK).unwrap();
        f.write_batch(&[(3 * BLOCK, &[4; 10]), (3 * BLOCK + 100, &[5; 10])]).unwrap();
        let mut now = vec![0u8; 16];
        raw.read_at(&mut now, BLOCK - 8).unwrap();
        assert_eq!(now, vec![3; 16], "the disk has the new data");
        assert_eq!(read(&v, 10, 100), vec![2; 100], "written before the view: seen");
        assert_eq!(read(&v, BLOCK - 8, 16), vec![1; 16], "written after: not seen");
        assert_eq!(read(&v, 2 * BLOCK + 7, 3), vec![1; 3]);
        assert_eq!(read(&v, 3 * BLOCK, 200), vec![1; 200]);
        assert_eq!(v.held(), 4 * BLOCK, "each touched block preserved once");
        f.write_at(&[6; 10], 0).unwrap();
        assert_eq!(v.held(), 4 * BLOCK, "block 0 again: already preserved");
        let late = f.view(1 << 20);
        assert_eq!(read(&late, 0, 10), vec![6; 10], "a later view sees the disk as it is then");
    }

    #[test]
    fn a_view_past_its_limit_breaks_and_dropped_views_cost_nothing() {
        let (_d, raw) = disk(8 * BLOCK, 1);
        let f = Fleece::new(raw);
        let v = f.view(2 * BLOCK);
        f.write_at(&vec![9; (3 * BLOCK) as usize], 0).unwrap();
        let mut b = [0u8; 4];
        let e = v.read_at(&mut b, 0).unwrap_err();
        assert!(e.to_string().contains("rewritten past"), "{e}");
        drop(v);
        f.write_at(&[7; 4], 5 * BLOCK).unwrap();
        assert!(f.views.lock().unwrap().iter().all(|w| w.strong_count() == 0));
    }

    #[test]
    fn the_export_serves_the_view_over_nbd() {
        let (d, raw) = disk(2 * BLOCK, 1);
        let f = Fleece::new(raw);
        let v = f.view(1 << 20);
        f.write_at(&[8; 64], 0).unwrap();
        let export = Export::serve(v, &d.path().join("e.sock")).unwrap();
        let mut c = std::os::unix::net::UnixStream::connect(export.path()).unwrap();
        let info = nbd::client::handshake(&mut c, b"").unwrap();
        assert_eq!(info.size, 2 * BLOCK);
        let mut client = nbd::client::NbdClient::new(&mut c, &info);
        let mut b = [0u8; 64];
        client.read_exact(&mut b).unwrap();
        assert_eq!(b, [1; 64], "the export shows the disk before the write");
        drop(c);
        drop(export);
        assert!(!d.path().join("e.sock").exists());
    }
}
