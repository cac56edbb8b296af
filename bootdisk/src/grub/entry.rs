//! Running the default entry's body: where its kernel and initrds are, and its arguments.

use super::eval::{device, refused, Ctx, HARMLESS};
use super::parse::Stmt;
use crate::{BootError, Device, Entry, FileRef};

#[derive(Default)]
struct Partial {
    kernel: Option<FileRef>,
    initrds: Vec<FileRef>,
    args: String,
}

impl Ctx<'_, '_> {
    pub(super) fn entry(&mut self, title: &str, body: &[Stmt], line: usize) -> Result<Entry, BootError> {
        self.vars.insert("chosen".into(), title.into());
        let mut out = Partial::default();
        self.run(title, body, &mut out)?;
        let Some(kernel) = out.kernel else {
            let why = format!("grub.cfg line {}: the entry '{title}' has no linux command", line + 1);
            return Err(BootError::Invalid(why));
        };
        Ok(Entry { title: title.into(), kernel, initrds: out.initrds, args: out.args })
    }

    fn run(&mut self, title: &str, body: &[Stmt], out: &mut Partial) -> Result<(), BootError> {
        for stmt in body {
            match stmt {
                Stmt::Cmd { words, line } => {
                    let w: Vec<String> = words.iter().map(|w| self.expand(w)).collect();
                    if self.assign(&w, *line)? {
                        continue;
                    }
                    let nonempty = || w[1..].iter().filter(|a| !a.is_empty());
                    match w[0].as_str() {
                        "linux" | "linuxefi" | "linux16" => {
                            let mut it = nonempty();
                            let Some(path) = it.next() else {
                                return Err(refused(&format!("the entry '{title}'"), &self.line(*line)));
                            };
                            out.kernel = Some(self.file(path));
                            out.args = it.cloned().collect::<Vec<_>>().join(" ");
                        }
                        "initrd" | "initrdefi" | "initrd16" => out.initrds = nonempty().map(|p| self.file(p)).collect(),
                        "search" => self.search(title, &w[1..], *line)?,
                        c if HARMLESS.contains(&c) || self.functions.contains(c) => {}
                        _ => return Err(refused(&format!("the entry '{title}'"), &self.line(*line))),
                    }
                }
                Stmt::If { arms, otherwise } => {
                    let chosen = self.pick(arms, otherwise);
                    self.run(title, chosen, out)?;
                }
                Stmt::Function { name } => drop(self.functions.insert(name.clone())),
                Stmt::Menu { .. } => {}
            }
        }
        Ok(())
    }

    /// A path, with or without a `(device)` in front.
    fn file(&self, path: &str) -> FileRef {
        if let Some((dev, rest)) = path.strip_prefix('(').and_then(|p| p.split_once(')')) {
            let device = if self.vars.get("root").is_some_and(|r| r == dev) { self.root.clone() } else { device(dev) };
            return FileRef { device, path: rest.to_string() };
        }
        FileRef { device: self.root.clone(), path: path.to_string() }
    }

    /// `search [--fs-uuid|--label|--file] [--set=VAR] NAME`: sets `VAR` (default `root`).
    fn search(&mut self, title: &str, args: &[String], line: usize) -> Result<(), BootError> {
        let (mut kind, mut var, mut name) = ("file", "root".to_string(), None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--fs-uuid" | "-u" => kind = "uuid",
                "--label" | "-l" => kind = "label",
                "--file" | "-f" => kind = "file",
                "--set" | "-s" => var = it.next().cloned().unwrap_or_else(|| "root".into()),
                "--no-floppy" | "-n" => {}
                a if a.starts_with("--set=") => var = a[6..].to_string(),
                a if a.starts_with("--hint") => {}
                a if a.starts_with('-') => return Err(refused(&format!("the entry '{title}'"), &self.line(line))),
                a if name.is_none() => name = Some(a.to_string()),
                _ => {}
            }
        }
        let Some(name) = name else { return Err(refused(&format!("the entry '{title}'"), &self.line(line))) };
        let found = match kind {
            "uuid" => Device::Uuid(name.clone()),
            "label" => Device::Label(name.clone()),
            _ => Device::File(name.clone()),
        };
        self.vars.insert(var.clone(), name);
        if var == "root" {
            self.root = found;
        }
        Ok(())
    }
}
