//! Host emulation of the kernels (feature `emu`): the CUDA C sources of
//! `kernels/` compiled unchanged as host C++ and run on the CPU, one fiber
//! per CUDA thread, with the launch geometry and param structs the GPU
//! launcher uses. The design, and what it can and cannot check, is in
//! `emu/simt.h`.
//!
//! The kernels read and write through the raw addresses in their param
//! structs, which here are host addresses: [`addr`] and [`addr_mut`] give
//! them for slices. Loads through the read-only cache (the GEMV's vector
//! loads, `__ldg`) are checked against the [`Region`]s a launch declares;
//! plain loads and stores are not, so the caller must size every buffer as
//! the kernel's contract in `include/meswitch_abi.h` says.

use std::ffi::{c_char, CString};
use std::fmt;

use crate::abi;

/// A param struct of the ABI, passed to the kernel by value.
pub trait KernelParams: Copy + private::Sealed {}

mod private {
    pub trait Sealed {}
}

macro_rules! kernel_params {
    ($($t:ident),* $(,)?) => {$(
        impl private::Sealed for abi::$t {}
        impl KernelParams for abi::$t {}
    )*};
}
kernel_params!(
    MeswitchGemvParams,
    MeswitchDequantParams,
    MeswitchRmsNormParams,
    MeswitchRopeParams,
    MeswitchElementwiseParams,
    MeswitchEmbedParams,
    MeswitchKvAppendParams,
    MeswitchAttentionParams,
);

/// Host address of a slice, as a param struct field holds it.
pub fn addr<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}

/// Host address of a slice the kernel writes.
pub fn addr_mut<T>(s: &mut [T]) -> u64 {
    s.as_mut_ptr() as u64
}

/// Memory the kernel may read through its checked loads. `repr(C)`: a slice
/// of regions is the (address, length) pairs `meswitch_emu_launch` reads.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Region {
    addr: u64,
    len: u64,
}

impl Region {
    pub fn of<T>(s: &[T]) -> Region {
        Region {
            addr: addr(s),
            len: std::mem::size_of_val(s) as u64,
        }
    }
}

/// Why an emulated launch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmuError {
    /// No such entry point, a param struct of the wrong size, or launch
    /// dimensions out of range: the launch did not run.
    Launch(String),
    /// The kernel ran and failed a check a GPU would not report, or would
    /// report as a fault or a hang: a misaligned or out-of-bounds checked
    /// load, a barrier or warp collective that cannot complete.
    Kernel(String),
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmuError::Launch(m) => write!(f, "emulated launch refused: {m}"),
            EmuError::Kernel(m) => write!(f, "emulated kernel failed: {m}"),
        }
    }
}

impl std::error::Error for EmuError {}

/// Grid and block dimensions, as CUDA's `dim3`.
pub type Dim3 = (u32, u32, u32);

extern "C" {
    fn meswitch_emu_launch(
        entry: *const c_char,
        grid: *const u32,
        block: *const u32,
        params: *const std::ffi::c_void,
        param_size: usize,
        regions: *const u64,
        n_regions: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn meswitch_emu_has_entry(entry: *const c_char) -> i32;
    fn meswitch_emu_half_from_f64(v: f64) -> u16;
    fn meswitch_emu_half_to_f32(h: u16) -> f32;
}

const ERROR_BYTES: usize = 512;

/// True when the emulation can run the entry point `entry`.
pub fn has_entry(entry: &str) -> bool {
    let Ok(name) = CString::new(entry) else {
        return false;
    };
    // SAFETY: `name` is a valid C string for the call.
    unsafe { meswitch_emu_has_entry(name.as_ptr()) != 0 }
}

/// The emulation's binary16 rounding (round to nearest even) of `v`, as bits:
/// what `__float2half_rn` and `__hfma2` give in the emulated kernels.
pub fn half_bits_from_f64(v: f64) -> u16 {
    // SAFETY: a pure function of its argument.
    unsafe { meswitch_emu_half_from_f64(v) }
}

/// The emulation's binary16 → f32 widening (`__half2float`).
pub fn half_bits_to_f32(h: u16) -> f32 {
    // SAFETY: a pure function of its argument.
    unsafe { meswitch_emu_half_to_f32(h) }
}

/// Runs `entry` over `grid` × `block` threads with `params`, one block after
/// another on the calling thread (launches from several threads take turns:
/// shared memory is one static per kernel). Returns when every block has
/// finished.
///
/// # Safety
/// Every address in `params` must point to live host memory of at least the
/// size the kernel reads or writes there for these params (the kernel's
/// contract in `include/meswitch_abi.h`), written by no one else during the
/// launch.
pub unsafe fn launch<P: KernelParams>(
    entry: &str,
    grid: Dim3,
    block: Dim3,
    params: &P,
    regions: &[Region],
) -> Result<(), EmuError> {
    let name = CString::new(entry).map_err(|_| EmuError::Launch(format!("bad name {entry:?}")))?;
    let grid = [grid.0, grid.1, grid.2];
    let block = [block.0, block.1, block.2];
    let mut err = vec![0u8; ERROR_BYTES];
    // SAFETY: the pointers are valid for the call (the arrays above, the
    // params by reference); what the kernel does with the addresses inside
    // the params is the caller's contract.
    let rc = unsafe {
        meswitch_emu_launch(
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            (params as *const P).cast(),
            std::mem::size_of::<P>(),
            regions.as_ptr().cast(),
            regions.len(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    let message = || {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        String::from_utf8_lossy(&err[..end]).into_owned()
    };
    match rc {
        0 => Ok(()),
        1 => Err(EmuError::Launch(message())),
        _ => Err(EmuError::Kernel(message())),
    }
}
