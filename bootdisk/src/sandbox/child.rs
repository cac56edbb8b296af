//! The disk reader's side: confine this process, then read the disk through the parent.

use super::{meta_text, stdio, MAX_READ, MAX_TEXT};
use crate::fs::Chunk;
use crate::{BootError, Disk, Limits};
use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
use std::cell::RefCell;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::rc::Rc;
use std::time::Duration;

/// The unprivileged user and group the reader runs as.
const NOBODY: u32 = 65534;

/// The disk, read through the parent.
struct PipeDisk {
    size: u64,
    io: Rc<RefCell<(File, BufWriter<File>)>>,
}

impl Disk for PipeDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut io = self.io.borrow_mut();
        let (input, output) = &mut *io;
        for (i, part) in buf.chunks_mut(MAX_READ as usize).enumerate() {
            let at = offset + (i as u64) * u64::from(MAX_READ);
            let mut msg = vec![b'R'];
            msg.extend_from_slice(&at.to_le_bytes());
            msg.extend_from_slice(&(part.len() as u32).to_le_bytes());
            output.write_all(&msg).and_then(|()| output.flush()).map_err(|e| e.to_string())?;
            let mut status = [0];
            input.read_exact(&mut status).map_err(|e| e.to_string())?;
            if status[0] != 0 {
                let mut len = [0; 4];
                input.read_exact(&mut len).map_err(|e| e.to_string())?;
                let mut why = vec![0; u32::from_le_bytes(len).min(MAX_TEXT) as usize];
                input.read_exact(&mut why).map_err(|e| e.to_string())?;
                return Err(String::from_utf8_lossy(&why).into_owned());
            }
            input.read_exact(part).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn message(out: &mut impl Write, tag: &[u8], body: &[u8]) -> std::io::Result<()> {
    out.write_all(tag)?;
    out.write_all(&(body.len() as u32).to_le_bytes())?;
    out.write_all(body)
}

/// The reader's main: never returns to smpft's own.
pub fn main() -> ! {
    let (mut input, output) = stdio();
    let mut header = [0u8; 72];
    if input.read_exact(&mut header).is_err() {
        std::process::exit(71);
    }
    let io = Rc::new(RefCell::new((input, BufWriter::new(output))));
    let v = |i: usize| u64::from_le_bytes(header[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    let limits = Limits {
        kernel: v(1),
        initrd: v(2),
        config: v(3),
        entries: v(4) as usize,
        path_depth: v(5) as usize,
        total: v(6),
        memory: v(7),
        time: Duration::from_secs(v(8)),
    };
    // A panic must not print (standard error is not allowed): it becomes an error message.
    std::panic::set_hook(Box::new(|_| {}));
    if let Err(e) = confine(&limits) {
        let mut io = io.borrow_mut();
        let _ = message(&mut io.1, &[b'E', 5], format!("cannot confine it: {e}").as_bytes());
        let _ = io.1.flush();
        std::process::exit(73);
    }
    let disk = Rc::new(PipeDisk { size: v(0), io: io.clone() });
    let sink_io = io.clone();
    let mut sink = move |c: Chunk| {
        let (tag, data) = match c {
            Chunk::Kernel(d) => (b'K', d),
            Chunk::Initrd(d) => (b'I', d),
        };
        message(&mut sink_io.borrow_mut().1, &[tag], data).map_err(|e| BootError::Reader(e.to_string()))
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crate::fs::find(disk, &limits, &mut sink)))
        .unwrap_or_else(|_| Err(BootError::Reader("it panicked".into())));
    let mut io = io.borrow_mut();
    let _ = match result {
        Ok(b) => message(&mut io.1, b"M", meta_text(&b).as_bytes()),
        Err(e) => {
            let kind = match e {
                BootError::Disk(_) => 0,
                BootError::Invalid(_) => 1,
                BootError::Refused(_) => 2,
                BootError::NotFound(_) => 3,
                BootError::Limit(_) => 4,
                BootError::Reader(_) => 5,
            };
            let text = match e {
                BootError::Disk(s) => s,
                e => e.to_string(),
            };
            message(&mut io.1, &[b'E', kind], text.as_bytes())
        }
    };
    let _ = io.1.flush();
    std::process::exit(0)
}

/// No privileges, no files but the pipes, bounded memory and CPU, and the seccomp filter.
fn confine(limits: &Limits) -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain system calls on this process's own state, with valid arguments.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            return Err(os("close_range"));
        }
        let set = |res, v: u64| libc::setrlimit(res, &libc::rlimit { rlim_cur: v, rlim_max: v });
        let cpu = limits.time.as_secs().max(1);
        if set(libc::RLIMIT_AS, limits.memory) != 0
            || set(libc::RLIMIT_CPU, cpu) != 0
            || set(libc::RLIMIT_FSIZE, 0) != 0
            || set(libc::RLIMIT_CORE, 0) != 0
            || set(libc::RLIMIT_NOFILE, 3) != 0
        {
            return Err(os("setrlimit"));
        }
        if libc::geteuid() == 0
            && (libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0)
        {
            return Err(os("dropping root"));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(os("PR_SET_DUMPABLE"));
        }
    }
    // std's HashMap seeds its keys once per thread from getrandom: take them now.
    drop(std::collections::HashMap::<u8, u8>::new());
    let fd = |n: u64| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, n)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map(|r| vec![r])
    };
    let mut rules =
        vec![(libc::SYS_read, fd(0).map_err(|e| e.to_string())?), (libc::SYS_write, fd(1).map_err(|e| e.to_string())?)];
    for call in [
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_madvise,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_futex,
        libc::SYS_sigaltstack,
    ] {
        rules.push((call, Vec::new()));
    }
    let filter = SeccompFilter::new(
        rules.into_iter().collect(),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())?;
    seccompiler::apply_filter(&program).map_err(|e| e.to_string())
}
