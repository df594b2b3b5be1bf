//! meswitch-ptx: the kernels' CUDA C sources and the PTX compiled from them.
//! The kernel list is filled by the kernels issue.

/// A compiled kernel module: its name and PTX text.
#[derive(Clone, Copy, Debug)]
pub struct KernelModule {
    pub name: &'static str,
    pub ptx: &'static str,
}

/// Every embedded kernel module.
pub const MODULES: &[KernelModule] = &[];
