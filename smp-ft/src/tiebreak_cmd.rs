//! `smpft tiebreak show|clear SPEC`: an operator's view of a VM's tie-breaker record, in a file
//! or in etcd, and a way to reset it.

use crate::CliError;
use smp_ft::ft::error::FtError;
use smp_ft::ft::tiebreak::holder::{answers, Liveness};
use smp_ft::ft::tiebreak::{self, Record, Spec, TieBreak};
use smp_ft::units::parse_duration;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Subcommand)]
pub(crate) enum Action {
    /// Print the record: its generation, its holder and whether the holder still answers, and
    /// which etcd member answered.
    Show {
        /// The tie-breaker, as --tiebreak names it.
        spec: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// How long the record may take to read.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Remove the record, so that the next claim of any generation wins. Refused while its
    /// holder still answers (a copy that runs the VM: a process on this host running smpft, or
    /// a host that is up; see `show`), unless --force.
    Clear {
        /// The tie-breaker, as --tiebreak names it.
        spec: String,
        /// Clear it even though its holder answers.
        #[arg(long)]
        force: bool,
        /// How long the record may take to read and clear.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn open(spec: &str) -> Result<Arc<dyn TieBreak>, CliError> {
    let spec = Spec::parse(spec).map_err(|e| CliError::Usage(e.to_string()))?;
    tiebreak::open(&spec, &smp_ft::ft::default_owner()).map_err(|e| CliError::Ft(FtError::from(e)))
}

fn read(tb: &dyn TieBreak, timeout: Duration) -> Result<Option<Record>, CliError> {
    tb.read(timeout).map_err(|e| CliError::Ft(FtError::from(e)))
}

fn describe(l: &Liveness) -> String {
    match l {
        Liveness::Stopped => "the VM was ended on purpose".into(),
        Liveness::Answers(why) => format!("answers: {why}"),
        Liveness::Silent(why) => format!("silent: {why}"),
    }
}

pub(crate) fn run(action: Action) -> Result<ExitCode, CliError> {
    match action {
        Action::Show { spec, json, timeout } => show(&spec, json, timeout),
        Action::Clear { spec, force, timeout } => clear(&spec, force, timeout),
    }
}

fn show(spec: &str, json: bool, timeout: Duration) -> Result<ExitCode, CliError> {
    let tb = open(spec)?;
    let record = read(tb.as_ref(), timeout)?;
    let status = tb.status();
    let liveness = record.as_ref().map(|r| answers(&r.holder));
    if json {
        let mut v = status.to_json();
        v["holder-answers"] = serde_json::json!(liveness.as_ref().map(|l| matches!(l, Liveness::Answers(_))));
        v["holder-state"] = serde_json::json!(liveness.as_ref().map(describe));
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("tiebreak: {}", status.at);
    match (&record, &liveness) {
        (Some(r), Some(l)) => {
            println!("generation: {}", r.generation);
            println!("holder: {} ({})", r.holder, describe(l));
        }
        _ => println!("record: none (never claimed, or cleared)"),
    }
    if let Some(e) = &status.endpoint {
        println!("answered by: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

fn clear(spec: &str, force: bool, timeout: Duration) -> Result<ExitCode, CliError> {
    let tb = open(spec)?;
    let Some(record) = read(tb.as_ref(), timeout)? else {
        println!("{}: no record; nothing to clear", tb.status().at);
        return Ok(ExitCode::SUCCESS);
    };
    let liveness = answers(&record.holder);
    if let Liveness::Answers(why) = &liveness {
        if !force {
            return Err(CliError::Usage(format!(
                "not clearing {}: its holder {} still answers ({why}); a copy may run the VM at generation {}. \
                 Stop it first, or give --force",
                tb.status().at,
                record.holder,
                record.generation
            )));
        }
    }
    if !tb.clear(&record, timeout).map_err(|e| CliError::Ft(FtError::from(e)))? {
        let now = read(tb.as_ref(), timeout)?;
        let now = now.map_or_else(|| "none".into(), |r| format!("generation {} held by {}", r.generation, r.holder));
        return Err(CliError::Usage(format!(
            "the record changed while it was being cleared (now: {now}); nothing cleared"
        )));
    }
    println!(
        "cleared {}: generation {} held by {} ({})",
        tb.status().at,
        record.generation,
        record.holder,
        describe(&liveness)
    );
    Ok(ExitCode::SUCCESS)
}
