//! Outboard: a small KVM virtual machine monitor whose devices run in their
//! own processes.
//!
//! This crate is the VMM: the JSON [`config`], guest [`memory`], the
//! [`boot`] path (Linux boot protocol and PVH), [`cpu`] set-up and vCPU
//! threads, the [`legacy`] port devices, the [`mmio`] bus, the
//! [`devices`] served by device processes, and the [`vm`] that ties them
//! together, and the control [`api`] it serves.

pub mod api;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod host;
pub mod irq;
pub mod legacy;
pub mod logger;
pub mod memory;
pub mod migrate;
pub mod mmio;
pub mod vm;
