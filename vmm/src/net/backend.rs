//! The receive thread of one virtio-net device: waits on its tap, queues each frame for the
//! guest, puts what it can into the guest's receive buffers and wakes idle vCPUs. It also
//! delivers what waited once a pause ends (the device's kick).

use super::tap::FRAME_MAX;
use crate::virtio::net::{Net, RX};
use crate::virtio::VirtioPci;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Frames read from the tap before they are handed to the guest in one go.
const BATCH: usize = 64;

pub struct NetBackend {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl NetBackend {
    /// Starts receiving for `dev`; `wake` tells idle vCPUs that input arrived.
    pub fn start(dev: Arc<VirtioPci<Net>>, wake: Arc<dyn Fn() + Send + Sync>) -> std::io::Result<NetBackend> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let name = format!("net-rx-{}", dev.device().tap().name());
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            confine::enter(confine::Kind::Device);
            receive_loop(&dev, &stop2, &*wake)
        })?;
        Ok(NetBackend { stop, thread: Some(thread) })
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        self.halt();
    }
}

fn receive_loop(dev: &VirtioPci<Net>, stop: &EventFd, wake: &(dyn Fn() + Send + Sync)) {
    let net = dev.device();
    let tap = net.tap().clone();
    let mut fds = [
        libc::pollfd { fd: tap.raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: net.kick_event().as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let mut buf = vec![0u8; FRAME_MAX + 64];
    let mut failures = 0u64;
    loop {
        // SAFETY: `fds` is an array of three initialised pollfd structures we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("tap {}: poll failed: {}; no more frames reach the guest", tap.name(), {
                std::io::Error::last_os_error()
            });
            return;
        }
        if fds[2].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            let _ = net.kick_event().read();
        }
        let mut got = false;
        if fds[0].revents & libc::POLLIN != 0 {
            for _ in 0..BATCH {
                match tap.read(&mut buf) {
                    Ok(Some(len)) if len > FRAME_MAX => {
                        net.stats().rx_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Some(len)) => {
                        net.receive(buf[..len].to_vec());
                        got = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failures += 1;
                        if failures < 4 || failures % 10_000 == 0 {
                            tracing::warn!("tap {}: read failed: {e}", tap.name());
                        }
                        // Do not spin on a tap that keeps failing.
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        break;
                    }
                }
            }
        } else if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            tracing::error!("tap {}: the interface is gone; no more frames reach the guest", tap.name());
            return;
        }
        if net.can_deliver() {
            dev.process_queue(RX);
            got = true;
        }
        if got {
            wake();
        }
    }
}
