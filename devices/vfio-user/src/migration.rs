//! The device migration state machine (spec: `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`,
//! "Direct State Transitions" and "Complex State Transitions"; Linux
//! `enum vfio_device_mig_state`).
//!
//! Direct arcs (with `PRE_COPY` only when the device offers it):
//!
//! ```text
//!            +---------> PRE_COPY ---------+
//!            |  <------                    |
//!            |                             v
//!  RESUMING <-> STOP <-> RUNNING       STOP_COPY
//!                 |  <---------------------+
//!                 +-----------------------> (STOP -> STOP_COPY)
//! ```
//!
//! i.e. `RUNNING <-> STOP`, `STOP -> STOP_COPY`, `STOP_COPY -> STOP`,
//! `STOP <-> RESUMING`, `RUNNING <-> PRE_COPY`, `PRE_COPY -> STOP_COPY`.
//! Any other pair is the shortest chain of direct arcs whose interior
//! states are not in the saving group (`PRE_COPY`, `STOP_COPY`);
//! `STOP_COPY -> PRE_COPY` is refused explicitly. `ERROR` is never a target;
//! it is where a failed arc leaves the device, and only a reset leaves it.
//! The P2P states are "not used in vfio-user" and refused.

use std::collections::VecDeque;

/// A `vfio_device_mig_state` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigrationState {
    /// `VFIO_DEVICE_STATE_ERROR`: failed; must be reset.
    Error = 0,
    /// `VFIO_DEVICE_STATE_STOP`: not running, state frozen.
    Stop = 1,
    /// `VFIO_DEVICE_STATE_RUNNING`.
    Running = 2,
    /// `VFIO_DEVICE_STATE_STOP_COPY`: stopped, state being read out.
    StopCopy = 3,
    /// `VFIO_DEVICE_STATE_RESUMING`: stopped, state being loaded.
    Resuming = 4,
    /// `VFIO_DEVICE_STATE_RUNNING_P2P` (not used in vfio-user).
    RunningP2p = 5,
    /// `VFIO_DEVICE_STATE_PRE_COPY`: running, state being read out.
    PreCopy = 6,
    /// `VFIO_DEVICE_STATE_PRE_COPY_P2P` (not used in vfio-user).
    PreCopyP2p = 7,
}

impl TryFrom<u32> for MigrationState {
    type Error = u32;

    fn try_from(v: u32) -> Result<Self, u32> {
        Ok(match v {
            0 => Self::Error,
            1 => Self::Stop,
            2 => Self::Running,
            3 => Self::StopCopy,
            4 => Self::Resuming,
            5 => Self::RunningP2p,
            6 => Self::PreCopy,
            7 => Self::PreCopyP2p,
            other => return Err(other),
        })
    }
}

impl MigrationState {
    /// Whether the state belongs to the saving group (a data transfer
    /// session is open for reading).
    pub fn is_saving(self) -> bool {
        matches!(self, Self::PreCopy | Self::StopCopy)
    }
}

/// Whether `from -> to` is a direct arc of the state machine.
pub(crate) fn is_direct_arc(from: MigrationState, to: MigrationState, pre_copy: bool) -> bool {
    use MigrationState::*;
    match (from, to) {
        (Running, Stop) | (Stop, Running) => true,
        (Stop, StopCopy) | (StopCopy, Stop) => true,
        (Stop, Resuming) | (Resuming, Stop) => true,
        (Running, PreCopy) | (PreCopy, Running) | (PreCopy, StopCopy) => pre_copy,
        _ => false,
    }
}

/// The states after `from` on the way to `to` (`to` last), or `None` if the
/// transition is not allowed. Same state: an empty path.
pub(crate) fn transition_path(
    from: MigrationState,
    to: MigrationState,
    pre_copy: bool,
) -> Option<Vec<MigrationState>> {
    use MigrationState::*;
    const NODES: [MigrationState; 5] = [Stop, Running, StopCopy, Resuming, PreCopy];
    let usable = |s: MigrationState| NODES.contains(&s) && (s != PreCopy || pre_copy);
    if !usable(from) || !usable(to) {
        return None;
    }
    if from == to {
        return Some(Vec::new());
    }
    if from == StopCopy && to == PreCopy {
        return None;
    }
    // Breadth-first search; interior states must not be in the saving group.
    let mut prev: [Option<MigrationState>; 8] = [None; 8];
    let mut queue = VecDeque::from([from]);
    let mut seen = [false; 8];
    seen[from as usize] = true;
    while let Some(s) = queue.pop_front() {
        if s != from && s.is_saving() {
            continue; // may end a path, never continue one
        }
        for n in NODES {
            if seen[n as usize] || !usable(n) || !is_direct_arc(s, n, pre_copy) {
                continue;
            }
            seen[n as usize] = true;
            prev[n as usize] = Some(s);
            if n == to {
                let mut path = vec![to];
                let mut cur = s;
                while cur != from {
                    path.push(cur);
                    cur = prev[cur as usize]?;
                }
                path.reverse();
                return Some(path);
            }
            queue.push_back(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::MigrationState::*;
    use super::*;

    #[test]
    fn numbers_match_linux() {
        for v in 0..8u32 {
            assert_eq!(MigrationState::try_from(v).unwrap() as u32, v);
        }
        assert_eq!(Running as u32, 2);
        assert_eq!(StopCopy as u32, 3);
        assert_eq!(PreCopy as u32, 6);
        assert!(MigrationState::try_from(8).is_err());
    }

    #[test]
    fn direct_arcs() {
        for (a, b) in [
            (Running, Stop),
            (Stop, Running),
            (Stop, StopCopy),
            (StopCopy, Stop),
            (Stop, Resuming),
            (Resuming, Stop),
            (Running, PreCopy),
            (PreCopy, Running),
            (PreCopy, StopCopy),
        ] {
            assert_eq!(transition_path(a, b, true), Some(vec![b]), "{a:?}->{b:?}");
        }
        assert_eq!(transition_path(Running, PreCopy, false), None);
    }

    #[test]
    fn combination_paths() {
        let cases = [
            (Running, StopCopy, vec![Stop, StopCopy]),
            (Running, Resuming, vec![Stop, Resuming]),
            (StopCopy, Running, vec![Stop, Running]),
            (Resuming, Running, vec![Stop, Running]),
            (StopCopy, Resuming, vec![Stop, Resuming]),
            (Resuming, StopCopy, vec![Stop, StopCopy]),
            // never through STOP_COPY as an interior state
            (PreCopy, Stop, vec![Running, Stop]),
            (PreCopy, Resuming, vec![Running, Stop, Resuming]),
            (Stop, PreCopy, vec![Running, PreCopy]),
            (Resuming, PreCopy, vec![Stop, Running, PreCopy]),
        ];
        for (a, b, path) in cases {
            assert_eq!(transition_path(a, b, true), Some(path), "{a:?}->{b:?}");
        }
        assert_eq!(
            transition_path(Running, StopCopy, false),
            Some(vec![Stop, StopCopy])
        );
    }

    #[test]
    fn refused_transitions() {
        assert_eq!(transition_path(StopCopy, PreCopy, true), None);
        for s in [Stop, Running, StopCopy, Resuming, PreCopy] {
            assert_eq!(transition_path(s, Error, true), None);
            assert_eq!(transition_path(s, RunningP2p, true), None);
            assert_eq!(transition_path(s, PreCopyP2p, true), None);
            assert_eq!(transition_path(Error, s, true), None);
        }
        assert_eq!(transition_path(Stop, Stop, true), Some(vec![]));
    }
}
