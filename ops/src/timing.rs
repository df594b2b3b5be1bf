//! Device-side timing with CUDA events, for benches: host timers would
//! include launch latency and miss asynchronous execution.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;

use crate::device::Gpu;
use crate::error::{DriverContext, OpsError};

/// Seconds of device time for `reps` back-to-back runs of `work` (enqueued on
/// the ops stream), measured between two events.
pub fn time_on_device(
    gpu: &Gpu,
    reps: usize,
    mut work: impl FnMut() -> Result<(), OpsError>,
) -> Result<f64, OpsError> {
    let ctx = gpu.context();
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .during("creating a timing event")?;
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .during("creating a timing event")?;
    start.record(gpu.stream()).during("recording an event")?;
    for _ in 0..reps {
        work()?;
    }
    end.record(gpu.stream()).during("recording an event")?;
    end.synchronize().during("waiting for an event")?;
    let ms = start.elapsed_ms(&end).during("reading event time")?;
    Ok(f64::from(ms) * 1e-3)
}

/// Device-to-device copy bandwidth in bytes per second, counting bytes read
/// plus bytes written (the convention under which an H100 copy reaches about
/// 3.0 TB/s), on a buffer of `bytes` each way, median of `trials`.
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize, trials: usize) -> Result<f64, OpsError> {
    let words = bytes / 4;
    let src: CudaSlice<u32> = gpu
        .stream()
        .alloc_zeros(words)
        .during("allocating copy source")?;
    let mut dst: CudaSlice<u32> = gpu
        .stream()
        .alloc_zeros(words)
        .during("allocating copy target")?;
    // Warm-up: first-touch and clock ramp.
    gpu.stream()
        .memcpy_dtod(&src, &mut dst)
        .during("device copy")?;
    let mut rates: Vec<f64> = (0..trials.max(1))
        .map(|_| {
            let s = time_on_device(gpu, 1, || {
                gpu.stream()
                    .memcpy_dtod(&src, &mut dst)
                    .during("device copy")
            })?;
            Ok(2.0 * (words * 4) as f64 / s)
        })
        .collect::<Result<_, OpsError>>()?;
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}
