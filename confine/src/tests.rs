use super::*;

#[test]
fn every_kind_builds_in_every_mode() {
    for kind in Kind::ALL {
        for mode in [Mode::Kill, Mode::Log] {
            let p = program(kind, mode).unwrap_or_else(|e| panic!("{e}"));
            assert!(!p.is_empty(), "{}", kind.name());
        }
    }
}

#[test]
fn no_allow_list_lets_a_thread_start_a_program_or_administer_the_kernel() {
    let banned = [libc::SYS_execve, libc::SYS_execveat, libc::SYS_fork, libc::SYS_vfork, libc::SYS_openat];
    for kind in Kind::ALL.into_iter().filter(|k| !k.denies()) {
        for c in kind.calls() {
            let opens = kind == Kind::Snapshot && c.nr == libc::SYS_openat;
            assert!(opens || !banned.contains(&c.nr), "{} may call {}", kind.name(), c.name);
            assert!(!table::calls(Kind::Control).iter().any(|d| d.nr == c.nr), "{} may call {}", kind.name(), c.name);
        }
    }
}

#[test]
fn a_vcpu_has_no_socket_no_file_opening_and_only_kvm_ioctls_beyond_two() {
    let calls = Kind::Vcpu.calls();
    for nr in [libc::SYS_socket, libc::SYS_open, libc::SYS_openat, libc::SYS_connect, libc::SYS_clone, libc::SYS_clone3]
    {
        assert!(!calls.iter().any(|c| c.nr == nr), "{nr}");
    }
    let ioctls: Vec<Rule> = calls.iter().filter(|c| c.nr == libc::SYS_ioctl).map(|c| c.rule).collect();
    assert!(!ioctls.contains(&Rule::Any), "ioctl is limited by its request");
    assert_eq!(ioctls.len(), 3, "{ioctls:?}");
}

#[test]
fn modes_parse_and_refuse_others() {
    assert_eq!("kill".parse::<Mode>(), Ok(Mode::Kill));
    assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
    assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
    assert!("on".parse::<Mode>().unwrap_err().contains("kill, log, off"));
}

#[test]
fn the_readme_table_is_this_table() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    assert!(readme.contains(&table_markdown()), "README.md's filter table differs from:\n{}", table_markdown());
}
