//! SMBIOS 3.0 tables, where a guest looks for them without firmware: a 64-bit entry point
//! (`_SM3_`) at [`ADDR`] (in the BIOS area a scan covers, 0xf0000..0x100000) and the structure
//! table after it. They say what the machine is: BIOS (type 0), system (1, with its UUID:
//! cloud-init recognises OpenStack by the system product "OpenStack Compute"), baseboard (2),
//! chassis (3), OEM strings (11). Stacks set them with QEMU's `-smbios type=N,key=value,...` and
//! `-uuid`; the rest are smpft's defaults.

use std::fmt;

/// Where the entry point goes; the structure table follows it.
pub const ADDR: u64 = 0xf_0000;
/// The structure table's address.
const TABLE_ADDR: u64 = ADDR + 0x20;
/// The most the tables may take (the BIOS area up to 1 MiB).
const MAX_TABLE: usize = 0x1_0000 - 0x20;

/// The fields of each structure, as text (empty: not given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smbios {
    pub bios: Vec<(String, String)>,
    pub system: Vec<(String, String)>,
    pub board: Vec<(String, String)>,
    pub chassis: Vec<(String, String)>,
    pub oem_strings: Vec<String>,
    /// The system UUID (`-uuid`, or `uuid=` of type 1).
    pub uuid: Option<[u8; 16]>,
}

impl Default for Smbios {
    fn default() -> Self {
        Smbios {
            bios: vec![("vendor".into(), "smpft".into()), ("version".into(), env!("CARGO_PKG_VERSION").into())],
            system: vec![("manufacturer".into(), "smpft".into()), ("product".into(), "smpft VM".into())],
            board: Vec::new(),
            chassis: vec![("manufacturer".into(), "smpft".into())],
            oem_strings: Vec::new(),
            uuid: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmbiosError {
    #[error("'{0}': no type=N")]
    NoType(String),
    #[error("type={0} is not one smpft writes (0, 1, 2, 3, 11)")]
    Type(String),
    #[error("type={kind}: unknown field '{key}' (known: {known})")]
    Key { kind: u8, key: String, known: &'static str },
    #[error("'{0}' is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")]
    Uuid(String),
    #[error("'{0}' is not key=value")]
    Syntax(String),
    #[error("type={kind}: {key}= is empty or holds a NUL byte (an SMBIOS string is neither)")]
    String { kind: u8, key: String },
    #[error("type=11: more than 255 OEM strings (a structure numbers its strings with one byte)")]
    OemStrings,
    #[error("the SMBIOS tables take {0} bytes, more than fit below 1 MiB")]
    TooLarge(usize),
}

/// The fields each type takes, in the order of its strings.
const BIOS: &[&str] = &["vendor", "version", "date"];
const SYSTEM: &[&str] = &["manufacturer", "product", "version", "serial", "sku", "family"];
const BOARD: &[&str] = &["manufacturer", "product", "version", "serial", "asset", "location"];
const CHASSIS: &[&str] = &["manufacturer", "version", "serial", "asset", "sku"];

/// Splits QEMU's `key=value,key=value` (`,,` is a comma inside a value).
fn pairs(spec: &str) -> Result<Vec<(String, String)>, SmbiosError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = spec.chars().peekable();
    let mut items = Vec::new();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                cur.push(',');
            }
            ',' => items.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    items.push(cur);
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| SmbiosError::Syntax(item.clone()))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// A UUID in its text form.
pub fn parse_uuid(s: &str) -> Result<[u8; 16], SmbiosError> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    let groups: Vec<usize> = s.split('-').map(str::len).collect();
    if hex.len() != 32 || groups != [8, 4, 4, 4, 12] || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(SmbiosError::Uuid(s.to_string()));
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| SmbiosError::Uuid(s.to_string()))?;
    }
    Ok(u)
}

impl Smbios {
    /// Applies one `-smbios type=N,key=value,...` (QEMU's syntax).
    pub fn apply(&mut self, spec: &str) -> Result<(), SmbiosError> {
        let mut fields = pairs(spec)?;
        let at = fields.iter().position(|(k, _)| k == "type").ok_or_else(|| SmbiosError::NoType(spec.into()))?;
        let kind = fields.remove(at).1;
        let (n, table, known) = match kind.as_str() {
            "0" => (0, &mut self.bios, BIOS),
            "1" => (1, &mut self.system, SYSTEM),
            "2" => (2, &mut self.board, BOARD),
            "3" => (3, &mut self.chassis, CHASSIS),
            "11" => {
                for (k, v) in fields {
                    match k.as_str() {
                        // An OEM string has a number the guest looks it up by: it is never
                        // left out, so an empty one would end the string set early.
                        "value" if v.is_empty() || v.contains('\0') => {
                            return Err(SmbiosError::String { kind: 11, key: k })
                        }
                        "value" if self.oem_strings.len() == 255 => return Err(SmbiosError::OemStrings),
                        "value" => self.oem_strings.push(v),
                        _ => return Err(SmbiosError::Key { kind: 11, key: k, known: "value" }),
                    }
                }
                return Ok(());
            }
            _ => return Err(SmbiosError::Type(kind)),
        };
        for (k, v) in fields {
            if v.contains('\0') {
                return Err(SmbiosError::String { kind: n, key: k });
            }
            if n == 1 && k == "uuid" {
                self.uuid = Some(parse_uuid(&v)?);
            } else if known.contains(&k.as_str()) {
                table.retain(|(key, _)| *key != k);
                table.push((k, v));
            } else if n == 0 && k == "uefi" {
                // Whether the firmware is UEFI: there is none; the BIOS characteristics say so.
            } else {
                let known = match n {
                    0 => "vendor, version, date",
                    1 => "manufacturer, product, version, serial, uuid, sku, family",
                    2 => "manufacturer, product, version, serial, asset, location",
                    _ => "manufacturer, version, serial, asset, sku",
                };
                return Err(SmbiosError::Key { kind: n, key: k, known });
            }
        }
        Ok(())
    }

    /// The entry point and the structure table, as they go at [`ADDR`] and after it.
    pub fn tables(&self) -> Result<(Vec<u8>, u64, Vec<u8>), SmbiosError> {
        let mut t = Vec::new();
        t.extend(structure(0, 0, &self.bios, BIOS, &bios_body));
        t.extend(structure(1, 1, &self.system, SYSTEM, &|strings| system_body(strings, self.uuid)));
        if !self.board.is_empty() {
            t.extend(structure(2, 2, &self.board, BOARD, &board_body));
        }
        t.extend(structure(3, 3, &self.chassis, CHASSIS, &chassis_body));
        if !self.oem_strings.is_empty() {
            let mut s = vec![11, 5, 4, 0, self.oem_strings.len() as u8];
            s.extend(strings(self.oem_strings.iter().map(String::as_str)));
            t.extend(s);
        }
        t.extend([127, 4, 0x7f, 0, 0, 0]);
        if t.len() > MAX_TABLE {
            return Err(SmbiosError::TooLarge(t.len()));
        }
        let mut ep = Vec::with_capacity(24);
        ep.extend(b"_SM3_");
        ep.push(0); // checksum
        ep.extend([24, 3, 0, 0, 1, 0]); // length, version 3.0, docrev, entry revision, reserved
        ep.extend((t.len() as u32).to_le_bytes());
        ep.extend(TABLE_ADDR.to_le_bytes());
        ep[5] = 0u8.wrapping_sub(ep.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
        Ok((ep, TABLE_ADDR, t))
    }

    /// Writes the tables into guest memory.
    pub fn write(&self, mem: &crate::memory::GuestMemory) -> Result<(), crate::VmError> {
        let (ep, at, table) = self.tables().map_err(crate::VmError::Smbios)?;
        mem.write(ADDR, &ep)?;
        mem.write(at, &table)?;
        Ok(())
    }
}

impl fmt::Display for Smbios {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let get = |k: &str| self.system.iter().find(|(key, _)| key == k).map_or("", |(_, v)| v.as_str());
        write!(f, "system {} {}", get("manufacturer"), get("product"))
    }
}

/// The string-set of `fields` in `order`: each present one gets its number (1-based).
fn numbered<'a>(fields: &'a [(String, String)], order: &[&str]) -> (Vec<u8>, Vec<&'a str>) {
    let mut index = Vec::new();
    let mut set = Vec::new();
    for k in order {
        match fields.iter().find(|(key, v)| key == k && !v.is_empty()) {
            Some((_, v)) => {
                set.push(v.as_str());
                index.push(set.len().min(255) as u8);
            }
            None => index.push(0),
        }
    }
    (index, set)
}

/// A string set: each NUL-terminated, a second NUL at the end (two if empty).
fn strings<'a>(set: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for s in set {
        out.extend(s.bytes().filter(|&b| b != 0));
        out.push(0);
    }
    if out.is_empty() {
        out.push(0);
    }
    out.push(0);
    out
}

/// One structure: its formatted area (header, then `body` of the string numbers) and strings.
fn structure(
    kind: u8,
    handle: u16,
    fields: &[(String, String)],
    order: &[&str],
    body: &dyn Fn(&[u8]) -> Vec<u8>,
) -> Vec<u8> {
    let (index, set) = numbered(fields, order);
    let body = body(&index);
    let mut s = vec![kind, (4 + body.len()) as u8];
    s.extend(handle.to_le_bytes());
    s.extend(body);
    s.extend(strings(set.into_iter()));
    s
}

fn bios_body(i: &[u8]) -> Vec<u8> {
    // vendor, version, start segment 0xf000, date, ROM size, characteristics (BIOS
    // characteristics not supported: bit 3), extension bytes (bit 4 of byte 2: virtual
    // machine), release and firmware revisions unknown.
    let mut b = vec![i[0], i[1], 0x00, 0xf0, i[2], 0];
    b.extend((1u64 << 3).to_le_bytes());
    b.extend([0, 1 << 4, 0xff, 0xff, 0xff, 0xff]);
    b
}

fn system_body(i: &[u8], uuid: Option<[u8; 16]>) -> Vec<u8> {
    let mut b = vec![i[0], i[1], i[2], i[3]];
    // SMBIOS stores the first three UUID fields little-endian.
    b.extend(crate::vmgenid::swap_fields(uuid.unwrap_or([0; 16])));
    b.push(6); // wake-up type: power switch
    b.extend([i[4], i[5]]);
    b
}

fn board_body(i: &[u8]) -> Vec<u8> {
    // manufacturer, product, version, serial, asset, features (a hosting board), location,
    // chassis handle (3), type motherboard, no contained objects.
    vec![i[0], i[1], i[2], i[3], i[4], 1, i[5], 3, 0, 0x0a, 0]
}

fn chassis_body(i: &[u8]) -> Vec<u8> {
    // manufacturer, type other, version, serial, asset, boot-up/power/thermal state safe,
    // security none, OEM 0, height, cords, no contained elements, SKU.
    let mut b = vec![i[0], 1, i[1], i[2], i[3], 3, 3, 3, 3];
    b.extend([0u8; 4]);
    b.extend([0, 0, 0, 0, i[4]]);
    b
}

#[cfg(test)]
mod tests;
