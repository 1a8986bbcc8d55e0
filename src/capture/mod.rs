//! Frame sources behind one trait: YUV4MPEG2 streams (files or stdin), compressed video (through
//! ffmpeg), still images (files or a sorted directory), and the reconnect logic used for cameras. Frames carry a sequence number
//! and capture timestamps from here to the emitter.

#[cfg(feature = "camera")]
pub mod camera;
pub mod clip;
pub mod color;
pub mod ffmpeg;
mod images;
mod kind;
mod reconnect;
mod y4m;

use std::time::{Instant, SystemTime};

pub use color::Chroma;
pub use images::ImageSource;
pub use kind::{Input, InputKind, NO_CAMERA_SUPPORT};
pub use reconnect::{Backoff, Reconnecting};
pub use y4m::Y4mSource;

use crate::error::Result;

/// One grayscale frame (the luma plane of video, or a decoded still converted to gray).
#[derive(Debug, Clone)]
pub struct Frame {
    /// Position in the source, from 0, counting frames the pipeline later drops.
    pub seq: u64,
    pub captured: Instant,
    pub wall: SystemTime,
    pub width: u32,
    pub height: u32,
    /// Row-major 8-bit luma, `width * height` bytes.
    pub gray: Vec<u8>,
    /// Where the frame came from (e.g. a file name for stills).
    pub label: Option<String>,
    /// The frame's colour at 4:2:0, only when asked for ([`FrameSource::keep_color`]) and the
    /// source has colour.
    pub chroma: Option<Chroma>,
    /// Media time in seconds: the frame's place in the recording (frame number over a video's
    /// rate, or time since a camera opened); `None` for stills.
    pub pts: Option<f64>,
}

/// What a source produced.
#[derive(Debug)]
pub enum SourceEvent {
    Frame(Frame),
    /// A recoverable problem (an unreadable still, a camera that went away); counted and
    /// reported as a `warning` line, then the source carries on.
    Warning(String),
    /// No more frames.
    End,
}

/// Anything that yields frames. Built inside the capture thread (cameras are not `Send`).
pub trait FrameSource {
    /// The next frame, a warning, or the end. `Err` is fatal (e.g. a corrupt stream).
    fn next_event(&mut self) -> Result<SourceEvent>;
    /// Short description for the `source` field, e.g. `file:talk.y4m`, `stdin`, `camera:0`.
    fn name(&self) -> String;
    /// Nominal frame rate, when the source knows it.
    fn fps(&self) -> Option<f64> {
        None
    }
    /// Also deliver each frame's colour (for annotated output). Sources without colour ignore it.
    fn keep_color(&mut self, _on: bool) {}
}
