//! `human-monitor-command`: the HMP command lines smpft's monitor takes. Each is carried out as
//! the QMP command it stands for (as QEMU's own HMP commands call their QMP counterparts), so the
//! VM's owner sees `stop`, `quit` or `query-status` whichever way they came, and the answer is
//! written back as QEMU's HMP would print it. Proxmox VE's `qm monitor` and its API's monitor
//! endpoint send HMP; `qm` itself sends HMP only to hot-plug devices and drives, which smpft
//! does not do.
//!
//! A command line smpft does not implement is refused with a QMP error that names it and lists
//! what is implemented. A command that is implemented but fails prints `Error: ...`, as QEMU's
//! HMP does.

use super::{Command, QmpError};
use serde_json::{json, Map, Value};

/// The HMP command lines understood, for the refusal's message.
pub const COMMANDS: &str = "info status, info version, info balloon, info cpus, info kvm, stop, cont (c), \
                            system_reset, system_powerdown, quit (q), balloon MiB";

/// How a QMP answer is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Nothing on success (`stop`, `cont`, ...).
    Empty,
    Status,
    Version,
    Balloon,
    Cpus,
    Kvm,
}

/// The QMP command a `human-monitor-command` stands for, and how to print its answer.
pub fn lower(args: &Map<String, Value>) -> Result<(Command, Output), QmpError> {
    let line = match args.get("command-line") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(QmpError::generic("Invalid parameter type for 'command-line', expected: string")),
        None => return Err(QmpError::generic("Parameter 'command-line' is missing")),
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let other = |name: &str, args: Value| Command::Other {
        name: name.into(),
        args: args.as_object().cloned().unwrap_or_default(),
    };
    Ok(match words.as_slice() {
        ["info", "status"] => (Command::QueryStatus, Output::Status),
        ["info", "version"] => (other("query-version", json!({})), Output::Version),
        ["info", "balloon"] => (other("query-balloon", json!({})), Output::Balloon),
        ["info", "cpus"] => (other("query-cpus-fast", json!({})), Output::Cpus),
        ["info", "kvm"] => (other("query-kvm", json!({})), Output::Kvm),
        ["stop"] => (Command::Stop, Output::Empty),
        ["cont" | "c"] => (Command::Cont, Output::Empty),
        ["quit" | "q"] => (Command::Quit, Output::Empty),
        ["system_reset"] => (other("system_reset", json!({})), Output::Empty),
        ["system_powerdown"] => (other("system_powerdown", json!({})), Output::Empty),
        ["balloon", mib] => {
            let bytes = mib.parse::<u64>().ok().and_then(|m| m.checked_mul(1 << 20)).filter(|b| *b > 0);
            let bytes = bytes.ok_or_else(|| QmpError::generic(format!("balloon: '{mib}' is not a size in MiB")))?;
            (other("balloon", json!({"value": bytes})), Output::Empty)
        }
        _ => {
            return Err(QmpError::generic(format!(
                "human-monitor-command '{}': not a command smpft's monitor implements (it implements {COMMANDS})",
                line.trim()
            )))
        }
    })
}

/// The text HMP prints for `result` (QEMU's wording, `\r\n` line ends). A failed command prints
/// `Error: ...` and is not a QMP error, as in QEMU.
pub fn render(output: Output, result: Result<Value, QmpError>) -> Result<Value, QmpError> {
    let v = match result {
        Ok(v) => v,
        Err(e) => return Ok(Value::String(format!("Error: {}\r\n", e.desc))),
    };
    let int = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
    let text = match output {
        Output::Empty => String::new(),
        Output::Status => {
            let status = v["status"].as_str().unwrap_or("unknown");
            match (v["running"].as_bool().unwrap_or(false), status) {
                (true, _) => "VM status: running\r\n".to_string(),
                (false, "paused") => "VM status: paused\r\n".to_string(),
                (false, s) => format!("VM status: paused ({s})\r\n"),
            }
        }
        Output::Version => {
            let q = &v["qemu"];
            let package = v["package"].as_str().unwrap_or_default();
            format!("{}.{}.{} ({package})\r\n", int(q, "major"), int(q, "minor"), int(q, "micro"))
        }
        Output::Balloon => {
            let mut s = format!("balloon: actual={}", int(&v, "actual") >> 20);
            for (k, shift) in [("max_mem", 20), ("total_mem", 20), ("free_mem", 20)] {
                if let Some(n) = v.get(k).and_then(Value::as_i64) {
                    s.push_str(&format!(" {k}={}", n >> shift));
                }
            }
            for k in ["mem_swapped_in", "mem_swapped_out", "major_page_faults", "minor_page_faults", "last_update"] {
                if let Some(n) = v.get(k).and_then(Value::as_i64) {
                    s.push_str(&format!(" {k}={n}"));
                }
            }
            s + "\r\n"
        }
        Output::Cpus => {
            let cpus = v.as_array().cloned().unwrap_or_default();
            cpus.iter()
                .enumerate()
                .map(|(i, c)| {
                    let mark = if i == 0 { '*' } else { ' ' };
                    format!("{mark} CPU #{}: thread_id={}\r\n", int(c, "cpu-index"), int(c, "thread-id"))
                })
                .collect()
        }
        Output::Kvm => {
            let on = |k: &str| if v[k].as_bool() == Some(true) { "enabled" } else { "disabled" };
            format!(
                "kvm support: {}\r\n",
                if v["present"].as_bool() == Some(true) { on("enabled") } else { "not compiled" }
            )
        }
    };
    Ok(Value::String(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> Result<(Command, Output), QmpError> {
        lower(json!({"command-line": s}).as_object().unwrap())
    }

    #[test]
    fn command_lines_become_qmp_commands() {
        assert_eq!(line("info status").unwrap(), (Command::QueryStatus, Output::Status));
        assert_eq!(line("  stop ").unwrap(), (Command::Stop, Output::Empty));
        assert_eq!(line("c").unwrap().0, Command::Cont);
        assert_eq!(line("q").unwrap().0, Command::Quit);
        let (cmd, _) = line("balloon 512").unwrap();
        assert_eq!(
            cmd,
            Command::Other {
                name: "balloon".into(),
                args: json!({"value": 512u64 << 20}).as_object().cloned().unwrap()
            }
        );
        assert!(line("balloon lots").unwrap_err().desc.contains("not a size"));
        assert!(line("balloon 0").is_err());
        let e = line("savevm snap1").unwrap_err();
        assert!(e.desc.contains("'savevm snap1'") && e.desc.contains("info status"), "{}", e.desc);
        assert!(line("device_add virtio-net-pci,id=net1").unwrap_err().desc.contains("device_add"));
        assert!(lower(&Map::new()).unwrap_err().desc.contains("'command-line' is missing"));
        assert!(lower(json!({"command-line": 1}).as_object().unwrap()).is_err());
    }

    #[test]
    fn answers_print_as_qemus_hmp_does() {
        let text = |o, v: Value| render(o, Ok(v)).unwrap().as_str().unwrap().to_string();
        assert_eq!(text(Output::Status, json!({"status": "running", "running": true})), "VM status: running\r\n");
        assert_eq!(text(Output::Status, json!({"status": "paused", "running": false})), "VM status: paused\r\n");
        assert_eq!(
            text(Output::Status, json!({"status": "shutdown", "running": false})),
            "VM status: paused (shutdown)\r\n"
        );
        assert_eq!(
            text(Output::Version, json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "smpft 0.1.0"})),
            "7.2.0 (smpft 0.1.0)\r\n"
        );
        assert_eq!(
            text(Output::Balloon, json!({"actual": 512u64 << 20, "max_mem": 1u64 << 30, "last_update": 7})),
            "balloon: actual=512 max_mem=1024 last_update=7\r\n"
        );
        assert_eq!(
            text(Output::Cpus, json!([{"cpu-index": 0, "thread-id": 10}, {"cpu-index": 1, "thread-id": 11}])),
            "* CPU #0: thread_id=10\r\n  CPU #1: thread_id=11\r\n"
        );
        assert_eq!(text(Output::Kvm, json!({"enabled": true, "present": true})), "kvm support: enabled\r\n");
        assert_eq!(text(Output::Empty, json!({})), "");
        assert_eq!(
            render(Output::Balloon, Err(QmpError::generic("No balloon device has been activated"))).unwrap(),
            json!("Error: No balloon device has been activated\r\n")
        );
    }
}
