//! Crop → resize → normalise for a batch of face boxes of one frame, on the GPU: the twin of
//! [`crate::face::crop_face`] for each box followed by [`crate::Classifier::preprocess`], for
//! upright crops: a box whose roll would turn its crop (see [`crate::face::crop_turn`]) is
//! refused rather than cropped unlike the CPU (the pipeline crops on the CPU).

use candle_core::cuda_backend::{cudarc, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{cuda_device, function, gpu_err, upload};
use crate::error::{Error, Result};
use crate::face::{crop_square, FaceBox};

/// The crops of `boxes` (each enlarged by `margin`, see [`crop_square`]) from the gray frame
/// `w × h`, resized to `side × side` and normalised `(v/255 − mean)/std`: a tensor
/// `(boxes, 1, side, side)` on `device`'s GPU, ready for an encoder whose `input.norm` is fixed
/// (a per-crop model's input is normalised on the CPU, by `preprocess`).
#[allow(clippy::too_many_arguments)]
pub fn crop_faces(
    device: &Device,
    gray: &[u8],
    w: u32,
    h: u32,
    boxes: &[FaceBox],
    margin: f32,
    side: usize,
    mean: f32,
    std: f32,
) -> Result<Tensor> {
    let dev = cuda_device(device, "GPU crops")?;
    if gray.len() != w as usize * h as usize || w == 0 || h == 0 || side == 0 {
        return Err(Error::Msg(format!(
            "GPU crops: a frame of {} bytes is not {w}x{h}, or the crop side is 0",
            gray.len()
        )));
    }
    let mut squares = Vec::with_capacity(boxes.len() * 3);
    for b in boxes {
        if crate::face::crop_turn(b.roll) != 0.0 {
            return Err(Error::Msg(format!(
                "GPU crops: box {b:?} needs a turned crop, which only the CPU makes"
            )));
        }
        let (x0, y0, n) = crop_square(b, margin);
        let fits = |v: i64| i32::try_from(v).is_ok();
        if !(fits(x0) && fits(y0) && fits(n)) {
            return Err(Error::Msg(format!("GPU crops: box {b:?} is out of range")));
        }
        squares.extend([x0 as i32, y0 as i32, n as i32]);
    }
    let len = boxes.len() * side * side;
    let mut out = dev
        .alloc_zeros::<f32>(len.max(1))
        .map_err(|e| gpu_err("allocating", e))?;
    if !boxes.is_empty() {
        let frame = upload(dev, gray)?;
        let squares = upload(dev, &squares)?;
        let func = function(dev, "crop_faces")?;
        let stream = dev.cuda_stream();
        let (wi, hi, bi, si) = (w as i32, h as i32, boxes.len() as i32, side as i32);
        let mut l = stream.launch_builder(&func);
        l.arg(&frame)
            .arg(&wi)
            .arg(&hi)
            .arg(&squares)
            .arg(&bi)
            .arg(&si);
        l.arg(&mean).arg(&std).arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (len.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match crop_faces' signature; the frame holds w·h bytes,
        // squares 3 ints per box, out boxes·side² floats; every read is clamped in the frame.
        unsafe { l.launch(cfg) }.map_err(|e| gpu_err("crop_faces", e))?;
    }
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    let t = Tensor::from_storage(storage, len.max(1), BackpropOp::none(), false);
    Ok(t.narrow(0, 0, len)?.reshape((boxes.len(), 1, side, side))?)
}
