//! What a logical unit says about itself: INQUIRY's vital product data pages (SPC-4 §7.8,
//! SBC-3 §6.6) and MODE SENSE's mode pages (SPC-4 §7.5, SBC-3 §6.4).

use super::emulate::{standard_inquiry, Lun, Reply, BLOCK, MAX_BLOCKS, MAX_UNMAP_DESCRIPTORS};
use super::sense::Sense;

/// The VPD pages, in order (page 0x00 lists them).
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// A VPD page: its code, the length, then `body`.
fn vpd(code: u8, body: &[u8]) -> Vec<u8> {
    let mut d = vec![0, code];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(body);
    d
}

fn be16(cdb: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([cdb[at], cdb[at + 1]]))
}

/// Mode page codes.
const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0a;
const ALL_PAGES: u8 = 0x3f;

impl Lun {
    /// INQUIRY: standard data, or a VPD page (EVPD).
    pub(super) fn inquiry(&self, cdb: &[u8]) -> Result<Reply, Sense> {
        let (evpd, page, alloc) = (cdb[1] & 1 != 0, cdb[2], be16(cdb, 3));
        // CMDDT is obsolete; a page code needs EVPD.
        if cdb[1] & 2 != 0 || (!evpd && page != 0) {
            return Err(Sense::INVALID_FIELD);
        }
        if !evpd {
            return Ok(Reply::data_cut(standard_inquiry(), alloc));
        }
        let page = match page {
            0x00 => vpd(0x00, &VPD_PAGES),
            0x80 => vpd(0x80, self.serial.as_bytes()),
            0x83 => vpd(0x83, &self.identification()),
            0xb0 => vpd(0xb0, &self.block_limits()),
            // Block device characteristics: rotation rate and form factor not reported.
            0xb1 => vpd(0xb1, &[0u8; 0x3c]),
            0xb2 => vpd(0xb2, &self.provisioning()),
            _ => return Err(Sense::INVALID_FIELD),
        };
        Ok(Reply::data_cut(page, alloc))
    }

    /// VPD 0x83: one designator, a T10 vendor ID (ASCII) naming the disk.
    fn identification(&self) -> Vec<u8> {
        let mut id = b"SMPFT   ".to_vec();
        id.extend_from_slice(self.serial.as_bytes());
        id.truncate(255);
        let mut d = vec![0x02, 0x01, 0x00, id.len() as u8]; // ASCII; LUN; T10 vendor ID
        d.extend_from_slice(&id);
        d
    }

    /// VPD 0xb0, block limits: transfers, UNMAP and WRITE SAME up to [`MAX_BLOCKS`]; WSNZ (a
    /// WRITE SAME of zero blocks is refused).
    fn block_limits(&self) -> [u8; 0x3c] {
        let mut b = [0u8; 0x3c];
        let mut put = |at: usize, v: &[u8]| b[at - 4..at - 4 + v.len()].copy_from_slice(v);
        put(4, &[0x01]); // WSNZ
        put(8, &MAX_BLOCKS.to_be_bytes()); // maximum transfer length
        if self.can_unmap() {
            put(20, &MAX_BLOCKS.to_be_bytes()); // maximum unmap LBA count
            put(24, &MAX_UNMAP_DESCRIPTORS.to_be_bytes()); // maximum unmap block descriptor count
        }
        put(36, &u64::from(MAX_BLOCKS).to_be_bytes()); // maximum write same length
        b
    }

    /// VPD 0xb2, logical block provisioning: UNMAP and WRITE SAME(16/10) with UNMAP work on a
    /// writable disk, and unmapped blocks read as zeroes (every backend's discard leaves
    /// zeroes, so the two copies of a protected disk stay identical).
    fn provisioning(&self) -> [u8; 4] {
        if self.can_unmap() {
            [0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0] // LBPU, LBPWS, LBPWS10, LBPRZ; thin provisioned
        } else {
            [0; 4]
        }
    }

    /// MODE SENSE (6, 10): the caching page, the control page, or both (0x3f).
    pub(super) fn mode_sense(&self, cdb: &[u8]) -> Result<Reply, Sense> {
        let ten = cdb[0] == 0x5a;
        let (dbd, control, page, subpage) = (cdb[1] & 0x08 != 0, cdb[2] >> 6, cdb[2] & 0x3f, cdb[3]);
        let alloc = if ten { be16(cdb, 7) } else { usize::from(cdb[4]) };
        if control == 3 {
            return Err(Sense::SAVING_NOT_SUPPORTED);
        }
        if subpage != 0 && !(page == ALL_PAGES && subpage == 0xff) {
            return Err(Sense::INVALID_FIELD);
        }
        let changeable = control == 1;
        let mut pages = Vec::new();
        if matches!(page, CACHING | ALL_PAGES) {
            pages.extend_from_slice(&self.caching_page(changeable));
        }
        if matches!(page, CONTROL | ALL_PAGES) {
            pages.extend_from_slice(&control_page());
        }
        if pages.is_empty() {
            return Err(Sense::INVALID_FIELD);
        }
        let descriptor = if dbd { Vec::new() } else { self.block_descriptor() };
        let wp = if self.io.readonly() { 0x80 } else { 0 };
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[3] = wp;
            h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
            h
        } else {
            vec![0, 0, wp, descriptor.len() as u8]
        };
        d.extend_from_slice(&descriptor);
        d.extend_from_slice(&pages);
        // The mode data length counts the bytes after itself.
        if ten {
            let n = (d.len() - 2) as u16;
            d[..2].copy_from_slice(&n.to_be_bytes());
        } else {
            d[0] = (d.len() - 1) as u8;
        }
        Ok(Reply::data_cut(d, alloc))
    }

    /// The short block descriptor: the number of blocks (all ones if it does not fit) and the
    /// block length.
    fn block_descriptor(&self) -> Vec<u8> {
        let blocks = (self.io.size() / BLOCK).min(u64::from(u32::MAX)) as u32;
        let mut d = blocks.to_be_bytes().to_vec();
        d.extend_from_slice(&[0, 0, (BLOCK >> 8) as u8, BLOCK as u8]);
        d
    }

    /// Mode page 0x08, caching: WCE as the disk has it (nothing changeable).
    fn caching_page(&self, changeable: bool) -> [u8; 20] {
        let mut p = [0u8; 20];
        p[0] = CACHING;
        p[1] = 18;
        if self.write_cache && !changeable {
            p[2] = 0x04; // WCE
        }
        p
    }
}

/// Mode page 0x0a, control: all defaults (nothing changeable).
fn control_page() -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = CONTROL;
    p[1] = 10;
    p
}
