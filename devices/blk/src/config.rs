//! The device's face to the driver: virtio feature bits and the
//! `virtio_blk_config` space (virtio 1.2, section 5.2.4), all fields
//! little-endian at the offsets of `struct virtio_blk_config`.

use std::mem::{offset_of, size_of};

use virtio_bindings::bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use crate::engine::MAX_DISCARD_SECTORS;
use crate::request::SECTOR_SIZE;

/// Bytes of the config space (`struct virtio_blk_config`, up to the zoned
/// characteristics).
pub const CONFIG_LEN: usize = size_of::<virtio_blk_config>();

/// Discard granularity hint, in sectors (4 KiB, the usual filesystem block).
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// What the device offers, from which features and config follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceShape {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Number of request queues.
    pub queues: u16,
    /// Maximum queue size (sets `seg_max`).
    pub queue_size: u16,
    /// Read-only disk: offer RO, no DISCARD / WRITE_ZEROES.
    pub readonly: bool,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

impl DeviceShape {
    /// The virtio feature bits offered (transport and device bits; no
    /// vhost-user bits).
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ;
        if self.event_idx {
            f |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// The whole config space.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        // Linux sizes its scatterlists by seg_max; leave room for the
        // header and status descriptors, like QEMU.
        let seg_max = u32::from(self.queue_size.max(3)) - 2;
        put(
            &mut c,
            offset_of!(virtio_blk_config, capacity),
            &self.capacity.to_le_bytes(),
        );
        put(
            &mut c,
            offset_of!(virtio_blk_config, seg_max),
            &seg_max.to_le_bytes(),
        );
        put(
            &mut c,
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_SIZE as u32).to_le_bytes(),
        );
        put(
            &mut c,
            offset_of!(virtio_blk_config, num_queues),
            &self.queues.to_le_bytes(),
        );
        if !self.readonly {
            let fields: [(usize, u32); 5] = [
                (
                    offset_of!(virtio_blk_config, max_discard_sectors),
                    MAX_DISCARD_SECTORS,
                ),
                (offset_of!(virtio_blk_config, max_discard_seg), 1),
                (
                    offset_of!(virtio_blk_config, discard_sector_alignment),
                    DISCARD_ALIGNMENT_SECTORS,
                ),
                (
                    offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                    MAX_DISCARD_SECTORS,
                ),
                (offset_of!(virtio_blk_config, max_write_zeroes_seg), 1),
            ];
            for (off, v) in fields {
                put(&mut c, off, &v.to_le_bytes());
            }
            put(
                &mut c,
                offset_of!(virtio_blk_config, write_zeroes_may_unmap),
                &[1],
            );
        }
        c
    }

    /// `size` bytes of config space from `offset`, zero-filled past its
    /// end; empty when `size` is beyond any config space vhost-user allows
    /// (4 KiB).
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        const MAX: u32 = 4096;
        if size > MAX {
            return Vec::new();
        }
        let mut out = vec![0u8; size as usize];
        let space = self.config_space();
        if let Some(src) = space.get(offset as usize..) {
            for (d, s) in out.iter_mut().zip(src) {
                *d = *s;
            }
        }
        out
    }
}

fn put(c: &mut [u8], offset: usize, bytes: &[u8]) {
    if let Some(dst) = c.get_mut(offset..offset + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(readonly: bool) -> DeviceShape {
        DeviceShape {
            capacity: 2048,
            queues: 2,
            queue_size: 256,
            readonly,
            event_idx: true,
        }
    }

    fn le32(c: &[u8], off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&c[off..off + 4]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn layout() {
        let c = shape(false).config_space();
        assert_eq!(CONFIG_LEN, 96);
        assert_eq!(&c[0..8], &2048u64.to_le_bytes());
        assert_eq!(le32(&c, 12), 254); // seg_max
        assert_eq!(le32(&c, 20), 512); // blk_size
        assert_eq!(&c[34..36], &2u16.to_le_bytes()); // num_queues
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 40), 1);
        assert_eq!(le32(&c, 44), DISCARD_ALIGNMENT_SECTORS);
        assert_eq!(le32(&c, 48), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 52), 1);
        assert_eq!(c[56], 1);
        assert_eq!(&c[57..], &[0u8; 39][..]);
    }

    #[test]
    fn readonly_features() {
        let ro = shape(true);
        assert_ne!(ro.features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(ro.features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(ro.features() & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_eq!(le32(&ro.config_space(), 36), 0);
        let rw = shape(false);
        assert_eq!(rw.features() & 1 << VIRTIO_BLK_F_RO, 0);
        let no_eidx = DeviceShape {
            event_idx: false,
            ..rw
        };
        assert_eq!(no_eidx.features() & 1 << VIRTIO_RING_F_EVENT_IDX, 0);
    }

    #[test]
    fn read_config_any_offset() {
        let s = shape(false);
        assert_eq!(s.read_config(0, 8), 2048u64.to_le_bytes().to_vec());
        assert_eq!(s.read_config(20, 4), 512u32.to_le_bytes().to_vec());
        assert_eq!(s.read_config(90, 10), {
            let mut v = vec![0u8; 10];
            v[..6].copy_from_slice(&s.config_space()[90..]);
            v
        });
        assert_eq!(s.read_config(u32::MAX, 4), vec![0u8; 4]);
        assert_eq!(s.read_config(0, 0), Vec::<u8>::new());
        assert!(s.read_config(0, u32::MAX).is_empty());
    }
}
