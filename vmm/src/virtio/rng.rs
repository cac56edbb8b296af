//! virtio-rng (device type 4): one queue; the driver offers device-writable buffers and the
//! device fills them with entropy from the host (getrandom(2)). It has no state of its own
//! beyond the transport's, and no host resource to reserve.

use super::{serve_chains, VirtioDevice, VirtioError};
use crate::memory::DeviceMemory;
use std::io::Write;
use virtio_queue::Queue;

/// The most one request is given at once (a driver asking for more gets this much).
const MAX_REQUEST: usize = 64 << 10;
const QUEUE_SIZE: u16 = 256;

#[derive(Debug, Default)]
pub struct Rng;

fn entropy(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most `buf.len() - filled` bytes into the rest of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        boot_abi::VIRTIO_TYPE_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn process(&self, _index: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        serve_chains(queue, mem, |chain| {
            let head = chain.head_index();
            let failed = |why: String| VirtioError::Buffer { head, why };
            let mut w = chain.writer(&**mem).map_err(|e| failed(e.to_string()))?;
            let n = w.available_bytes().min(MAX_REQUEST);
            let mut buf = vec![0u8; n];
            entropy(&mut buf).map_err(|e| failed(format!("no entropy: {e}")))?;
            w.write_all(&buf).map_err(|e| failed(e.to_string()))?;
            Ok(n as u32)
        })
    }
}
