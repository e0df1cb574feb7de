//! The front doors: each turns its users' arguments into the one [`VmConfig`](crate::VmConfig).

pub mod cli;
pub mod qemu;
