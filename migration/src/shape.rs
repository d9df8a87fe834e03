//! The VM shape: what a destination must match before it takes a guest.
//!
//! The source sends its shape in the handshake; the destination builds its
//! own from its own config and calls [`check`]. Memory size, vCPU count and
//! the device list (same ids in the same order, each with the same kind and
//! transport) must be equal, since the guest already saw them. Each device's
//! state format must be one the destination's device accepts: the same
//! format UUID, and a source version no newer than the destination's (a
//! device loads the versions of its format up to its own). The device
//! process still checks the blob itself when it loads it; this check only
//! lets a refusal happen before the source gives up anything.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A VM's shape, as carried in [`crate::Section::Handshake`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmShape {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The devices, in config order (which fixes their guest addresses).
    pub devices: Vec<DeviceShape>,
}

/// One device of a [`VmShape`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceShape {
    /// The device's id (unique in the VM).
    pub id: String,
    /// Its kind, as the config names it (e.g. `vhost-user-blk`).
    pub kind: String,
    /// Its transport, as the config names it (e.g. `mmio`, `pci`).
    pub transport: String,
    /// The format of its state blob; `None` for a device without one.
    pub state_format: Option<StateFormat>,
}

/// A device state format: which format, and which version of it. On the
/// source, the version the blob is written in; on the destination, the
/// newest version the device loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFormat {
    /// The format's UUID (written in the usual 8-4-4-4-12 hex form).
    #[serde(with = "uuid_text")]
    pub uuid: [u8; 16],
    /// The format version.
    pub version: u32,
}

impl fmt::Display for StateFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uuid {} version {}",
            uuid_text::format(&self.uuid),
            self.version
        )
    }
}

/// Which side of the migration a shape came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source (sending) VMM.
    Source,
    /// The destination (receiving) VMM.
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// One way the two shapes differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference {
    /// Memory sizes (MiB) differ.
    Memory {
        /// Source memory in MiB.
        source: u64,
        /// Destination memory in MiB.
        destination: u64,
    },
    /// vCPU counts differ.
    Vcpus {
        /// Source vCPUs.
        source: u32,
        /// Destination vCPUs.
        destination: u32,
    },
    /// Two devices of one side share an id.
    DuplicateId {
        /// The id.
        id: String,
        /// Where.
        side: Side,
    },
    /// A source device the destination does not have.
    MissingOnDestination(String),
    /// A destination device the source does not have.
    MissingOnSource(String),
    /// The devices both sides have come in another order.
    Order {
        /// Source ids in order.
        source: Vec<String>,
        /// Destination ids in order.
        destination: Vec<String>,
    },
    /// A device's kind differs.
    Kind {
        /// The device.
        id: String,
        /// Source kind.
        source: String,
        /// Destination kind.
        destination: String,
    },
    /// A device's transport differs.
    Transport {
        /// The device.
        id: String,
        /// Source transport.
        source: String,
        /// Destination transport.
        destination: String,
    },
    /// The destination's device does not accept the source's state format.
    StateFormat {
        /// The device.
        id: String,
        /// What the source offers.
        source: Option<StateFormat>,
        /// What the destination accepts.
        destination: Option<StateFormat>,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = |x: &Option<StateFormat>| match x {
            Some(x) => x.to_string(),
            None => "none".to_string(),
        };
        match self {
            Difference::Memory {
                source,
                destination,
            } => write!(
                f,
                "memory: source {source} MiB, destination {destination} MiB"
            ),
            Difference::Vcpus {
                source,
                destination,
            } => write!(f, "vcpus: source {source}, destination {destination}"),
            Difference::DuplicateId { id, side } => {
                write!(f, "device {id}: listed twice on the {side}")
            }
            Difference::MissingOnDestination(id) => {
                write!(f, "device {id}: missing on the destination")
            }
            Difference::MissingOnSource(id) => write!(f, "device {id}: not on the source"),
            Difference::Order {
                source,
                destination,
            } => write!(
                f,
                "device order: source [{}], destination [{}]",
                source.join(", "),
                destination.join(", ")
            ),
            Difference::Kind {
                id,
                source,
                destination,
            } => write!(
                f,
                "device {id}: kind: source {source}, destination {destination}"
            ),
            Difference::Transport {
                id,
                source,
                destination,
            } => write!(
                f,
                "device {id}: transport: source {source}, destination {destination}"
            ),
            Difference::StateFormat {
                id,
                source,
                destination,
            } => write!(
                f,
                "device {id}: state format {} not accepted (destination has {})",
                format(source),
                format(destination)
            ),
        }
    }
}

/// The shapes differ: every difference found, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// What differs.
    pub differences: Vec<Difference>,
}

impl fmt::Display for ShapeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VM shape differs: ")?;
        for (i, d) in self.differences.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ShapeMismatch {}

/// Checks that the destination can take the source's guest; lists every
/// difference if not. Linear in the number of devices (the source's shape
/// comes from the stream and may be large).
pub fn check(source: &VmShape, destination: &VmShape) -> Result<(), ShapeMismatch> {
    let mut diffs = Vec::new();
    if source.memory_mib != destination.memory_mib {
        diffs.push(Difference::Memory {
            source: source.memory_mib,
            destination: destination.memory_mib,
        });
    }
    if source.vcpus != destination.vcpus {
        diffs.push(Difference::Vcpus {
            source: source.vcpus,
            destination: destination.vcpus,
        });
    }
    let before = diffs.len();
    let src_ids = index(source, Side::Source, &mut diffs);
    let dst_ids = index(destination, Side::Destination, &mut diffs);
    let duplicates = diffs.len() > before;

    for (i, s) in source.devices.iter().enumerate() {
        if src_ids.get(s.id.as_str()) != Some(&i) {
            continue; // a duplicate, already reported
        }
        let Some(d) = dst_ids
            .get(s.id.as_str())
            .and_then(|&i| destination.devices.get(i))
        else {
            diffs.push(Difference::MissingOnDestination(s.id.clone()));
            continue;
        };
        if s.kind != d.kind {
            diffs.push(Difference::Kind {
                id: s.id.clone(),
                source: s.kind.clone(),
                destination: d.kind.clone(),
            });
        }
        if s.transport != d.transport {
            diffs.push(Difference::Transport {
                id: s.id.clone(),
                source: s.transport.clone(),
                destination: d.transport.clone(),
            });
        }
        if !accepts(d.state_format, s.state_format) {
            diffs.push(Difference::StateFormat {
                id: s.id.clone(),
                source: s.state_format,
                destination: d.state_format,
            });
        }
    }
    for (i, d) in destination.devices.iter().enumerate() {
        if dst_ids.get(d.id.as_str()) == Some(&i) && !src_ids.contains_key(d.id.as_str()) {
            diffs.push(Difference::MissingOnSource(d.id.clone()));
        }
    }
    // Order matters among the devices both sides have (one missing is
    // already reported); with duplicate ids it is not defined.
    let common = |a: &VmShape, b: &HashMap<&str, usize>| -> Vec<String> {
        a.devices
            .iter()
            .filter(|d| b.contains_key(d.id.as_str()))
            .map(|d| d.id.clone())
            .collect()
    };
    let (s_order, d_order) = (common(source, &dst_ids), common(destination, &src_ids));
    if !duplicates && s_order != d_order {
        diffs.push(Difference::Order {
            source: s_order,
            destination: d_order,
        });
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(ShapeMismatch { differences: diffs })
    }
}

/// Whether a device declaring `accepted` loads a blob in `offered`.
fn accepts(accepted: Option<StateFormat>, offered: Option<StateFormat>) -> bool {
    match (accepted, offered) {
        (None, None) => true,
        (Some(a), Some(o)) => a.uuid == o.uuid && o.version <= a.version,
        _ => false,
    }
}

/// Maps each device id to its first position; reports each id listed more
/// than once, once.
fn index<'a>(
    shape: &'a VmShape,
    side: Side,
    diffs: &mut Vec<Difference>,
) -> HashMap<&'a str, usize> {
    let mut ids = HashMap::new();
    let mut reported = HashSet::new();
    for (i, d) in shape.devices.iter().enumerate() {
        if ids.contains_key(d.id.as_str()) {
            if reported.insert(d.id.as_str()) {
                diffs.push(Difference::DuplicateId {
                    id: d.id.clone(),
                    side,
                });
            }
        } else {
            ids.insert(d.id.as_str(), i);
        }
    }
    ids
}

/// UUIDs as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in JSON.
mod uuid_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(super) fn format(uuid: &[u8; 16]) -> String {
        let mut s = String::with_capacity(36);
        for (i, b) in uuid.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                s.push('-');
            }
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub(super) fn parse(text: &str) -> Option<[u8; 16]> {
        let groups: Vec<&str> = text.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] {
            return None;
        }
        let hex: String = groups.concat();
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(out)
    }

    pub(super) fn serialize<S: Serializer>(uuid: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(uuid))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).ok_or_else(|| D::Error::custom(format!("bad UUID {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLK: [u8; 16] = [
        0x8f, 0x2c, 0x1d, 0x3e, 0x44, 0x5a, 0x4b, 0x6c, 0x9d, 0x0e, 0x1f, 0x20, 0x31, 0x42, 0x53,
        0x64,
    ];

    fn dev(id: &str, version: Option<u32>) -> DeviceShape {
        DeviceShape {
            id: id.into(),
            kind: "vhost-user-blk".into(),
            transport: "mmio".into(),
            state_format: version.map(|version| StateFormat { uuid: BLK, version }),
        }
    }

    fn shape(devices: Vec<DeviceShape>) -> VmShape {
        VmShape {
            memory_mib: 256,
            vcpus: 2,
            devices,
        }
    }

    fn diff(s: &VmShape, d: &VmShape) -> String {
        check(s, d).unwrap_err().to_string()
    }

    #[test]
    fn equal_shapes_pass() {
        let s = shape(vec![dev("disk0", Some(1)), dev("disk1", None)]);
        check(&s, &s.clone()).unwrap();
    }

    #[test]
    fn memory_and_vcpus() {
        let s = shape(vec![]);
        let mut d = s.clone();
        d.memory_mib = 512;
        assert_eq!(
            diff(&s, &d),
            "VM shape differs: memory: source 256 MiB, destination 512 MiB"
        );
        d.vcpus = 4;
        assert_eq!(
            diff(&s, &d),
            "VM shape differs: memory: source 256 MiB, destination 512 MiB; \
             vcpus: source 2, destination 4"
        );
    }

    #[test]
    fn missing_devices_on_either_side() {
        let s = shape(vec![dev("disk0", Some(1))]);
        let d = shape(vec![dev("disk1", Some(1))]);
        assert_eq!(
            diff(&s, &d),
            "VM shape differs: device disk0: missing on the destination; \
             device disk1: not on the source"
        );
    }

    #[test]
    fn kind_transport_and_order() {
        let s = shape(vec![dev("a", None), dev("b", None)]);
        let mut d = shape(vec![dev("b", None), dev("a", None)]);
        assert_eq!(
            diff(&s, &d),
            "VM shape differs: device order: source [a, b], destination [b, a]"
        );
        d.devices.reverse();
        d.devices[0].kind = "vfio-user".into();
        d.devices[1].transport = "pci".into();
        assert_eq!(
            diff(&s, &d),
            "VM shape differs: device a: kind: source vhost-user-blk, destination vfio-user; \
             device b: transport: source mmio, destination pci"
        );
    }

    #[test]
    fn state_formats() {
        let uuid = "8f2c1d3e-445a-4b6c-9d0e-1f2031425364";
        // Older source version: accepted.
        check(
            &shape(vec![dev("disk0", Some(1))]),
            &shape(vec![dev("disk0", Some(2))]),
        )
        .unwrap();
        // Newer source version: refused.
        assert_eq!(
            diff(
                &shape(vec![dev("disk0", Some(2))]),
                &shape(vec![dev("disk0", Some(1))])
            ),
            format!(
                "VM shape differs: device disk0: state format uuid {uuid} version 2 not \
                 accepted (destination has uuid {uuid} version 1)"
            )
        );
        // Another UUID.
        let mut other = dev("disk0", Some(2));
        other.state_format = Some(StateFormat {
            uuid: [1; 16],
            version: 2,
        });
        let msg = diff(&shape(vec![dev("disk0", Some(2))]), &shape(vec![other]));
        assert!(
            msg.contains("destination has uuid 01010101-0101-0101-0101-010101010101 version 2"),
            "{msg}"
        );
        // A format on one side only.
        assert_eq!(
            diff(
                &shape(vec![dev("disk0", None)]),
                &shape(vec![dev("disk0", Some(1))])
            ),
            format!(
                "VM shape differs: device disk0: state format none not accepted \
                 (destination has uuid {uuid} version 1)"
            )
        );
        assert_eq!(
            diff(
                &shape(vec![dev("disk0", Some(1))]),
                &shape(vec![dev("disk0", None)])
            ),
            format!(
                "VM shape differs: device disk0: state format uuid {uuid} version 1 not \
                 accepted (destination has none)"
            )
        );
    }

    #[test]
    fn duplicate_ids_are_reported_once_per_side() {
        let s = shape(vec![dev("a", None), dev("a", None), dev("a", None)]);
        let d = shape(vec![dev("a", None)]);
        assert_eq!(
            diff(&s, &d),
            "VM shape differs: device a: listed twice on the source"
        );
    }

    #[test]
    fn json_form() {
        let s = shape(vec![dev("disk0", Some(3))]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"memory_mib":256,"vcpus":2,"devices":[{"id":"disk0","kind":"vhost-user-blk","transport":"mmio","state_format":{"uuid":"8f2c1d3e-445a-4b6c-9d0e-1f2031425364","version":3}}]}"#
        );
        assert_eq!(serde_json::from_str::<VmShape>(&json).unwrap(), s);
        for bad in [
            "8f2c1d3e445a4b6c9d0e1f2031425364",
            "8f2c1d3e-445a-4b6c-9d0e-1f203142536",
            "zf2c1d3e-445a-4b6c-9d0e-1f2031425364",
            "+f2c1d3e-445a-4b6c-9d0e-1f2031425364",
            "8f2c1d3é-45a-4b6c-9d0e-1f2031425364",
        ] {
            let j = json.replace("8f2c1d3e-445a-4b6c-9d0e-1f2031425364", bad);
            let e = serde_json::from_str::<VmShape>(&j).unwrap_err().to_string();
            assert!(e.contains("bad UUID"), "{bad}: {e}");
        }
    }
}
