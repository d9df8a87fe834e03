//! `VFIO_USER_DEVICE_FEATURE` and its migration features, and
//! `VFIO_USER_MIG_DATA_READ` / `VFIO_USER_MIG_DATA_WRITE` (spec sections of
//! the same names; Linux `struct vfio_device_feature`,
//! `vfio_device_feature_migration`, `vfio_device_feature_mig_state`,
//! `vfio_device_feature_dma_logging_control/_range/_report`, with the
//! pointers replaced by inline data as in libvfio-user's
//! `vfio_user_device_feature_*`).

use super::{len_u32, Reader, WireError, Writer};

/// `VFIO_DEVICE_FEATURE_MASK`: the feature index bits of `flags`.
pub const DEVICE_FEATURE_MASK: u32 = 0xffff;
/// `VFIO_DEVICE_FEATURE_GET`.
pub const DEVICE_FEATURE_GET: u32 = 1 << 16;
/// `VFIO_DEVICE_FEATURE_SET`.
pub const DEVICE_FEATURE_SET: u32 = 1 << 17;
/// `VFIO_DEVICE_FEATURE_PROBE`.
pub const DEVICE_FEATURE_PROBE: u32 = 1 << 18;

/// `VFIO_DEVICE_FEATURE_MIGRATION`.
pub const FEATURE_MIGRATION: u16 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
pub const FEATURE_MIG_DEVICE_STATE: u16 = 2;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`.
pub const FEATURE_DMA_LOGGING_START: u16 = 6;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
pub const FEATURE_DMA_LOGGING_STOP: u16 = 7;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`.
pub const FEATURE_DMA_LOGGING_REPORT: u16 = 8;

/// `VFIO_MIGRATION_STOP_COPY`: STOP, STOP_COPY and RESUMING are supported.
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
/// `VFIO_MIGRATION_P2P`: the P2P states are supported (never, here).
pub const MIGRATION_P2P: u64 = 1 << 1;
/// `VFIO_MIGRATION_PRE_COPY`: PRE_COPY is supported.
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;

/// The fixed part of a `DEVICE_FEATURE` request and reply (8 bytes),
/// followed by feature data.
///
/// ```text
/// 0 argsz u32 | 4 flags u32 (bits 0-15 feature, 16 GET, 17 SET, 18 PROBE)
/// 8 data
/// ```
///
/// Request `argsz`: largest reply body accepted (these 8 bytes included, as
/// in libvfio-user). Reply: same as the request for SET and PROBE; for GET
/// the data is appended and `argsz` is the size of the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFeature {
    /// See above.
    pub argsz: u32,
    /// Feature index and `DEVICE_FEATURE_GET/SET/PROBE`.
    pub flags: u32,
}

impl DeviceFeature {
    /// Size of the fixed part.
    pub const SIZE: usize = 8;

    /// The feature index.
    pub fn feature(&self) -> u16 {
        (self.flags & DEVICE_FEATURE_MASK) as u16
    }

    /// Encodes the fixed part followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + data.len());
        w.u32(self.argsz).u32(self.flags).bytes(data);
        w.into_vec()
    }

    /// Decodes the fixed part; returns it and the data. Checks that only
    /// known flag bits are set and that GET and SET are not both set without
    /// PROBE, and that neither is missing.
    pub fn decode(body: &[u8]) -> Result<(Self, &[u8]), WireError> {
        const WHAT: &str = "DEVICE_FEATURE";
        let mut r = Reader::new(WHAT, body);
        let f = Self {
            argsz: r.u32()?,
            flags: r.u32()?,
        };
        let ops = DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | DEVICE_FEATURE_PROBE;
        if f.flags & !(DEVICE_FEATURE_MASK | ops) != 0 || f.flags & ops == 0 {
            return Err(WireError::invalid(WHAT, "flags", f.flags));
        }
        let get_set = DEVICE_FEATURE_GET | DEVICE_FEATURE_SET;
        if f.flags & get_set == get_set && f.flags & DEVICE_FEATURE_PROBE == 0 {
            return Err(WireError::invalid(WHAT, "flags", f.flags));
        }
        if (f.argsz as usize) < Self::SIZE {
            return Err(WireError::invalid(WHAT, "argsz", f.argsz));
        }
        Ok((f, r.rest()))
    }
}

/// Data of `FEATURE_MIGRATION` (GET reply): `flags u64` (`MIGRATION_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationFeature {
    /// `MIGRATION_*`.
    pub flags: u64,
}

impl MigrationFeature {
    /// Encoded size.
    pub const SIZE: usize = 8;

    /// Encodes the data.
    pub fn encode(&self) -> Vec<u8> {
        self.flags.to_le_bytes().to_vec()
    }

    /// Decodes the data (exactly 8 bytes).
    pub fn decode(data: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("MIGRATION feature", data);
        let flags = r.u64()?;
        r.finish()?;
        Ok(Self { flags })
    }
}

/// Data of `FEATURE_MIG_DEVICE_STATE` (SET request, GET and SET replies).
///
/// ```text
/// 0 device_state u32 | 4 data_fd u32 (unused in vfio-user)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigStateFeature {
    /// A `vfio_device_mig_state` value (see `MigrationState`).
    pub device_state: u32,
    /// Unused; sent as `u32::MAX` (-1) by this crate in GET replies.
    pub data_fd: u32,
}

impl MigStateFeature {
    /// Encoded size.
    pub const SIZE: usize = 8;

    /// Encodes the data.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.device_state).u32(self.data_fd);
        w.into_vec()
    }

    /// Decodes the data (exactly 8 bytes).
    pub fn decode(data: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("MIG_DEVICE_STATE feature", data);
        let s = Self {
            device_state: r.u32()?,
            data_fd: r.u32()?,
        };
        r.finish()?;
        Ok(s)
    }
}

/// One IOVA range of [`DmaLoggingControl`] (16 bytes: `iova u64`,
/// `length u64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaLoggingRange {
    /// Base IOVA.
    pub iova: u64,
    /// Length of the range.
    pub length: u64,
}

/// Data of `FEATURE_DMA_LOGGING_START` (SET request and reply).
///
/// ```text
/// 0 page_size u64 | 8 num_ranges u32 | 12 reserved u32
/// 16 ranges: { iova u64, length u64 } x num_ranges (0 ranges: log all)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaLoggingControl {
    /// Tracking granularity (request: a hint; reply: the one chosen).
    pub page_size: u64,
    /// Ranges to log.
    pub ranges: Vec<DmaLoggingRange>,
}

impl DmaLoggingControl {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;

    /// Encodes the data.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + 16 * self.ranges.len());
        w.u64(self.page_size).u32(len_u32(self.ranges.len())).u32(0);
        for r in &self.ranges {
            w.u64(r.iova).u64(r.length);
        }
        w.into_vec()
    }

    /// Decodes the data: `num_ranges` must match the bytes present.
    pub fn decode(data: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DMA_LOGGING_START";
        let mut r = Reader::new(WHAT, data);
        let page_size = r.u64()?;
        let num_ranges = r.u32()?;
        let _reserved = r.u32()?;
        if r.remaining() / 16 != num_ranges as usize || r.remaining() % 16 != 0 {
            return Err(WireError::invalid(WHAT, "num_ranges", num_ranges));
        }
        let mut ranges = Vec::with_capacity(num_ranges as usize);
        for _ in 0..num_ranges {
            ranges.push(DmaLoggingRange {
                iova: r.u64()?,
                length: r.u64()?,
            });
        }
        r.finish()?;
        Ok(Self { page_size, ranges })
    }
}

/// Data of `FEATURE_DMA_LOGGING_REPORT` (GET request; the reply appends the
/// bitmap of `u64`s at offset 24).
///
/// ```text
/// 0 iova u64 | 8 length u64 | 16 page_size u64 | 24 bitmap (reply)
/// ```
///
/// Bit `n` (word `n / 64`, bit `n % 64`) reports the page
/// `iova + n * page_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaLoggingReport {
    /// Base IOVA.
    pub iova: u64,
    /// Length of the range.
    pub length: u64,
    /// Granularity of the bitmap (a power of two).
    pub page_size: u64,
}

impl DmaLoggingReport {
    /// Encoded size (without bitmap).
    pub const SIZE: usize = 24;

    /// Bytes of bitmap covering the range, `None` on a bad page size or
    /// overflow.
    pub fn bitmap_size(&self) -> Option<usize> {
        if !self.page_size.is_power_of_two() {
            return None;
        }
        let pages = self.length.div_ceil(self.page_size);
        let words = pages.div_ceil(64);
        usize::try_from(words.checked_mul(8)?).ok()
    }

    /// Encodes the fixed part followed by `bitmap` (empty for a request).
    pub fn encode(&self, bitmap: &[u64]) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + 8 * bitmap.len());
        w.u64(self.iova).u64(self.length).u64(self.page_size);
        for b in bitmap {
            w.u64(*b);
        }
        w.into_vec()
    }

    /// Decodes a request (exactly 24 bytes).
    pub fn decode(data: &[u8]) -> Result<Self, WireError> {
        let (r, bitmap) = Self::decode_with_bitmap(data)?;
        if !bitmap.is_empty() {
            return Err(WireError::Trailing {
                what: "DMA_LOGGING_REPORT",
                extra: bitmap.len() * 8,
            });
        }
        Ok(r)
    }

    /// Decodes a reply: the fixed part and a whole number of bitmap words.
    pub fn decode_with_bitmap(data: &[u8]) -> Result<(Self, Vec<u64>), WireError> {
        const WHAT: &str = "DMA_LOGGING_REPORT";
        let mut r = Reader::new(WHAT, data);
        let rep = Self {
            iova: r.u64()?,
            length: r.u64()?,
            page_size: r.u64()?,
        };
        if r.remaining() % 8 != 0 {
            return Err(WireError::Trailing {
                what: WHAT,
                extra: r.remaining() % 8,
            });
        }
        let mut bitmap = Vec::with_capacity(r.remaining() / 8);
        while r.remaining() != 0 {
            bitmap.push(r.u64()?);
        }
        Ok((rep, bitmap))
    }
}

/// The fixed part of `MIG_DATA_READ` request (alone) and reply, and of
/// `MIG_DATA_WRITE` request (8 bytes), followed by data in a read reply and a
/// write request.
///
/// ```text
/// 0 argsz u32 | 4 size u32 | 8 data[size]
/// ```
///
/// `MIG_DATA_READ` request: `argsz` is the largest reply body accepted (at
/// least 8 + `size`); reply: `argsz` is 8 + data, `size` the bytes returned
/// (fewer than asked: no more data). `MIG_DATA_WRITE` has no reply body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigData {
    /// See above.
    pub argsz: u32,
    /// Bytes of migration data.
    pub size: u32,
}

impl MigData {
    /// Size of the fixed part.
    pub const SIZE: usize = 8;

    /// Encodes the fixed part followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + data.len());
        w.u32(self.argsz).u32(self.size).bytes(data);
        w.into_vec()
    }

    /// Decodes a `MIG_DATA_READ` request: 8 bytes, `argsz >= 8 + size`.
    pub fn decode_read(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "MIG_DATA_READ";
        let mut r = Reader::new(WHAT, body);
        let m = Self {
            argsz: r.u32()?,
            size: r.u32()?,
        };
        r.finish()?;
        if u64::from(m.argsz) < Self::SIZE as u64 + u64::from(m.size) {
            return Err(WireError::invalid(WHAT, "argsz", m.argsz));
        }
        Ok(m)
    }

    /// Decodes a `MIG_DATA_READ` reply or `MIG_DATA_WRITE` request: `size`
    /// data bytes follow.
    pub fn decode_with_data(body: &[u8]) -> Result<(Self, &[u8]), WireError> {
        const WHAT: &str = "MIG_DATA";
        let mut r = Reader::new(WHAT, body);
        let m = Self {
            argsz: r.u32()?,
            size: r.u32()?,
        };
        let data = r.rest();
        if m.size as usize != data.len() {
            return Err(WireError::invalid(WHAT, "size", m.size));
        }
        Ok((m, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_feature_bytes() {
        let f = DeviceFeature {
            argsz: 16,
            flags: DEVICE_FEATURE_GET | u32::from(FEATURE_MIGRATION),
        };
        let expect = [16, 0, 0, 0, 1, 0, 1, 0];
        assert_eq!(f.encode(&[]), expect);
        assert_eq!(DeviceFeature::decode(&expect).unwrap(), (f, &[][..]));
        assert_eq!(f.feature(), 1);

        // SET MIG_DEVICE_STATE to STOP_COPY
        let set = DeviceFeature {
            argsz: 16,
            flags: DEVICE_FEATURE_SET | u32::from(FEATURE_MIG_DEVICE_STATE),
        };
        let state = MigStateFeature {
            device_state: 3,
            data_fd: 0,
        };
        assert_eq!(
            set.encode(&state.encode()),
            [16, 0, 0, 0, 2, 0, 2, 0, 3, 0, 0, 0, 0, 0, 0, 0]
        );

        // PROBE with GET|SET is allowed; GET|SET alone, none, unknown bits are not.
        let probe =
            (DEVICE_FEATURE_PROBE | DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | 2).to_le_bytes();
        assert!(
            DeviceFeature::decode(&[8, 0, 0, 0, probe[0], probe[1], probe[2], probe[3]]).is_ok()
        );
        for flags in [
            DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | 2,
            2,
            DEVICE_FEATURE_GET | (1 << 19),
        ] {
            let mut b = vec![8, 0, 0, 0];
            b.extend_from_slice(&flags.to_le_bytes());
            assert!(DeviceFeature::decode(&b).is_err(), "{flags:#x}");
        }
        assert!(DeviceFeature::decode(&[4, 0, 0, 0, 1, 0, 1, 0]).is_err());
        assert!(DeviceFeature::decode(&[8, 0, 0, 0, 1, 0]).is_err());
    }

    #[test]
    fn migration_feature_bytes() {
        let m = MigrationFeature {
            flags: MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
        };
        assert_eq!(m.encode(), [5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(MigrationFeature::decode(&m.encode()).unwrap(), m);
        assert!(MigrationFeature::decode(&[5, 0, 0, 0]).is_err());
    }

    #[test]
    fn mig_state_bytes() {
        let s = MigStateFeature {
            device_state: 6,
            data_fd: u32::MAX,
        };
        assert_eq!(s.encode(), [6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(MigStateFeature::decode(&s.encode()).unwrap(), s);
        assert!(MigStateFeature::decode(&[6, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn dma_logging_control_bytes() {
        let c = DmaLoggingControl {
            page_size: 4096,
            ranges: vec![DmaLoggingRange {
                iova: 0x10_0000,
                length: 0x4000,
            }],
        };
        #[rustfmt::skip]
        let expect = [
            0, 0x10, 0, 0, 0, 0, 0, 0,  // page_size
            1, 0, 0, 0,                 // num_ranges
            0, 0, 0, 0,                 // reserved
            0, 0, 0x10, 0, 0, 0, 0, 0,  // iova
            0, 0x40, 0, 0, 0, 0, 0, 0,  // length
        ];
        assert_eq!(c.encode(), expect);
        assert_eq!(DmaLoggingControl::decode(&expect).unwrap(), c);
        assert!(DmaLoggingControl::decode(&expect[..24]).is_err());
        let mut more = expect;
        more[8] = 2;
        assert!(DmaLoggingControl::decode(&more).is_err());
        let mut huge = expect;
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(DmaLoggingControl::decode(&huge).is_err());
        // zero ranges: log everything
        let all = DmaLoggingControl::decode(
            &expect[..16]
                .iter()
                .enumerate()
                .map(|(i, b)| if i == 8 { 0 } else { *b })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(all.ranges.is_empty());
    }

    #[test]
    fn dma_logging_report_bytes() {
        let r = DmaLoggingReport {
            iova: 0x1000,
            length: 0x3000,
            page_size: 0x1000,
        };
        #[rustfmt::skip]
        let expect_req = [
            0, 0x10, 0, 0, 0, 0, 0, 0,
            0, 0x30, 0, 0, 0, 0, 0, 0,
            0, 0x10, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(r.encode(&[]), expect_req);
        assert_eq!(DmaLoggingReport::decode(&expect_req).unwrap(), r);
        assert_eq!(r.bitmap_size(), Some(8));
        let reply = r.encode(&[0b101]);
        assert_eq!(&reply[24..], &[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            DmaLoggingReport::decode_with_bitmap(&reply).unwrap(),
            (r, vec![5])
        );
        assert!(DmaLoggingReport::decode(&reply).is_err());
        assert!(DmaLoggingReport::decode_with_bitmap(&reply[..30]).is_err());
        let bad = DmaLoggingReport { page_size: 3, ..r };
        assert_eq!(bad.bitmap_size(), None);
        let big = DmaLoggingReport {
            iova: 0,
            length: u64::MAX,
            page_size: 1,
        };
        assert_eq!(big.bitmap_size(), Some(((u64::MAX / 64) + 1) as usize * 8));
    }

    #[test]
    fn mig_data_bytes() {
        let req = MigData {
            argsz: 8 + 4096,
            size: 4096,
        };
        assert_eq!(req.encode(&[]), [8, 0x10, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(MigData::decode_read(&req.encode(&[])).unwrap(), req);
        let small = MigData {
            argsz: 8,
            size: 4096,
        };
        assert!(MigData::decode_read(&small.encode(&[])).is_err());
        let w = MigData { argsz: 11, size: 3 };
        let expect = [11, 0, 0, 0, 3, 0, 0, 0, 1, 2, 3];
        assert_eq!(w.encode(&[1, 2, 3]), expect);
        assert_eq!(
            MigData::decode_with_data(&expect).unwrap(),
            (w, &[1, 2, 3][..])
        );
        assert!(MigData::decode_with_data(&expect[..10]).is_err());
        // argsz + size overflow in u32 arithmetic is not an issue
        let wrap = MigData {
            argsz: u32::MAX,
            size: u32::MAX,
        };
        assert!(MigData::decode_read(&wrap.encode(&[])).is_err());
    }
}
