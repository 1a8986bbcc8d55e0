//! Webcams through nokhwa (V4L2 on Linux), behind the `camera` feature. The camera is opened
//! inside the capture thread (nokhwa's `Camera` is not `Send`) and wrapped in
//! [`super::Reconnecting`], so a camera that disappears gives warnings and reconnect attempts.

use std::time::{Instant, SystemTime};

use nokhwa::pixel_format::LumaFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
    Resolution,
};
use nokhwa::Camera;

use super::color::{gray_image, luma};
use super::{Chroma, Frame, FrameSource, SourceEvent};
use crate::error::{Error, Result};

/// An open camera stream.
pub struct CameraSource {
    camera: Camera,
    index: u32,
    seq: u64,
    keep_color: bool,
    /// When the stream opened: media time counts from here.
    opened: Instant,
}

fn busy_hint(msg: &str) -> String {
    if msg.contains("busy") || msg.contains("EBUSY") || msg.contains("Device or resource busy") {
        format!(
            "{msg} — another program (the video call?) holds the camera; see README, \
             \"Sharing the camera\", to feed fer-cam through ffmpeg or a v4l2loopback device"
        )
    } else {
        msg.to_string()
    }
}

impl CameraSource {
    /// Opens camera `index` at the format closest to `width`×`height` @ `fps`.
    pub fn open(index: u32, width: u32, height: u32, fps: u32) -> Result<Self> {
        let want = CameraFormat::new(Resolution::new(width, height), FrameFormat::YUYV, fps);
        let req = RequestedFormat::new::<LumaFormat>(RequestedFormatType::Closest(want));
        let mut camera = Camera::new(CameraIndex::Index(index), req)
            .map_err(|e| Error::Msg(format!("camera {index}: {}", busy_hint(&e.to_string()))))?;
        camera
            .open_stream()
            .map_err(|e| Error::Msg(format!("camera {index}: {}", busy_hint(&e.to_string()))))?;
        Ok(Self {
            camera,
            index,
            seq: 0,
            keep_color: false,
            opened: Instant::now(),
        })
    }
}

/// Colour of a raw camera frame at 4:2:0 (`None`: gray formats, or a frame that cannot give it).
fn to_chroma(raw: &[u8], format: FrameFormat, w: u32, h: u32) -> Option<Chroma> {
    let (w, h) = (w as usize, h as usize);
    match format {
        FrameFormat::YUYV => Chroma::from_yuyv(raw, w, h),
        FrameFormat::NV12 => Chroma::from_nv12(raw, w, h),
        FrameFormat::RAWRGB => Chroma::from_rgb(raw, w, h),
        FrameFormat::MJPEG => {
            let rgb = image::load_from_memory(raw).ok()?.into_rgb8();
            Chroma::from_rgb(&rgb, rgb.width() as usize, rgb.height() as usize)
        }
        _ => None,
    }
}

/// Luma plane of a raw camera frame.
fn to_gray(raw: &[u8], format: FrameFormat, w: u32, h: u32) -> Result<Vec<u8>> {
    let n = (w * h) as usize;
    let short = || {
        Error::Msg(format!(
            "short camera frame ({} bytes for {w}x{h})",
            raw.len()
        ))
    };
    match format {
        FrameFormat::YUYV => {
            if raw.len() < 2 * n {
                return Err(short());
            }
            Ok(raw.iter().step_by(2).take(n).copied().collect())
        }
        FrameFormat::NV12 | FrameFormat::GRAY => raw.get(..n).map(|s| s.to_vec()).ok_or_else(short),
        FrameFormat::RAWRGB => {
            if raw.len() < 3 * n {
                return Err(short());
            }
            Ok(raw
                .chunks_exact(3)
                .take(n)
                .map(|p| luma(p[0], p[1], p[2]))
                .collect())
        }
        FrameFormat::MJPEG => image::load_from_memory(raw)
            .map(|img| gray_image(img).into_raw())
            .map_err(|e| Error::Msg(format!("undecodable MJPEG frame: {e}"))),
        other => Err(Error::Msg(format!(
            "camera pixel format {other:?} is not supported"
        ))),
    }
}

impl FrameSource for CameraSource {
    fn next_event(&mut self) -> Result<SourceEvent> {
        let format = self.camera.frame_format();
        let res = self.camera.resolution();
        let raw = self
            .camera
            .frame_raw()
            .map_err(|e| Error::Msg(format!("camera {}: {e}", self.index)))?;
        let gray = match to_gray(&raw, format, res.width(), res.height()) {
            Ok(g) => g,
            Err(e) => return Ok(SourceEvent::Warning(e.to_string())),
        };
        let chroma = if self.keep_color {
            to_chroma(&raw, format, res.width(), res.height())
        } else {
            None
        };
        let seq = self.seq;
        self.seq += 1;
        Ok(SourceEvent::Frame(Frame {
            seq,
            captured: Instant::now(),
            wall: SystemTime::now(),
            width: res.width(),
            height: res.height(),
            gray,
            label: None,
            chroma,
            pts: Some(self.opened.elapsed().as_secs_f64()),
        }))
    }

    fn keep_color(&mut self, on: bool) {
        self.keep_color = on;
    }

    fn name(&self) -> String {
        format!("camera:{}", self.index)
    }

    fn fps(&self) -> Option<f64> {
        Some(self.camera.frame_rate() as f64)
    }
}

/// One line per camera and format, for `fer-cam devices`.
pub fn list_devices() -> Result<Vec<String>> {
    let cams =
        nokhwa::query(ApiBackend::Auto).map_err(|e| Error::Msg(format!("listing cameras: {e}")))?;
    let mut out = Vec::new();
    for info in cams {
        let idx = info.index().clone();
        out.push(format!(
            "{idx}: {} ({})",
            info.human_name(),
            info.description()
        ));
        let req = RequestedFormat::new::<LumaFormat>(RequestedFormatType::None);
        match Camera::new(idx, req).and_then(|mut c| c.compatible_camera_formats()) {
            Ok(mut formats) => {
                formats.sort_by_key(|f| (f.width(), f.height(), f.frame_rate()));
                for f in formats {
                    out.push(format!(
                        "    {}x{} @ {} fps {}",
                        f.width(),
                        f.height(),
                        f.frame_rate(),
                        f.format()
                    ));
                }
            }
            Err(e) => out.push(format!(
                "    formats unavailable: {}",
                busy_hint(&e.to_string())
            )),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_formats_to_gray() {
        assert_eq!(
            to_gray(&[10, 1, 20, 2, 30, 3, 40, 4], FrameFormat::YUYV, 2, 2).unwrap(),
            vec![10, 20, 30, 40]
        );
        assert_eq!(
            to_gray(&[255, 255, 255], FrameFormat::RAWRGB, 1, 1).unwrap(),
            vec![255]
        );
        assert!(to_gray(&[1, 2], FrameFormat::YUYV, 2, 2).is_err());
        assert!(busy_hint("Device or resource busy").contains("Sharing the camera"));
    }
}
