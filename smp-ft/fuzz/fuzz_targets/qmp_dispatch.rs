//! A QMP command as the VM's owner dispatches it once the server has parsed it: HMP command
//! lines lowered to the QMP command they stand for, smpft's own `x-smpft-*` commands, the
//! questions about the emulator (the probe, the CPU models, Proxmox's), and QOM commands on
//! the balloon. Each gives an answer or a QMP error, never a panic. Beyond that:
//! - an HMP line smpft implements is carried out as exactly the command its QMP form parses
//!   to, and its answer prints as HMP text (lines ending in CR LF), whatever the VM answers;
//! - `qmp_capabilities` is refused once negotiated, and every refusal says why.
#![no_main]

use cpu_model::Leaf;
use libfuzzer_sys::fuzz_target;
use qemu_shim::qmp::{hmp, parse_command, Command};
use serde_json::{json, Map, Value};
use smp_ft::qmp::SmpftCommand;

/// A host that has every CPU feature (the answers about CPU models need one).
fn host() -> Vec<Leaf> {
    [(0, 0), (1, 0), (6, 0), (7, 0), (0xd, 0), (0xd, 1), (0x8000_0001, 0)]
        .into_iter()
        .map(|(function, index)| Leaf { function, index, eax: !0, ebx: !0, ecx: !0, edx: !0 })
        .collect()
}

/// The QMP form of a command the server typed.
fn qmp_form(c: &Command) -> (String, Map<String, Value>) {
    match c {
        Command::QueryStatus => ("query-status".into(), Map::new()),
        Command::Stop => ("stop".into(), Map::new()),
        Command::Cont => ("cont".into(), Map::new()),
        Command::Quit => ("quit".into(), Map::new()),
        Command::Other { name, args } => (name.clone(), args.clone()),
    }
}

fn hmp_line(args: &Map<String, Value>) {
    let Ok((command, output)) = hmp::lower(args) else { return };
    let (name, arguments) = qmp_form(&command);
    let again = parse_command(&json!({"execute": name, "arguments": arguments}), true);
    assert_eq!(again, Ok(Some(command)), "an HMP line and its QMP form differ");
    // Whatever the VM answers, HMP prints text.
    for answer in [Ok(Value::Object(args.clone())), Ok(json!([args])), Err(qemu_shim::qmp::QmpError::generic("no"))] {
        let text = hmp::render(output, answer).expect("HMP prints an answer, even an error");
        let text = text.as_str().expect("HMP's answer is text");
        assert!(text.is_empty() || text.ends_with("\r\n"), "{text:?}");
    }
}

fn dispatch(name: &str, args: &Map<String, Value>) {
    if name == "human-monitor-command" {
        return hmp_line(args);
    }
    let _ = SmpftCommand::parse(name, args);
    let _ = qemu_shim::probe::answer(name, args, "smpft fuzz");
    let _ = qemu_shim::cpu::answer(name, args, Ok(&host()));
    let _ = qemu_shim::cpu::answer(name, args, Err("no host"));
    if smp_ft::balloon::qom_path(name, args).is_some() {
        let _ = smp_ft::balloon::qom(None, name, args);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    match parse_command(&v, true) {
        Ok(None) => panic!("qmp_capabilities after negotiation was accepted"),
        Ok(Some(c)) => {
            let (name, args) = qmp_form(&c);
            dispatch(&name, &args);
        }
        Err(e) => assert!(!e.desc.is_empty(), "an error without a description"),
    }
});
