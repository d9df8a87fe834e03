//! Facts about the host's KVM that change what a guest can do here.

use std::path::Path;

/// The kind of hardware virtualization behind `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// PVM (`kvm_pvm`): KVM without VMX/SVM. Guests not built as PVM guests
    /// are emulated instruction by instruction and cannot run Linux
    /// userspace.
    Pvm,
    /// VMX or SVM: guests run natively.
    Hardware,
}

/// Detects the KVM flavour from the loaded modules.
pub fn kvm_kind() -> KvmKind {
    if Path::new("/sys/module/kvm_pvm").exists() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}

/// The one-line notice printed once on a PVM host.
pub const PVM_NOTICE: &str =
    "this host's KVM is PVM (kvm_pvm, no VMX/SVM): a guest kernel not built \
as a PVM guest is emulated instruction by instruction (~2 M instructions/s), and Linux userspace \
cannot run";
