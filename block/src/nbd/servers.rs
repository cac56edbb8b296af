//! The client against real servers: qemu-nbd (structured replies, NBD_OPT_GO, trim and
//! write-zeroes checked with `qemu-img map`), nbdkit (block size limits it enforces, a server
//! without NBD_OPT_GO, without trim, write-zeroes or flush, one that requires TLS), and
//! scripted servers that misbehave on a real socket.
use super::wire::SIMPLE_MAGIC;
use super::*;
use crate::backend::RawFile;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(tool: &str) -> Command {
    assert!(
        Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()),
        "{tool} is missing: install qemu-utils (scripts/setup does)"
    );
    Command::new(tool)
}

/// `qemu-nbd` serving `image` (of `format`) as export `vm1` on a unix socket in `dir`.
fn serve(dir: &std::path::Path, image: &std::path::Path, format: &str) -> (Server, Location) {
    serve_with(dir, image, format, &[])
}

/// Waits for `path` to appear (a server's socket or pidfile).
fn wait_for(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// As [`serve`], with more qemu-nbd options.
fn serve_with(dir: &std::path::Path, image: &std::path::Path, format: &str, more: &[&str]) -> (Server, Location) {
    let socket = dir.join("nbd.sock");
    let child = qemu("qemu-nbd")
        .args(["--persistent", "--export-name", "vm1", "--format", format, "--socket"])
        .arg(&socket)
        .args(more)
        .arg(image)
        .spawn()
        .unwrap();
    wait_for(&socket);
    (Server(child), Location::NbdUnix { socket, export: "vm1".into() })
}

fn apply_all(disk: &dyn Backend) {
    let pattern = |len: usize, seed: u8| -> Vec<u8> { (0..len).map(|i| (i as u8) ^ seed).collect() };
    disk.write_at(&pattern(65536, 1), 0).unwrap();
    disk.write_at(&pattern(3 << 20, 2), 512 * 1024).unwrap();
    disk.write_at(&pattern(4096, 3), (4 << 20) - 4096).unwrap();
    disk.write_zeroes(8192, 4096).unwrap();
    disk.discard(1 << 20, 65536).unwrap();
    disk.flush().unwrap();
    let mut back = vec![0u8; 65536];
    disk.read_at(&mut back, 0).unwrap();
    assert_eq!(&back[..8192], &pattern(65536, 1)[..8192]);
    assert!(back[8192..12288].iter().all(|&b| b == 0));
}

/// The same writes through qemu-nbd to a qcow2 image and through io_uring to a raw file:
/// `qemu-img compare` finds the two images identical.
#[test]
fn a_qcow2_image_served_by_qemu_nbd_ends_up_identical_to_a_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    let o = qemu("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&qcow2).arg("4M").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (server, location) = serve(dir.path(), &qcow2, "qcow2");
    let disk = Nbd::connect(&location, false).unwrap();
    assert_eq!(disk.size(), 4 << 20);
    apply_all(&disk);
    assert!(matches!(disk.write_at(&[1], 4 << 20), Err(BackendError::OutOfRange { .. })));
    drop(disk);
    drop(server);

    let raw = dir.path().join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(4 << 20).unwrap();
    apply_all(&RawFile::open(&raw, false).unwrap());
    let o = qemu("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&qcow2).arg(&raw).output().unwrap();
    assert!(o.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&o.stdout));
}

/// Many writes in flight together, and a large read split into pipelined requests, against
/// qemu-nbd: what is read back is what was written.
#[test]
fn pipelined_writes_and_reads_round_trip_through_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::File::create(&raw).unwrap().set_len(8 << 20).unwrap();
    let (_server, location) = serve(dir.path(), &raw, "raw");
    let disk = Nbd::connect(&location, false).unwrap();
    let data: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i + 1; 64 << 10]).collect();
    let writes: Vec<(u64, &[u8])> = data.iter().enumerate().map(|(i, d)| ((i as u64) * (128 << 10), &d[..])).collect();
    disk.write_batch(&writes).unwrap();
    disk.write_at(&vec![0xaa; 3 << 20], 5 << 20).unwrap();
    let mut back = vec![0u8; 8 << 20];
    disk.read_at(&mut back, 0).unwrap();
    for (i, d) in data.iter().enumerate() {
        let at = i * (128 << 10);
        assert_eq!(&back[at..at + d.len()], &d[..], "write {i}");
        assert!(back[at + d.len()..at + (128 << 10)].iter().all(|&b| b == 0));
    }
    assert!(back[5 << 20..].iter().all(|&b| b == 0xaa));
}

/// A server that negotiates, then answers the first request with `reply` (and closes).
fn bad_server(dir: &std::path::Path, reply: Vec<u8>) -> Location {
    use std::os::unix::net::UnixListener;
    let socket = dir.join("bad.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        // Not fixed newstyle: the client sends NBD_OPT_EXPORT_NAME at once.
        c.write_all(b"NBDMAGICIHAVEOPT\x00\x00").unwrap();
        let mut head = [0u8; 4 + 8 + 4 + 4];
        c.read_exact(&mut head).unwrap();
        let mut name = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
        c.read_exact(&mut name).unwrap();
        let mut info = (1u64 << 20).to_be_bytes().to_vec();
        info.extend_from_slice(&1u16.to_be_bytes()); // NBD_FLAG_HAS_FLAGS
        info.extend_from_slice(&[0u8; 124]);
        c.write_all(&info).unwrap();
        let mut req = [0u8; 28];
        c.read_exact(&mut req).unwrap();
        let _ = c.write_all(&reply);
    });
    Location::NbdUnix { socket, export: "vm1".into() }
}

#[test]
fn corrupt_and_short_replies_are_errors_and_the_connection_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut wrong_magic = 0x1234_5678u32.to_be_bytes().to_vec();
    wrong_magic.extend_from_slice(&[0u8; 12]);
    let disk = Nbd::connect(&bad_server(dir.path(), wrong_magic), false).unwrap();
    let e = disk.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(crate::error_chain(&e).contains("protocol error: reply magic"), "{}", crate::error_chain(&e));
    let e = disk.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(crate::error_chain(&e).contains("failed before"), "{}", crate::error_chain(&e));

    let dir = tempfile::tempdir().unwrap();
    let disk = Nbd::connect(&bad_server(dir.path(), SIMPLE_MAGIC.to_be_bytes().to_vec()), false).unwrap();
    let e = disk.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(matches!(e, BackendError::Io { what: "read", .. }), "a short reply: {e:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut eio = SIMPLE_MAGIC.to_be_bytes().to_vec();
    eio.extend_from_slice(&5u32.to_be_bytes());
    eio.extend_from_slice(&0u64.to_be_bytes());
    let disk = Nbd::connect(&bad_server(dir.path(), eio), false).unwrap();
    let e = disk.write_at(&[1u8; 512], 512).unwrap_err();
    assert!(crate::error_chain(&e).contains("Input/output error"), "{}", crate::error_chain(&e));
}

#[test]
fn unreachable_servers_and_unknown_exports_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Location::NbdUnix { socket: dir.path().join("none.sock"), export: "vm1".into() };
    let e = Nbd::connect(&missing, false).err().expect("no server there");
    assert!(e.to_string().contains("none.sock"), "{e}");
    let raw = dir.path().join("d.raw");
    std::fs::File::create(&raw).unwrap().set_len(1 << 20).unwrap();
    let (_server, location) = serve(dir.path(), &raw, "raw");
    let Location::NbdUnix { socket, .. } = location else { unreachable!() };
    let wrong = Location::NbdUnix { socket, export: "nope".into() };
    assert!(Nbd::connect(&wrong, false).is_err(), "an export the server does not have");
    assert!(matches!(Nbd::connect(&Location::Path("/x".into()), false), Err(BackendError::NotADisk { .. })));
}

/// `nbdkit` with `args` (filters, plugin, its parameters) serving export `vm1` on a unix socket
/// in `dir`.
fn nbdkit(dir: &std::path::Path, args: &[&str]) -> (Server, Location) {
    let socket = dir.join("kit.sock");
    let pidfile = dir.join("kit.pid");
    let child = qemu("nbdkit")
        .args(["--foreground", "--exportname", "vm1", "--unix"])
        .arg(&socket)
        .arg("--pidfile")
        .arg(&pidfile)
        .args(args)
        .spawn()
        .unwrap();
    wait_for(&pidfile);
    (Server(child), Location::NbdUnix { socket, export: "vm1".into() })
}

/// `qemu-img map` of a raw image: (start, length, data) of each extent.
fn map(image: &std::path::Path) -> Vec<(u64, u64, bool)> {
    let o = qemu("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(image).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let num = |line: &str, key: &str| -> u64 {
        let at = line.find(&format!("\"{key}\": ")).unwrap() + key.len() + 4;
        line[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    text.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| (num(l, "start"), num(l, "length"), l.contains("\"data\": true")))
        .collect()
}

/// Whether `[offset, offset + len)` is all hole (no data) in `extents`.
fn is_hole(extents: &[(u64, u64, bool)], offset: u64, len: u64) -> bool {
    extents.iter().filter(|&&(s, l, _)| s < offset + len && s + l > offset).all(|&(_, _, data)| !data)
}

fn allocated_bytes(image: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(image).unwrap().blocks() * 512
}

/// qemu-nbd offers structured replies, NBD_OPT_GO, trim and write-zeroes: a discard and a
/// write-zeroes that may unmap leave holes in the image (`qemu-img map`), one that may not keeps
/// the range allocated, and every range reads back as written.
#[test]
fn trim_and_write_zeroes_reach_qemu_nbd_as_holes_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::File::create(&raw).unwrap().set_len(4 << 20).unwrap();
    let (_server, location) = serve_with(dir.path(), &raw, "raw", &["--discard=unmap", "--cache=writeback"]);
    let disk = Nbd::connect(&location, false).unwrap();
    let e = disk.export().clone();
    assert!(e.go && e.structured, "{e:?}");
    assert!(e.has(handshake::SEND_TRIM) && e.has(handshake::SEND_WRITE_ZEROES) && e.has(SEND_FLUSH), "{e:?}");
    let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8 + 1).collect();
    disk.write_at(&data, 0).unwrap();
    disk.flush().unwrap();
    let before = allocated_bytes(&raw);
    assert!(map(&raw).iter().all(|&(_, _, d)| d), "all written");

    disk.discard(1 << 20, 512 << 10).unwrap();
    disk.write_zeroes_may_unmap(2 << 20, 256 << 10).unwrap();
    disk.write_zeroes(3 << 20, 256 << 10).unwrap();
    disk.flush().unwrap();
    let extents = map(&raw);
    assert!(is_hole(&extents, 1 << 20, 512 << 10), "the discard made a hole: {extents:?}");
    assert!(is_hole(&extents, 2 << 20, 256 << 10), "write-zeroes with unmap made a hole: {extents:?}");
    // The holes free 768 KiB; write-zeroes without unmap frees nothing (file system metadata may
    // take a block more).
    let after = allocated_bytes(&raw);
    assert!(after >= before - (768 << 10) && after < before - (512 << 10), "allocated {before} then {after}");

    let mut want = data.clone();
    for (o, l) in [(1 << 20, 512 << 10), (2 << 20, 256 << 10), (3 << 20, 256 << 10)] {
        want[o..o + l].fill(0);
    }
    let mut back = vec![0u8; 4 << 20];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == want, "what is read back is what was written");
    drop(disk);
    assert!(std::fs::read(&raw).unwrap() == want, "and so is the image");
}

/// An export that demands 4 KiB-aligned requests of at most 64 KiB (nbdkit's blocksize-policy
/// filter fails any other with EINVAL): unaligned writes, zeroes and discards and large reads
/// and writes all succeed, and the disk holds what a model of it holds.
#[test]
fn block_size_limits_of_the_export_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, location) = nbdkit(
        dir.path(),
        &[
            "--filter=blocksize-policy",
            "memory",
            "4M",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let disk = Nbd::connect(&location, false).unwrap();
    let e = disk.export().clone();
    assert_eq!((e.min_block, e.preferred_block, e.max_block), (4096, 65536, 65536), "{e:?}");
    let mut model = vec![0u8; 4 << 20];
    let fill = |len: usize, seed: u8| -> Vec<u8> { (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect() };
    let writes: [(usize, usize, u8); 5] =
        [(512, 512, 1), (5000, 3000, 2), (0, 1 << 20, 3), (8192 - 512, 1024, 4), ((4 << 20) - 700, 700, 5)];
    for (offset, len, seed) in writes {
        let d = fill(len, seed);
        disk.write_at(&d, offset as u64).unwrap();
        model[offset..offset + len].copy_from_slice(&d);
    }
    disk.write_at(&fill(300 << 10, 9), 1 << 20).unwrap();
    model[1 << 20..(1 << 20) + (300 << 10)].copy_from_slice(&fill(300 << 10, 9));
    for (offset, len, discard) in
        [(1536usize, 2048usize, false), (100_000, 200_000, true), ((1 << 20) + 512, 65536, false)]
    {
        if discard {
            disk.discard(offset as u64, len as u64).unwrap();
        } else {
            disk.write_zeroes(offset as u64, len as u64).unwrap();
        }
        model[offset..offset + len].fill(0);
    }
    let mut back = vec![0u8; 4 << 20];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == model, "the disk holds what the model holds");
    let mut piece = [0u8; 1000];
    disk.read_at(&mut piece, 5100).unwrap();
    assert_eq!(&piece[..], &model[5100..6100]);
}

/// A server that is not fixed newstyle (nbdkit with its handshake flags masked) takes only
/// NBD_OPT_EXPORT_NAME; one without structured replies gets simple ones. Both serve the disk.
#[test]
fn servers_without_go_or_structured_replies_are_served() {
    for (args, go, structured) in
        [(&["--mask-handshake=0", "memory", "1M"][..], false, false), (&["--no-sr", "memory", "1M"][..], true, false)]
    {
        let dir = tempfile::tempdir().unwrap();
        let (_server, location) = nbdkit(dir.path(), args);
        let disk = Nbd::connect(&location, false).unwrap();
        assert_eq!((disk.export().go, disk.export().structured, disk.size()), (go, structured, 1 << 20), "{args:?}");
        disk.write_at(&[7u8; 8192], 4096).unwrap();
        disk.discard(4096, 4096).unwrap();
        let mut back = [1u8; 12288];
        disk.read_at(&mut back, 0).unwrap();
        assert!(back[..8192].iter().all(|&b| b == 0) && back[8192..].iter().all(|&b| b == 7), "{args:?}");
    }
}

/// An export without trim, write-zeroes or flush (nbdkit's eval plugin over a file, with no
/// zero method and the nozero filter): zeroes are written, and read back as zeroes.
#[test]
fn an_export_without_trim_zeroes_or_flush_still_reads_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("img");
    std::fs::write(&file, vec![0x55u8; 1 << 20]).unwrap();
    let f = file.display();
    let pread = format!("pread=dd if={f} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none");
    let pwrite = format!("pwrite=dd of={f} seek=$4 conv=notrunc oflag=seek_bytes status=none");
    let (_server, location) =
        nbdkit(dir.path(), &["--filter=nozero", "eval", "get_size=echo 1048576", &pread, &pwrite]);
    let disk = Nbd::connect(&location, false).unwrap();
    let e = disk.export().clone();
    assert!(!e.has(handshake::SEND_TRIM) && !e.has(handshake::SEND_WRITE_ZEROES) && !e.has(SEND_FLUSH), "{e:?}");
    disk.write_zeroes(4096, 8192).unwrap();
    disk.discard(65536, 4096).unwrap();
    disk.flush().unwrap();
    let img = std::fs::read(&file).unwrap();
    assert!(img[4096..12288].iter().all(|&b| b == 0) && img[65536..69632].iter().all(|&b| b == 0));
    assert!(img[..4096].iter().chain(&img[12288..65536]).all(|&b| b == 0x55), "nothing else changed");
}

/// A read-only export refuses writes with an error that says so; a server that requires TLS
/// and an unknown export are refused with the server's reason.
#[test]
fn read_only_exports_tls_and_unknown_exports_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::File::create(&raw).unwrap().set_len(1 << 20).unwrap();
    let (server, location) = serve_with(dir.path(), &raw, "raw", &["--read-only"]);
    let disk = Nbd::connect(&location, false).unwrap();
    assert!(disk.readonly());
    let e = crate::error_chain(&disk.write_at(&[1u8; 512], 0).unwrap_err());
    assert!(e.contains("exported read-only by its server") && e.contains("vm1"), "{e}");
    let mut back = [1u8; 512];
    disk.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [0u8; 512]);
    drop(disk); // qemu-nbd serves one client at a time
    let Location::NbdUnix { socket, .. } = location else { unreachable!() };
    let e = Nbd::connect(&Location::NbdUnix { socket, export: "nope".into() }, false).err().unwrap();
    let e = crate::error_chain(&e);
    assert!(e.contains("export 'nope'") && e.contains("no such export") && e.contains("it says:"), "{e}");
    drop(server);

    let psk = dir.path().join("keys.psk");
    std::fs::write(&psk, "smpft:0123456789abcdef0123456789abcdef\n").unwrap();
    let (_server, location) =
        nbdkit(dir.path(), &["--tls=require", &format!("--tls-psk={}", psk.display()), "memory", "1M"]);
    let e = crate::error_chain(&Nbd::connect(&location, false).err().unwrap());
    assert!(e.contains("export 'vm1'") && e.contains("requires TLS"), "{e}");
}
