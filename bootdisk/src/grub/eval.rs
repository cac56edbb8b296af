//! Running a parsed `grub.cfg` as far as choosing and reading the default entry.

use super::parse::{Seg, Stmt, Word};
use crate::{BootError, Device, Entry};
use std::collections::{HashMap, HashSet};

/// Longest value a variable may take.
const MAX_VALUE: usize = 4096;
/// Most variables.
const MAX_VARS: usize = 1024;

/// Commands a default entry may run that change nothing smpft boots.
pub(super) const HARMLESS: &[&str] = &[
    "insmod",
    "echo",
    "load_video",
    "gfxmode",
    "savedefault",
    "recordfail",
    "set",
    "export",
    "unset",
    "terminal_output",
    "terminal_input",
    "true",
    "boot",
    "sleep",
    "play",
    "loadfont",
    "font",
    "background_image",
];

/// What the configuration runs against: GRUB's `grubenv`, and whether a file exists (for
/// `[ -s $prefix/grubenv ]` and the like).
pub struct Env<'a> {
    pub prefix: String,
    pub grubenv: HashMap<String, String>,
    pub exists: &'a dyn Fn(&str) -> bool,
}

pub(super) enum Item<'s> {
    Entry { title: String, id: String, body: &'s [Stmt], line: usize },
    Submenu { title: String, id: String, items: Vec<Item<'s>> },
}

pub(super) struct Ctx<'a, 's> {
    pub(super) env: &'a Env<'a>,
    pub(super) source: &'s str,
    pub(super) vars: HashMap<String, String>,
    pub(super) root: Device,
    pub(super) functions: HashSet<String>,
    pub(super) blscfg: bool,
}

/// The default entry of `stmts` (parsed from `source`), or `None` when the menu is made by
/// `blscfg` from Boot Loader Specification entries.
pub fn default_entry(source: &str, stmts: &[Stmt], env: &Env) -> Result<Option<Entry>, BootError> {
    let mut vars = HashMap::new();
    for (k, v) in [("prefix", env.prefix.as_str()), ("grub_platform", "pc"), ("grub_cpu", "x86_64")] {
        vars.insert(k.to_string(), v.to_string());
    }
    for f in ["feature_menuentry_id", "feature_default_font_path", "feature_all_video_module", "feature_timeout_style"]
    {
        vars.insert(f.to_string(), "y".to_string());
    }
    let mut ctx = Ctx { env, source, vars, root: Device::Here, functions: HashSet::new(), blscfg: false };
    let mut items = Vec::new();
    ctx.menu(stmts, &mut items)?;
    if ctx.blscfg && items.is_empty() {
        return Ok(None);
    }
    let default = ctx.vars.get("default").cloned().unwrap_or_default();
    let (title, body, line) = choose(&items, &default)?;
    ctx.entry(title, body, line).map(Some)
}

/// The entry `default` names (`N`, a title or an id, `>` between submenu levels); entry 0 if
/// it names none, as GRUB does.
fn choose<'i, 's>(items: &'i [Item<'s>], default: &str) -> Result<(&'i str, &'s [Stmt], usize), BootError> {
    let first = |items: &'i [Item<'s>]| match items.first() {
        Some(Item::Entry { title, body, line, .. }) => Ok((title.as_str(), *body, *line)),
        Some(Item::Submenu { title, .. }) => {
            Err(BootError::Invalid(format!("the default entry is the submenu '{title}', not an entry")))
        }
        None => Err(BootError::Invalid("grub.cfg has no menuentry".into())),
    };
    let mut level = items;
    let parts: Vec<&str> = if default.is_empty() { vec!["0"] } else { default.split('>').collect() };
    for (i, part) in parts.iter().enumerate() {
        let found = match part.trim().parse::<usize>() {
            Ok(n) => level.get(n),
            Err(_) => level.iter().find(|it| match it {
                Item::Entry { title, id, .. } | Item::Submenu { title, id, .. } => title == part || id == part,
            }),
        };
        match (found, i + 1 == parts.len()) {
            (Some(Item::Entry { title, body, line, .. }), true) => return Ok((title, body, *line)),
            (Some(Item::Submenu { items, .. }), false) => level = items,
            _ => {
                tracing::info!(default, "grub.cfg's default names no entry; booting the first, as GRUB does");
                return first(items);
            }
        }
    }
    first(items)
}

impl<'s> Ctx<'_, 's> {
    pub(super) fn line(&self, line: usize) -> String {
        self.source.lines().nth(line).unwrap_or("").trim().to_string()
    }

    pub(super) fn expand(&self, w: &Word) -> String {
        let mut s = String::new();
        for seg in &w.0 {
            match seg {
                Seg::Lit(l) => s.push_str(l),
                Seg::Var(v) => s.push_str(self.vars.get(v).map_or("", String::as_str)),
            }
            if s.len() > MAX_VALUE {
                s.truncate(MAX_VALUE);
                break;
            }
        }
        s
    }

    fn set(&mut self, name: &str, value: String, line: usize) -> Result<(), BootError> {
        if self.vars.len() >= MAX_VARS && !self.vars.contains_key(name) {
            return Err(BootError::Invalid(format!("grub.cfg line {}: more than {MAX_VARS} variables", line + 1)));
        }
        if name == "root" {
            self.root = device(&value);
        }
        self.vars.insert(name.to_string(), value);
        Ok(())
    }

    /// `set a=b`, `a=b`, `unset a`, `load_env`: true if the command was one of them.
    pub(super) fn assign(&mut self, words: &[String], line: usize) -> Result<bool, BootError> {
        match words[0].as_str() {
            "set" => {
                for w in &words[1..] {
                    if let Some((k, v)) = w.split_once('=') {
                        self.set(k, v.to_string(), line)?;
                    }
                }
            }
            "unset" => words[1..].iter().for_each(|w| drop(self.vars.remove(w))),
            "load_env" => {
                let names: Vec<&String> = words[1..].iter().filter(|w| !w.starts_with('-')).collect();
                let env: Vec<(String, String)> = self.env.grubenv.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                for (k, v) in env {
                    if names.is_empty() || names.contains(&&k) {
                        self.set(&k, v, line)?;
                    }
                }
            }
            w if w.contains('=') && !w.starts_with('=') => {
                let (k, v) = w.split_once('=').expect("has =");
                self.set(k, v.to_string(), line)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Runs the menu's statements, collecting its entries.
    fn menu(&mut self, stmts: &'s [Stmt], items: &mut Vec<Item<'s>>) -> Result<(), BootError> {
        for stmt in stmts {
            match stmt {
                Stmt::Cmd { words, line } => {
                    let words: Vec<String> = words.iter().map(|w| self.expand(w)).collect();
                    if self.assign(&words, *line)? {
                        continue;
                    }
                    match words[0].as_str() {
                        "configfile"
                        | "source"
                        | "."
                        | "normal"
                        | "legacy_configfile"
                        | "extract_entries_configfile" => {
                            return Err(refused("the menu", &self.line(*line)));
                        }
                        "blscfg" => self.blscfg = true,
                        _ => {}
                    }
                }
                Stmt::If { arms, otherwise } => {
                    let body = self.pick(arms, otherwise);
                    self.menu(body, items)?;
                }
                Stmt::Function { name } => drop(self.functions.insert(name.clone())),
                Stmt::Menu { submenu, args, body, line } => {
                    let (title, id) = self.title_and_id(args);
                    if *submenu {
                        let mut inner = Vec::new();
                        self.menu(body, &mut inner)?;
                        items.push(Item::Submenu { title, id, items: inner });
                    } else {
                        items.push(Item::Entry { title, id, body, line: *line });
                    }
                }
            }
        }
        Ok(())
    }

    fn title_and_id(&self, args: &[Word]) -> (String, String) {
        let args: Vec<String> = args.iter().map(|w| self.expand(w)).filter(|a| !a.is_empty()).collect();
        let mut id = String::new();
        let mut it = args.iter().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--id" => id = it.next().cloned().unwrap_or_default(),
                "--class" | "--users" | "--hotkey" => drop(it.next()),
                a if a.starts_with("--id=") => id = a[5..].to_string(),
                _ => {}
            }
        }
        (args.first().cloned().unwrap_or_default(), id)
    }

    pub(super) fn pick<'b>(&self, arms: &'b [(Vec<Stmt>, Vec<Stmt>)], otherwise: &'b [Stmt]) -> &'b [Stmt] {
        arms.iter().find(|(cond, _)| self.condition(cond)).map_or(otherwise, |(_, body)| body)
    }

    /// An `if`'s condition: the last command's result; `[`/`test`, `true`, `false` are
    /// evaluated, any other command counts as failed.
    fn condition(&self, cond: &[Stmt]) -> bool {
        let Some(Stmt::Cmd { words, .. }) = cond.last() else { return false };
        let mut w: Vec<String> = words.iter().map(|w| self.expand(w)).collect();
        let negate = w.first().is_some_and(|f| f == "!");
        if negate {
            w.remove(0);
        }
        let r = match w.first().map(String::as_str) {
            Some("true") => true,
            Some("[") if w.last().is_some_and(|l| l == "]") => self.test(&w[1..w.len() - 1]),
            Some("test") => self.test(&w[1..]),
            _ => false,
        };
        r != negate
    }

    fn test(&self, a: &[String]) -> bool {
        let num = |s: &String| s.parse::<i64>().unwrap_or(0);
        match a {
            [] => false,
            [n, rest @ ..] if n == "!" => !self.test(rest),
            [s] => !s.is_empty(),
            [op, s] if op == "-z" => s.is_empty(),
            [op, s] if op == "-n" => !s.is_empty(),
            [op, p] if ["-s", "-f", "-e", "-d"].contains(&op.as_str()) => (self.env.exists)(strip_device(p)),
            [x, op, y] => match op.as_str() {
                "=" | "==" => x == y,
                "!=" => x != y,
                "-eq" => num(x) == num(y),
                "-ne" => num(x) != num(y),
                "-lt" => num(x) < num(y),
                "-le" => num(x) <= num(y),
                "-gt" => num(x) > num(y),
                "-ge" => num(x) >= num(y),
                _ => false,
            },
            _ => false,
        }
    }
}

pub(super) fn refused(what: &str, line: &str) -> BootError {
    BootError::Refused(format!("{what} needs '{line}', which smpft's boot loader does not understand"))
}

/// A GRUB device name: `hd0,gpt2`, `hd0,msdos1`, `(hd0,2)` name partition 2; others the
/// partition `grub.cfg` is on.
pub(super) fn device(name: &str) -> Device {
    let name = name.trim_matches(|c| c == '(' || c == ')');
    let part = name.split_once(',').map(|(_, p)| p.trim_start_matches(|c: char| c.is_ascii_alphabetic()));
    match part.and_then(|p| p.parse().ok()) {
        Some(n) => Device::Part(n),
        None => Device::Here,
    }
}

fn strip_device(path: &str) -> &str {
    match path.strip_prefix('(').and_then(|p| p.split_once(')')) {
        Some((_, rest)) => rest,
        None => path,
    }
}
