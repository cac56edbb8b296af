//! Sense data (SPC-4 §4.5): what a command that ends in CHECK CONDITION says about why, in the
//! fixed format (response code 0x70), which is what the device returns with every such
//! command (virtio-scsi delivers it with the response: autosense).

/// SCSI status codes (SAM-5 §5.3).
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys.
pub const NO_SENSE: u8 = 0x00;
pub const MEDIUM_ERROR: u8 = 0x03;
pub const ILLEGAL_REQUEST: u8 = 0x05;
pub const DATA_PROTECT: u8 = 0x07;

/// The length of fixed-format sense data with no additional bytes beyond the standard ones.
pub const FIXED_LEN: usize = 18;

/// A sense key with its additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (0x20/0x00).
    pub const INVALID_OPCODE: Sense = Sense { key: ILLEGAL_REQUEST, asc: 0x20, ascq: 0x00 };
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (0x21/0x00).
    pub const LBA_OUT_OF_RANGE: Sense = Sense { key: ILLEGAL_REQUEST, asc: 0x21, ascq: 0x00 };
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (0x24/0x00).
    pub const INVALID_FIELD: Sense = Sense { key: ILLEGAL_REQUEST, asc: 0x24, ascq: 0x00 };
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (0x25/0x00): no disk at that LUN.
    pub const LUN_NOT_SUPPORTED: Sense = Sense { key: ILLEGAL_REQUEST, asc: 0x25, ascq: 0x00 };
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (0x26/0x00).
    pub const INVALID_PARAMETER: Sense = Sense { key: ILLEGAL_REQUEST, asc: 0x26, ascq: 0x00 };
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (0x1a/0x00).
    pub const PARAMETER_LENGTH: Sense = Sense { key: ILLEGAL_REQUEST, asc: 0x1a, ascq: 0x00 };
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED (0x39/0x00).
    pub const SAVING_NOT_SUPPORTED: Sense = Sense { key: ILLEGAL_REQUEST, asc: 0x39, ascq: 0x00 };
    /// DATA PROTECT, WRITE PROTECTED (0x27/0x00): a read-only disk.
    pub const WRITE_PROTECTED: Sense = Sense { key: DATA_PROTECT, asc: 0x27, ascq: 0x00 };
    /// MEDIUM ERROR, UNRECOVERED READ ERROR (0x11/0x00): the storage failed a read.
    pub const READ_ERROR: Sense = Sense { key: MEDIUM_ERROR, asc: 0x11, ascq: 0x00 };
    /// MEDIUM ERROR, WRITE ERROR (0x0c/0x00): the storage failed a write, flush or unmap.
    pub const WRITE_ERROR: Sense = Sense { key: MEDIUM_ERROR, asc: 0x0c, ascq: 0x00 };
    /// NO SENSE: nothing to report (REQUEST SENSE when no CHECK CONDITION is pending).
    pub const NONE: Sense = Sense { key: NO_SENSE, asc: 0x00, ascq: 0x00 };

    /// The fixed format: current error, the key, no information, 10 additional bytes with the
    /// additional sense code and qualifier.
    pub fn fixed(&self) -> [u8; FIXED_LEN] {
        let mut b = [0u8; FIXED_LEN];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        b[7] = (FIXED_LEN - 8) as u8;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_sense_data_has_the_key_and_codes_where_drivers_read_them() {
        let b = Sense::LBA_OUT_OF_RANGE.fixed();
        assert_eq!(b[0] & 0x7f, 0x70, "current error, fixed format");
        assert_eq!(b[2] & 0x0f, ILLEGAL_REQUEST);
        assert_eq!(usize::from(b[7]) + 8, FIXED_LEN, "additional sense length");
        assert_eq!((b[12], b[13]), (0x21, 0x00));
        assert_eq!(Sense::NONE.fixed()[2], NO_SENSE);
    }
}
