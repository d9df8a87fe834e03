//! `VFIO_USER_VERSION` (spec section "VFIO_USER_VERSION").
//!
//! ```text
//! offset 0  version major   u16
//! offset 2  version minor   u16
//! offset 4  version data    UTF-8 JSON, NUL-terminated, optional
//! ```
//!
//! The JSON is `{"capabilities": {...}}` with the members of
//! [`Capabilities`]. Unknown members are ignored (they are capabilities this
//! side does not offer, so they are left out of the reply, which the spec
//! allows: the reply's capabilities are a subset of the proposal).

use serde::Serialize;
use serde_json::{Map, Value};

use super::{
    Reader, WireError, Writer, DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS, DEFAULT_PGSIZES,
};

/// The `migration` capability object: dirty page tracking parameters
/// (`pgsize`, `max_bitmap_size`, as libvfio-user and QEMU's client spell
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MigrationCaps {
    /// Page size of the dirty bitmap, in bytes.
    pub pgsize: u64,
    /// Largest dirty bitmap the sender handles in one message, in bytes.
    pub max_bitmap_size: u64,
}

/// The capabilities object of the version data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Most file descriptors the sender can receive in one message.
    pub max_msg_fds: u32,
    /// Largest `count` of a data transfer message the sender accepts.
    pub max_data_xfer_size: u32,
    /// DMA map page sizes supported, or'ed together.
    pub pgsizes: u64,
    /// Most DMA windows that can be mapped at once.
    pub max_dma_maps: u32,
    /// Dirty page tracking parameters, if offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCaps>,
}

impl Default for Capabilities {
    /// The spec's defaults for capabilities a peer leaves out.
    fn default() -> Self {
        Self {
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            pgsizes: DEFAULT_PGSIZES,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            migration: None,
        }
    }
}

#[derive(Serialize)]
struct VersionData<'a> {
    capabilities: &'a Capabilities,
}

/// Request and reply body of `VFIO_USER_VERSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Protocol major version.
    pub major: u16,
    /// Protocol minor version.
    pub minor: u16,
    /// The capabilities (defaults when the data is absent).
    pub capabilities: Capabilities,
    /// Whether the peer asked for twin-socket mode (never granted here).
    pub twin_socket: bool,
}

impl Version {
    /// Encodes the body: versions, then the JSON and its terminating NUL.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&VersionData {
            capabilities: &self.capabilities,
        })
        .unwrap_or_default();
        let mut w = Writer::with_capacity(json.len() + 5);
        w.u16(self.major).u16(self.minor).bytes(&json).bytes(&[0]);
        w.into_vec()
    }

    /// Decodes and validates a body.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "VERSION";
        let mut r = Reader::new(WHAT, body);
        let major = r.u16()?;
        let minor = r.u16()?;
        let mut data = r.rest();
        // The data is optional; when present it ends with one NUL.
        if let Some((&0, head)) = data.split_last() {
            data = head;
        }
        let mut caps = Capabilities::default();
        let mut twin_socket = false;
        if !data.is_empty() {
            if data.contains(&0) {
                return Err(WireError::Json("NUL inside the version data".into()));
            }
            let v: Value =
                serde_json::from_slice(data).map_err(|e| WireError::Json(e.to_string()))?;
            let top = v
                .as_object()
                .ok_or_else(|| WireError::Json("version data is not an object".into()))?;
            if let Some(c) = top.get("capabilities") {
                let c = c
                    .as_object()
                    .ok_or_else(|| WireError::Json("capabilities is not an object".into()))?;
                parse_caps(c, &mut caps, &mut twin_socket)?;
            }
        }
        Ok(Self {
            major,
            minor,
            capabilities: caps,
            twin_socket,
        })
    }
}

fn number(m: &Map<String, Value>, key: &str) -> Result<Option<u64>, WireError> {
    match m.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| WireError::Json(format!("{key} is not an unsigned integer"))),
    }
}

fn number_u32(m: &Map<String, Value>, key: &str) -> Result<Option<u32>, WireError> {
    number(m, key)?
        .map(|n| u32::try_from(n).map_err(|_| WireError::Json(format!("{key} is out of range"))))
        .transpose()
}

fn parse_caps(
    c: &Map<String, Value>,
    caps: &mut Capabilities,
    twin_socket: &mut bool,
) -> Result<(), WireError> {
    if let Some(n) = number_u32(c, "max_msg_fds")? {
        caps.max_msg_fds = n;
    }
    if let Some(n) = number_u32(c, "max_data_xfer_size")? {
        caps.max_data_xfer_size = n;
    }
    if let Some(n) = number(c, "pgsizes")? {
        caps.pgsizes = n;
    }
    if let Some(n) = number_u32(c, "max_dma_maps")? {
        caps.max_dma_maps = n;
    }
    if let Some(m) = c.get("migration") {
        let m = m
            .as_object()
            .ok_or_else(|| WireError::Json("migration is not an object".into()))?;
        let pgsize = number(m, "pgsize")?
            .ok_or_else(|| WireError::Json("migration.pgsize missing".into()))?;
        let max_bitmap_size = number(m, "max_bitmap_size")?
            .ok_or_else(|| WireError::Json("migration.max_bitmap_size missing".into()))?;
        caps.migration = Some(MigrationCaps {
            pgsize,
            max_bitmap_size,
        });
    }
    if let Some(t) = c.get("twin_socket") {
        let t = t
            .as_object()
            .ok_or_else(|| WireError::Json("twin_socket is not an object".into()))?;
        match t.get("supported") {
            None => {}
            Some(Value::Bool(b)) => *twin_socket = *b,
            Some(_) => {
                return Err(WireError::Json(
                    "twin_socket.supported is not a bool".into(),
                ))
            }
        }
    }
    if let Some(w) = c.get("write_multiple") {
        if !w.is_boolean() {
            return Err(WireError::Json("write_multiple is not a bool".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_bytes() {
        let v = Version {
            major: 0,
            minor: 1,
            capabilities: Capabilities {
                max_msg_fds: 8,
                max_data_xfer_size: 1048576,
                pgsizes: 4096,
                max_dma_maps: 65535,
                migration: Some(MigrationCaps {
                    pgsize: 4096,
                    max_bitmap_size: 1048576,
                }),
            },
            twin_socket: false,
        };
        let json = br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":1048576}}}"#;
        let mut expect = vec![0x00, 0x00, 0x01, 0x00];
        expect.extend_from_slice(json);
        expect.push(0);
        assert_eq!(v.encode(), expect);
        assert_eq!(Version::decode(&expect).unwrap(), v);
    }

    #[test]
    fn version_without_data_uses_defaults() {
        let v = Version::decode(&[0, 0, 0, 0]).unwrap();
        assert_eq!(v.capabilities, Capabilities::default());
        assert_eq!(v.capabilities.max_msg_fds, 1);
        assert_eq!(v.capabilities.max_data_xfer_size, 1 << 20);
        // An empty string with its NUL is the same.
        assert_eq!(Version::decode(&[0, 0, 0, 0, 0]).unwrap(), v);
    }

    #[test]
    fn version_partial_caps_and_unknown_members() {
        let mut b = vec![0, 0, 0, 0];
        b.extend_from_slice(
            br#"{"capabilities":{"max_msg_fds":16,"write_multiple":true,"future":[1]},"x":1}"#,
        );
        b.push(0);
        let v = Version::decode(&b).unwrap();
        assert_eq!(v.capabilities.max_msg_fds, 16);
        assert_eq!(v.capabilities.max_dma_maps, 65535);
        assert!(!v.twin_socket);
    }

    #[test]
    fn version_rejects_bad_data() {
        let bad: &[&[u8]] = &[
            b"",
            b"\x00",
            b"\x00\x00\x00",
            b"\x00\x00\x00\x00{\x00",
            b"\x00\x00\x00\x00[1]\x00",
            b"\x00\x00\x00\x00{\"capabilities\":1}\x00",
            b"\x00\x00\x00\x00{\"capabilities\":{\"max_msg_fds\":-1}}\x00",
            b"\x00\x00\x00\x00{\"capabilities\":{\"max_msg_fds\":4294967296}}\x00",
            b"\x00\x00\x00\x00{\"capabilities\":{\"pgsizes\":1.5}}\x00",
            b"\x00\x00\x00\x00{\"capabilities\":{\"migration\":{\"pgsize\":4096}}}\x00",
            b"\x00\x00\x00\x00{\"capabilities\":{}}\x00{}\x00",
            b"\x00\x00\x00\x00\xff\xfe\x00",
        ];
        for b in bad {
            assert!(Version::decode(b).is_err(), "{b:?}");
        }
    }

    #[test]
    fn twin_socket_request_is_seen() {
        let mut b = vec![0, 0, 0, 0];
        b.extend_from_slice(br#"{"capabilities":{"twin_socket":{"supported":true}}}"#);
        assert!(Version::decode(&b).unwrap().twin_socket);
    }
}
