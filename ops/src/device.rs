//! Finding a CUDA device and holding what every launch needs: context,
//! stream, the embedded PTX modules and (when present) a cuBLAS handle.
//!
//! cudarc opens libcuda at run time and *panics* if it is missing, so
//! [`Gpu::new`] checks for the library and the device count first and turns
//! every failure into [`OpsError::NoDevice`]; on a machine without a GPU no
//! call in this crate panics.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{DriverContext, OpsError};

/// Modules loaded on their first use instead of by [`Gpu::new`]: the wide
/// GEMV modules are the largest PTX (their JIT is start-up time every
/// process would pay), are unverified on a GPU, and run only when a caller
/// asks for [`crate::GemvKernel::Wide`]; a failure to load them then fails
/// that call, not the device.
pub const LAZY_MODULES: &[&str] = &["multi_expert_gemv_wide", "delta_gemv_wide"];

/// cudarc allocates with cuMemAllocAsync from the device's default memory
/// pool, whose release threshold is 0: at every stream synchronization
/// (each decode step ends with one, copying its logits) the pool hands its
/// free memory back to the OS, and the next step's few hundred buffers map
/// it again. A threshold of "never" keeps it pooled. A device without
/// memory pools (the driver says so) allocates synchronously and has
/// nothing to set; the setting only changes speed, so a failure is ignored.
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut never: u64 = u64::MAX;
    // SAFETY: the context is current on this thread (CudaContext::new binds
    // it); `pool` and `never` are valid for the calls, and the attribute
    // takes a cuuint64_t.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut never as *mut u64).cast(),
            );
        }
    }
}

fn load(
    ctx: &Arc<CudaContext>,
    m: &meswitch_ptx::KernelModule,
) -> Result<Arc<CudaModule>, OpsError> {
    ctx.load_module(Ptx::from_src(m.ptx))
        .map_err(|source| OpsError::ModuleLoad {
            module: m.name,
            source,
        })
}

struct Loaded {
    /// The wide GEMV modules ([`LAZY_MODULES`]) join on first use; the
    /// others are loaded by [`Gpu::new`].
    modules: BTreeMap<&'static str, Arc<CudaModule>>,
    /// Entry points already looked up: a decode step launches the same few
    /// kernels thousands of times, and cuModuleGetFunction is host overhead
    /// on every one of them.
    functions: HashMap<String, CudaFunction>,
}

/// One CUDA device ready for launches. All work goes to one stream, so the
/// ops need no cross-stream synchronisation.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Loaded modules and the entry points looked up in them, behind one lock.
    loaded: Mutex<Loaded>,
    blas: Result<CudaBlas, String>,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .field(
                "modules",
                &self
                    .loaded
                    .lock()
                    .map(|l| l.modules.keys().copied().collect::<Vec<_>>())
                    .unwrap_or_default(),
            )
            .field("cublas", &self.blas.is_ok())
            .finish()
    }
}

/// Why there is no device, or `Ok(count)`. Never panics.
pub fn device_count() -> Result<usize, OpsError> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(OpsError::NoDevice(
            "libcuda (the NVIDIA driver) not found".into(),
        ));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(OpsError::NoDevice("the driver reports 0 devices".into())),
        Err(e) => Err(OpsError::NoDevice(format!("cuDeviceGetCount failed: {e}"))),
    }
}

impl Gpu {
    /// Device 0.
    pub fn detect() -> Result<Gpu, OpsError> {
        Gpu::new(0)
    }

    /// Opens device `ordinal`, loads every module of `meswitch_ptx::MODULES`
    /// but the [`LAZY_MODULES`] and creates a cuBLAS handle if libcublas can
    /// be found (kernels work without it; only cuBLAS-backed paths then
    /// return [`OpsError::NoBlas`]).
    pub fn new(ordinal: usize) -> Result<Gpu, OpsError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(OpsError::NoDevice(format!(
                "device {ordinal} requested, the driver reports {count}"
            )));
        }
        // The checks above make a panic here unexpected; catching it keeps the
        // "never panics without a GPU" promise even if the driver misbehaves.
        let ctx = match std::panic::catch_unwind(|| CudaContext::new(ordinal)) {
            Ok(Ok(ctx)) => ctx,
            Ok(Err(e)) => {
                return Err(OpsError::NoDevice(format!(
                    "cannot create a context on device {ordinal}: {e}"
                )))
            }
            Err(_) => {
                return Err(OpsError::NoDevice(format!(
                    "the CUDA driver panicked creating a context on device {ordinal}"
                )))
            }
        };
        let name = ctx.name().during("reading the device name")?;
        let compute_capability = ctx
            .compute_capability()
            .during("reading the compute capability")?;
        let stream = ctx.default_stream();
        keep_pool_memory(&ctx);
        // SAFETY: event tracking orders a buffer's uses across streams; this
        // crate issues everything (kernels, copies, cuBLAS) on the one default
        // stream, where cudarc never waits on or records those events anyway
        // (it only does so once a context has created streams of its own).
        // Without tracking, each allocation skips creating, and each free
        // skips destroying, two driver events: a decode step allocates a few
        // hundred buffers. Called before the first allocation, as cudarc asks.
        unsafe { ctx.disable_event_tracking() };
        let mut modules = BTreeMap::new();
        for m in meswitch_ptx::MODULES {
            if !LAZY_MODULES.contains(&m.name) {
                modules.insert(m.name, load(&ctx, m)?);
            }
        }
        // SAFETY: only probes whether the shared library can be opened.
        let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            CudaBlas::new(stream.clone()).map_err(|e| format!("cublasCreate failed: {e}"))
        } else {
            Err("libcublas not found on the library path".to_string())
        };
        Ok(Gpu {
            ctx,
            stream,
            loaded: Mutex::new(Loaded {
                modules,
                functions: HashMap::new(),
            }),
            blas,
            name,
            compute_capability,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// This device with cuBLAS turned off: every path then uses this
    /// project's kernels only (for tests of those paths, and for comparing).
    pub fn without_blas(mut self) -> Gpu {
        self.blas = Err("disabled by Gpu::without_blas".to_string());
        self
    }

    /// The cuBLAS handle (bound to [`Gpu::stream`]).
    pub fn blas(&self) -> Result<&CudaBlas, OpsError> {
        self.blas.as_ref().map_err(|e| OpsError::NoBlas(e.clone()))
    }

    /// Kernel entry point `kernel` from whichever embedded module defines it.
    pub fn function(&self, kernel: &str) -> Result<CudaFunction, OpsError> {
        // A poisoned lock only means another thread panicked mid-insert; the
        // map itself is still a valid cache.
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = loaded.functions.get(kernel) {
            return Ok(f.clone());
        }
        // Ask the driver only of the module whose PTX declares the entry:
        // probing every module makes failed cuModuleGetFunction calls, which
        // compute-sanitizer reports as API errors.
        let entry = format!(".entry {kernel}(");
        let missing = || OpsError::MissingKernel {
            kernel: kernel.to_string(),
        };
        let owner = meswitch_ptx::MODULES
            .iter()
            .find(|m| m.ptx.contains(&entry))
            .ok_or_else(missing)?;
        let module = match loaded.modules.get(owner.name) {
            Some(m) => m.clone(),
            None => {
                let m = load(&self.ctx, owner)?;
                loaded.modules.insert(owner.name, m.clone());
                m
            }
        };
        let f = module.load_function(kernel).map_err(|_| missing())?;
        loaded.functions.insert(kernel.to_string(), f.clone());
        Ok(f)
    }

    /// Waits for all queued work on the stream.
    pub fn synchronize(&self) -> Result<(), OpsError> {
        self.stream.synchronize().during("stream synchronize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_device_is_an_error_never_a_panic() {
        // On a machine without a GPU both are NoDevice; with one, the count
        // is positive and an absurd ordinal is still NoDevice.
        match device_count() {
            Ok(n) => assert!(n > 0),
            Err(e) => assert!(e.is_no_device(), "{e}"),
        }
        assert!(Gpu::new(usize::MAX).unwrap_err().is_no_device());
    }

    #[test]
    fn lazy_modules_are_embedded_modules() {
        for name in LAZY_MODULES {
            assert!(
                meswitch_ptx::MODULES.iter().any(|m| m.name == *name),
                "{name} is not an embedded module"
            );
        }
    }
}
