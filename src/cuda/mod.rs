//! The GPU side (feature `cuda`): fer-cam's own kernels for the inference hot path, launched
//! through the `cudarc` that candle re-exports, on candle's stream, so that they read and write
//! candle's tensors in order with candle's own work.
//!
//! - [`GpuCard`]: the few-step CARD sampler, every face × sample × step in one launch, and the
//!   per-face summary (mean probabilities, votes, the paired t statistic) in one more.
//! - [`crop_faces`]: crop → 48x48 → normalise for a batch of boxes of one frame.
//!
//! **NVRTC at run time, not nvcc at build time.** The kernels (`kernels.cu`) are compiled once
//! per process and GPU generation when first used (≈ 0.1–0.3 s), for the compute capability of
//! the GPU that is present. So one binary serves any NVIDIA GPU the driver supports, fer-cam's
//! build script stays empty, and nothing of ours depends on `CUDA_COMPUTE_CAP` (which candle's
//! own kernels are built for). The price is libnvrtc at run time, which every CUDA toolkit and
//! PyTorch install has. The kernels are compiled with `--fmad=false`, so their arithmetic is
//! the CPU twins' operation for operation where the order of sums is the same (the crop).
//!
//! Every kernel has a CPU twin that is the reference; `tests/cuda.rs` holds the parity tests.

mod card;
mod crop;

pub use card::{DeviceSamples, GpuCard};
pub use crop::crop_faces;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{Device, Storage, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr};

use crate::error::{Error, Result};

/// The kernels' source.
const SOURCE: &str = include_str!("kernels.cu");
/// The name candle caches the loaded module under.
const MODULE: &str = "fer_cam_kernels";

/// A one-line error naming the GPU step that failed.
pub(crate) fn gpu_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("cuda: {what}: {e}"))
}

/// Opens GPU `ordinal` for candle, with a one-line error when the driver or the GPU is missing.
pub fn open_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        let first = e.to_string().lines().next().unwrap_or("").to_string();
        Error::Msg(format!(
            "--device cuda:{ordinal}: no usable CUDA GPU ({first}); is the NVIDIA driver \
             installed and the GPU visible (nvidia-smi)?"
        ))
    })
}

/// Compiled PTX per compute capability.
type PtxCache = Mutex<HashMap<(i32, i32), Arc<str>>>;

/// The PTX of [`SOURCE`] for compute capability `(major, minor)`, compiled once per process.
fn ptx_for(cc: (i32, i32)) -> Result<Arc<str>> {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(&cc) {
        return Ok(p.clone());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        options: vec![format!("--gpu-architecture=compute_{}{}", cc.0, cc.1)],
        name: Some("fer_cam_kernels.cu".into()),
        ..Default::default()
    };
    let ptx: Arc<str> = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| gpu_err("compiling src/cuda/kernels.cu with NVRTC", e))?
        .to_src()
        .into();
    map.insert(cc, ptx.clone());
    Ok(ptx)
}

/// Kernel `name` of [`SOURCE`] on `dev`, compiled for its GPU on first use.
pub(crate) fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    let cc = dev
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| gpu_err("reading the compute capability", e))?;
    let ptx = ptx_for(cc)?;
    Ok(dev
        .get_or_load_custom_func(name, MODULE, &ptx)
        .map_err(|e| gpu_err(&format!("loading kernel {name}"), e))?
        .into_cuda_function())
}

/// The CUDA device of `device`, or an error naming `what` needs one.
pub(crate) fn cuda_device<'a>(device: &'a Device, what: &str) -> Result<&'a CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        _ => Err(Error::Msg(format!("{what} needs a CUDA device"))),
    }
}

/// Copies host values to a new buffer on `dev`.
pub(crate) fn upload<T: DeviceRepr + 'static>(dev: &CudaDevice, v: &[T]) -> Result<CudaSlice<T>> {
    dev.clone_htod(v)
        .map_err(|e| gpu_err("copying to the GPU", e))
}

/// Copies a buffer back to the host (waits for the work that writes it).
pub(crate) fn download<T: DeviceRepr>(dev: &CudaDevice, s: &CudaSlice<T>) -> Result<Vec<T>> {
    dev.clone_dtoh(s)
        .map_err(|e| gpu_err("copying from the GPU", e))
}

/// Calls `f` with a view of a contiguous f32 CUDA tensor's elements.
pub(crate) fn with_f32_view<R>(
    t: &Tensor,
    f: impl FnOnce(&CudaView<'_, f32>) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(Error::Msg("cuda: expected a tensor on the GPU".into()));
    };
    let slice = cs.as_cuda_slice::<f32>()?;
    let start = layout.start_offset();
    let view = slice.slice(start..start + layout.shape().elem_count());
    f(&view)
}

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU: the kernels must compile for the generations docs/kernels.md names.
    #[test]
    fn kernels_compile_with_nvrtc() {
        for cc in [(9, 0), (8, 0), (8, 6), (8, 9)] {
            let ptx = super::ptx_for(cc).unwrap_or_else(|e| panic!("compute {cc:?}: {e}"));
            for name in ["card_embed", "card_chain", "card_summary", "crop_faces"] {
                assert!(
                    ptx.contains(&format!(".entry {name}")),
                    "{cc:?}: {name} missing"
                );
            }
        }
    }
}
