//! vCPUs: CPUID, initial registers and the thread that runs each one.

pub mod cpuid;
pub mod setup;
pub mod state;
pub mod vcpu;
