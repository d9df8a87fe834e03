//! CPUID for each vCPU: what KVM supports, with the APIC id and the topology
//! (one package, one thread per core, `vcpus` cores) filled in, the
//! hypervisor bit set and KVM's signature leaves passed through.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`.
///
/// KVM reports only subleaf 0 of the extended topology leaves (0xb, 0x1f);
/// a guest that finds no core level puts every vCPU in a package of its
/// own, so the SMT, core and terminating subleaves are written out here.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> Result<CpuId, CpuidError> {
    let apic_id = u32::from(index);
    let count = u32::from(count);
    // Bits needed to number the cores in the x2APIC id.
    let core_shift = 32 - (count.max(1) - 1).leading_zeros();
    let mut entries: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 4);
    for e in supported.as_slice() {
        match e.function {
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 if e.index == 0 => {
                for subleaf in 0..3 {
                    entries.push(kvm_cpuid_entry2 {
                        function: e.function,
                        index: subleaf,
                        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                        ..Default::default()
                    });
                }
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {}
            _ => entries.push(*e),
        }
    }
    for e in entries.iter_mut() {
        patch_entry(e, apic_id, count, core_shift);
    }
    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries(entries.len()))
}

/// Why a vCPU's CPUID could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM's list plus the topology subleaves exceed what KVM_SET_CPUID2
    /// takes.
    #[error("CPUID needs {0} entries, more than KVM takes")]
    TooManyEntries(usize),
}

fn patch_entry(e: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, core_shift: u32) {
    match e.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors,
            // [15:8] CLFLUSH line size in 8-byte units.
            e.ebx = (apic_id << 24) | ((count & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // EAX: [31:26] cores per package - 1, [25:14] threads sharing
            // this cache - 1 (caches up to L2 are per core, L3 shared).
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            // Level 0: SMT (one thread), level 1: core, then invalid.
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = core_shift;
                    e.ebx = count;
                    e.ecx = (2 << 8) | 1;
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n & 0xff;
                }
            }
            e.edx = apic_id;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_topology_follow_the_index() {
        // As KVM reports it: subleaf 0 only.
        let base =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0x4000_0000, 0)]).unwrap();
        let c = for_vcpu(&base, 3, 4).unwrap();
        let e = c.as_slice();
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        // SMT level, core level, terminator; every one carries the APIC id.
        assert_eq!((e[1].index, e[1].ecx >> 8, e[1].edx), (0, 1, 3));
        assert_eq!(
            (e[2].index, e[2].ecx >> 8, e[2].eax, e[2].ebx),
            (1, 2, 2, 4)
        );
        assert_eq!((e[3].index, e[3].ecx >> 8, e[3].ebx), (2, 0, 0));
        assert!(e[1..4]
            .iter()
            .all(|x| x.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));
        assert_eq!(e[4], base.as_slice()[2]);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let base = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            edx: EDX_HTT,
            ..Default::default()
        }])
        .unwrap();
        let c = for_vcpu(&base, 0, 1).unwrap();
        assert_eq!(c.as_slice()[0].edx & EDX_HTT, 0);
    }
}
