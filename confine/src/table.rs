//! What each kind of thread may call (or, for the deny lists, may not).

use crate::Kind;

/// One entry of a kind's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub name: &'static str,
    pub nr: i64,
    pub rule: Rule,
}

/// When an entry matches its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Always.
    Any,
    /// When argument `arg` masked with `mask` equals `value`.
    ArgMasked { arg: u8, mask: u64, value: u64 },
    /// When argument `arg` equals `value`.
    ArgEq { arg: u8, value: u64 },
    /// When argument `arg` is this process's id.
    OwnPid { arg: u8 },
}

macro_rules! any {
    ($($id:ident),* $(,)?) => {
        [$(Call { name: &stringify!($id)[4..], nr: libc::$id, rule: Rule::Any }),*]
    };
}

fn when(name: &'static str, nr: i64, rule: Rule) -> Call {
    Call { name, nr, rule }
}

/// KVM's ioctls (type 0xAE): the VM's, its vCPUs' and its devices'.
fn kvm_ioctls() -> Call {
    when("ioctl", libc::SYS_ioctl, Rule::ArgMasked { arg: 1, mask: 0xff00, value: 0xae00 })
}

fn ioctl(request: u64) -> Call {
    when("ioctl", libc::SYS_ioctl, Rule::ArgEq { arg: 1, value: request })
}

/// `socket` for one address family.
fn socket(family: libc::c_int) -> Call {
    when("socket", libc::SYS_socket, Rule::ArgEq { arg: 0, value: family as u64 })
}

/// What every thread does whatever its kind: memory, locks, time, its own signals and exit,
/// reading and writing descriptors it holds, logging. `uname`: quinn's UDP layer checks the
/// kernel's version. the `set*id` calls and `setgroups`
/// are here because glibc makes every thread call them when the process drops root (`--user`,
/// which then checks that `setuid(0)` fails); without capabilities they can only set the ids
/// the thread already has.
pub(crate) fn base() -> Vec<Call> {
    let mut v = any![
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_close,
        SYS_futex,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_brk,
        SYS_madvise,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_exit,
        SYS_exit_group,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_gettid,
        SYS_getpid,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_rseq,
        SYS_set_robust_list,
        SYS_restart_syscall,
        SYS_getrandom,
        SYS_setresuid,
        SYS_setresgid,
        SYS_setgroups,
        SYS_setuid,
        SYS_setgid,
        SYS_prctl,
        SYS_seccomp,
        SYS_poll,
        SYS_ppoll,
        SYS_tgkill,
        SYS_fcntl,
        SYS_fstat,
        SYS_statx,
        SYS_uname,
    ]
    .to_vec();
    v.extend([ioctl(libc::FIONBIO), ioctl(libc::FIONREAD)]);
    // A signal to this process only (a test's fault injection ends it so, as SIGKILL would).
    v.push(when("kill", libc::SYS_kill, Rule::OwnPid { arg: 0 }));
    // glibc's fstat: newfstatat on the descriptor itself (AT_EMPTY_PATH), never on a path.
    let empty_path = libc::AT_EMPTY_PATH as u64;
    v.push(when("newfstatat", libc::SYS_newfstatat, Rule::ArgMasked { arg: 3, mask: empty_path, value: empty_path }));
    v
}

/// Starting threads of its own (the kinds whose threads start more of their kind).
fn threads() -> [Call; 2] {
    any![SYS_clone, SYS_clone3]
}

fn file_io() -> [Call; 9] {
    any![
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fallocate
    ]
}

fn socket_io() -> [Call; 9] {
    any![
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendmmsg,
        SYS_recvmmsg,
        SYS_shutdown,
        SYS_getsockopt,
        SYS_setsockopt
    ]
}

fn epoll() -> [Call; 6] {
    any![SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_eventfd2]
}

/// The calls that administer the kernel or other processes rather than run a VM: no thread of
/// smpft makes them.
fn administration() -> Vec<Call> {
    any![
        SYS_ptrace,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_kexec_load,
        SYS_kexec_file_load,
        SYS_init_module,
        SYS_finit_module,
        SYS_delete_module,
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_move_mount,
        SYS_open_tree,
        SYS_fsopen,
        SYS_fsmount,
        SYS_fsconfig,
        SYS_fspick,
        SYS_swapon,
        SYS_swapoff,
        SYS_reboot,
        SYS_acct,
        SYS_bpf,
        SYS_perf_event_open,
        SYS_iopl,
        SYS_ioperm,
        SYS_settimeofday,
        SYS_clock_settime,
        SYS_clock_adjtime,
        SYS_adjtimex,
        SYS_syslog,
        SYS_quotactl,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_uselib,
        SYS_open_by_handle_at,
        SYS_name_to_handle_at,
        SYS_setns,
        SYS_unshare,
        SYS_vhangup,
        SYS_lookup_dcookie,
        SYS_userfaultfd,
        SYS_sethostname,
        SYS_setdomainname,
    ]
    .to_vec()
}

/// The list of `kind`: for [`Kind::denies`] kinds what it may not call, for the others what
/// it may.
pub(crate) fn calls(kind: Kind) -> Vec<Call> {
    let mut v = match kind {
        Kind::Control => return administration(),
        // The hook's program is the operator's and may do anything a program does, but not
        // administer the kernel, nor drive KVM.
        Kind::Hook => {
            let mut v = administration();
            v.push(kvm_ioctls());
            return v;
        }
        _ => base(),
    };
    match kind {
        Kind::Control | Kind::Hook => {}
        // The guest's exits and the devices' emulation: KVM, the disks' files and sockets (an
        // NBD export is a socket), the taps.
        Kind::Vcpu => {
            v.push(kvm_ioctls());
            v.extend(file_io());
            v.extend(socket_io());
            // setpriority: a vCPU lowers its own priority below the VM's service threads'.
            v.extend(any![SYS_io_uring_enter, SYS_setpriority]);
        }
        Kind::Device => {
            v.push(kvm_ioctls());
            v.extend(socket_io());
            v.extend(epoll());
            v.extend(any![SYS_accept4]);
        }
        Kind::Channel => {
            v.extend(threads());
            v.extend(socket_io());
            v.extend(epoll());
            v.extend(any![SYS_connect, SYS_bind, SYS_getsockname, SYS_getpeername, SYS_socketpair, SYS_pipe2]);
            v.extend([socket(libc::AF_INET), socket(libc::AF_INET6)]);
        }
        Kind::Qmp => {
            v.extend(threads());
            v.extend(socket_io());
            v.extend(any![SYS_accept4, SYS_connect, SYS_eventfd2]);
            v.push(socket(libc::AF_UNIX));
        }
        Kind::Storage => {
            v.extend(threads());
            v.extend(file_io());
            v.extend(socket_io());
            v.extend(epoll());
            v.extend(any![SYS_accept4, SYS_connect, SYS_io_uring_enter, SYS_wait4, SYS_waitid]);
            v.extend([socket(libc::AF_UNIX), socket(libc::AF_INET), socket(libc::AF_INET6)]);
        }
        // Creates the snapshot's file and writes it.
        Kind::Snapshot => {
            v.extend(file_io());
            v.extend(any![SYS_openat, SYS_ftruncate, SYS_lseek, SYS_rename, SYS_renameat, SYS_unlink, SYS_unlinkat]);
        }
        Kind::Metrics => {
            v.extend(socket_io());
            v.extend(any![SYS_accept4]);
        }
        Kind::Signals => {
            v.extend(any![SYS_rt_sigtimedwait]);
        }
    }
    v
}

/// See [`Kind::quiet_refusals`].
pub(crate) fn quiet_refusals() -> Vec<Call> {
    any![SYS_open, SYS_openat].to_vec()
}

/// How the table names an argument `value` of call `nr`.
pub(crate) fn arg_name(nr: i64, value: u64) -> String {
    let known: &[(i64, u64, &str)] = &[
        (libc::SYS_ioctl, libc::FIONBIO, "FIONBIO"),
        (libc::SYS_ioctl, libc::FIONREAD, "FIONREAD"),
        (libc::SYS_socket, libc::AF_UNIX as u64, "AF_UNIX"),
        (libc::SYS_socket, libc::AF_INET as u64, "AF_INET"),
        (libc::SYS_socket, libc::AF_INET6 as u64, "AF_INET6"),
    ];
    known
        .iter()
        .find(|(n, v, _)| *n == nr && *v == value)
        .map_or_else(|| format!("{value:#x}"), |(_, _, s)| s.to_string())
}
