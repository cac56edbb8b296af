//! GRUB's script language, as far as `grub.cfg` files use it: words (quotes, escapes, `$var`
//! and `${var}`), commands separated by newlines or `;`, `if`/`elif`/`else`/`fi`, `function`,
//! and `menuentry`/`submenu` blocks. Loops are not understood (grub-mkconfig writes none).

use crate::BootError;

/// Deepest nesting of blocks accepted.
pub const MAX_DEPTH: usize = 32;

/// A piece of a word: literal text, or a variable expanded when the word is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Lit(String),
    Var(String),
}

/// One word: its pieces, joined when expanded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Word(pub Vec<Seg>);

impl Word {
    /// The word's text if it has no variables (keywords must be written out).
    pub fn literal(&self) -> Option<String> {
        let mut s = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Lit(l) => s.push_str(l),
                Seg::Var(_) => return None,
            }
        }
        Some(s)
    }
}

/// A statement and the line (0-based) it starts on.
#[derive(Debug, Clone)]
pub enum Stmt {
    Cmd { words: Vec<Word>, line: usize },
    If { arms: Vec<(Vec<Stmt>, Vec<Stmt>)>, otherwise: Vec<Stmt> },
    Function { name: String },
    Menu { submenu: bool, args: Vec<Word>, body: Vec<Stmt>, line: usize },
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(Word),
    Sep,
    Open,
    Close,
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
    line: usize,
}

fn err(line: usize, why: &str) -> BootError {
    BootError::Invalid(format!("grub.cfg line {}: {why}", line + 1))
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next_tok(&mut self) -> Result<Option<(Tok, usize)>, BootError> {
        loop {
            match self.peek() {
                None => return Ok(None),
                Some(b' ' | b'\t' | b'\r') => self.i += 1,
                Some(b'\\') if self.s.get(self.i + 1) == Some(&b'\n') => {
                    self.i += 2;
                    self.line += 1;
                }
                Some(b'#') => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                Some(b'\n') => {
                    self.i += 1;
                    self.line += 1;
                    return Ok(Some((Tok::Sep, self.line - 1)));
                }
                Some(b';') => {
                    self.i += 1;
                    return Ok(Some((Tok::Sep, self.line)));
                }
                Some(b'{') => {
                    self.i += 1;
                    return Ok(Some((Tok::Open, self.line)));
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Some((Tok::Close, self.line)));
                }
                Some(_) => {
                    let line = self.line;
                    return Ok(Some((Tok::Word(self.word()?), line)));
                }
            }
        }
    }

    fn word(&mut self) -> Result<Word, BootError> {
        let mut segs = Vec::new();
        let mut lit = Vec::new();
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' | b'}' => break,
                b'\'' => {
                    self.i += 1;
                    let start = self.i;
                    while self.peek().is_some_and(|c| c != b'\'') {
                        self.line += usize::from(self.peek() == Some(b'\n'));
                        self.i += 1;
                    }
                    if self.peek().is_none() {
                        return Err(err(self.line, "a quote (') is not closed"));
                    }
                    lit.extend_from_slice(&self.s[start..self.i]);
                    self.i += 1;
                }
                b'"' => {
                    self.i += 1;
                    self.double_quoted(&mut segs, &mut lit)?;
                }
                b'\\' => {
                    self.i += 1;
                    if let Some(c) = self.peek() {
                        lit.push(c);
                        self.i += 1;
                    }
                }
                b'$' => self.variable(&mut segs, &mut lit)?,
                _ => {
                    lit.push(c);
                    self.i += 1;
                }
            }
        }
        flush(&mut segs, &mut lit);
        Ok(Word(segs))
    }

    fn double_quoted(&mut self, segs: &mut Vec<Seg>, lit: &mut Vec<u8>) -> Result<(), BootError> {
        loop {
            match self.peek() {
                None => return Err(err(self.line, "a quote (\") is not closed")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') if matches!(self.s.get(self.i + 1), Some(b'"' | b'\\' | b'$' | b'\n')) => {
                    if self.s[self.i + 1] != b'\n' {
                        lit.push(self.s[self.i + 1]);
                    }
                    self.i += 2;
                }
                Some(b'$') => self.variable(segs, lit)?,
                Some(c) => {
                    self.line += usize::from(c == b'\n');
                    lit.push(c);
                    self.i += 1;
                }
            }
        }
    }

    fn variable(&mut self, segs: &mut Vec<Seg>, lit: &mut Vec<u8>) -> Result<(), BootError> {
        self.i += 1;
        let name = if self.peek() == Some(b'{') {
            let start = self.i + 1;
            let Some(len) = self.s[start..].iter().position(|&c| c == b'}') else {
                return Err(err(self.line, "a ${ is not closed"));
            };
            self.i = start + len + 1;
            &self.s[start..start + len]
        } else {
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                self.i += 1;
            }
            if self.i == start && self.peek().is_some_and(|c| b"?#@*".contains(&c)) {
                self.i += 1;
            }
            &self.s[start..self.i]
        };
        if name.is_empty() {
            lit.push(b'$');
            return Ok(());
        }
        flush(segs, lit);
        segs.push(Seg::Var(String::from_utf8_lossy(name).into_owned()));
        Ok(())
    }
}

fn flush(segs: &mut Vec<Seg>, lit: &mut Vec<u8>) {
    if !lit.is_empty() {
        segs.push(Seg::Lit(String::from_utf8_lossy(lit).into_owned()));
        lit.clear();
    }
}

/// Parses a whole `grub.cfg`.
pub fn parse(text: &str) -> Result<Vec<Stmt>, BootError> {
    let mut lexer = Lexer { s: text.as_bytes(), i: 0, line: 0 };
    let mut toks = Vec::new();
    while let Some(t) = lexer.next_tok()? {
        toks.push(t);
    }
    let mut p = Parser { toks, i: 0 };
    let (list, end) = p.list(&[], 0)?;
    match end {
        End::Eof => Ok(list),
        End::Close(line) => Err(err(line, "a } closes no block")),
        End::Keyword(k, line) => Err(err(line, &format!("'{k}' outside an if"))),
    }
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    i: usize,
}

enum End {
    Eof,
    Close(usize),
    Keyword(String, usize),
}

impl Parser {
    fn line(&self) -> usize {
        self.toks.get(self.i).or(self.toks.last()).map_or(0, |t| t.1)
    }

    /// Statements up to one of `keywords` at a statement's start, a `}` or the end.
    fn list(&mut self, keywords: &[&str], depth: usize) -> Result<(Vec<Stmt>, End), BootError> {
        if depth > MAX_DEPTH {
            return Err(err(self.line(), &format!("blocks nest deeper than {MAX_DEPTH}")));
        }
        let mut out = Vec::new();
        loop {
            let Some((tok, line)) = self.toks.get(self.i).cloned() else { return Ok((out, End::Eof)) };
            self.i += 1;
            let first = match tok {
                Tok::Sep => continue,
                Tok::Close => return Ok((out, End::Close(line))),
                Tok::Open => return Err(err(line, "a { that opens no menuentry, submenu or function")),
                Tok::Word(w) => w,
            };
            let kw = first.literal().unwrap_or_default();
            if keywords.contains(&kw.as_str()) {
                return Ok((out, End::Keyword(kw, line)));
            }
            out.push(match kw.as_str() {
                "if" => self.if_(depth)?,
                "function" => self.function(depth)?,
                "menuentry" | "submenu" => self.menu(kw == "submenu", line, depth)?,
                "for" | "while" | "until" | "case" => return Err(err(line, &format!("'{kw}' is not understood"))),
                _ => self.command(first, line)?,
            });
        }
    }

    fn command(&mut self, first: Word, line: usize) -> Result<Stmt, BootError> {
        let mut words = vec![first];
        while let Some((tok, l)) = self.toks.get(self.i).cloned() {
            match tok {
                Tok::Word(w) => words.push(w),
                // `{ linux /k }`: the brace ends the command and closes the block.
                Tok::Sep | Tok::Close => break,
                Tok::Open => return Err(err(l, "a { in the middle of a command")),
            }
            self.i += 1;
        }
        Ok(Stmt::Cmd { words, line })
    }

    fn if_(&mut self, depth: usize) -> Result<Stmt, BootError> {
        let mut arms = Vec::new();
        loop {
            let (cond, end) = self.list(&["then"], depth + 1)?;
            expect(end, "then")?;
            let (body, end) = self.list(&["elif", "else", "fi"], depth + 1)?;
            arms.push((cond, body));
            match end {
                End::Keyword(k, _) if k == "elif" => continue,
                End::Keyword(k, _) if k == "fi" => return Ok(Stmt::If { arms, otherwise: Vec::new() }),
                End::Keyword(_, _) => {
                    let (otherwise, end) = self.list(&["fi"], depth + 1)?;
                    expect(end, "fi")?;
                    return Ok(Stmt::If { arms, otherwise });
                }
                end => return Err(unexpected(end, "fi")),
            }
        }
    }

    fn block_args(&mut self) -> Result<Vec<Word>, BootError> {
        let mut args = Vec::new();
        loop {
            match self.toks.get(self.i).cloned() {
                Some((Tok::Word(w), _)) => args.push(w),
                Some((Tok::Open, _)) => {
                    self.i += 1;
                    return Ok(args);
                }
                Some((Tok::Sep, _)) if args.is_empty() => {}
                _ => return Err(err(self.line(), "a block without its {")),
            }
            self.i += 1;
        }
    }

    fn block(&mut self, depth: usize) -> Result<Vec<Stmt>, BootError> {
        let (body, end) = self.list(&[], depth + 1)?;
        match end {
            End::Close(_) => Ok(body),
            _ => Err(err(self.line(), "a block is not closed with }")),
        }
    }

    fn function(&mut self, depth: usize) -> Result<Stmt, BootError> {
        let args = self.block_args()?;
        let name = args.first().and_then(Word::literal).unwrap_or_default();
        self.block(depth)?;
        Ok(Stmt::Function { name })
    }

    fn menu(&mut self, submenu: bool, line: usize, depth: usize) -> Result<Stmt, BootError> {
        let args = self.block_args()?;
        let body = self.block(depth)?;
        Ok(Stmt::Menu { submenu, args, body, line })
    }
}

fn expect(end: End, kw: &str) -> Result<(), BootError> {
    match end {
        End::Keyword(k, _) if k == kw => Ok(()),
        end => Err(unexpected(end, kw)),
    }
}

fn unexpected(end: End, kw: &str) -> BootError {
    match end {
        End::Keyword(k, line) => err(line, &format!("'{k}' where '{kw}' was expected")),
        End::Close(line) => err(line, &format!("a }} where '{kw}' was expected")),
        End::Eof => BootError::Invalid(format!("grub.cfg ends where '{kw}' was expected")),
    }
}
