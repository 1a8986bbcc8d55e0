//! What `--input` names, decided from what it holds rather than what it is called: a y4m
//! stream or a video container is recognised by its first bytes whatever its extension, pipes
//! and devices are streams (read losslessly unless `--live`), and raw video without a header is
//! refused with the command that converts it.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The kind of one `--input` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// `-`
    Stdin,
    /// A pipe, FIFO or device (`/dev/stdin`, `<(ffmpeg ...)`): a live YUV4MPEG2 stream.
    Stream,
    /// A regular file that is (or is named as) YUV4MPEG2.
    Y4mFile,
    /// Compressed video (mp4, webm, mkv, mov, ...), decoded by ffmpeg.
    Video,
    /// Stills: an image file or a directory of them.
    Images,
}

fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

impl InputKind {
    /// Detects the kind of a single input path (several paths are always stills).
    pub fn detect(p: &Path) -> Result<Self> {
        if p.as_os_str() == "-" {
            return Ok(InputKind::Stdin);
        }
        let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        if meta.is_dir() {
            return Ok(InputKind::Images);
        }
        if !meta.is_file() {
            return Ok(InputKind::Stream);
        }
        let mut magic = [0u8; 192];
        let mut n = 0;
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        while n < magic.len() {
            match f.read(&mut magic[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(p, e)),
            }
        }
        let (magic, ext) = (&magic[..n], extension(p));
        if magic.starts_with(b"YUV4MPEG2") || ext == "y4m" {
            return Ok(InputKind::Y4mFile);
        }
        if super::ffmpeg::looks_like_video(magic) || super::ffmpeg::has_video_extension(p) {
            return Ok(InputKind::Video);
        }
        if ["yuv", "raw", "nv12", "rgb"].contains(&ext.as_str()) {
            return Err(Error::file(
                p,
                format!(
                    "raw video has no header (size, rate, layout); convert it to YUV4MPEG2: \
                     ffmpeg -f rawvideo -pix_fmt yuv420p -s WxH -i {} -f yuv4mpegpipe - \
                     | fer-cam run --input -",
                    p.display()
                ),
            ));
        }
        Ok(InputKind::Images)
    }
}

/// Why a camera cannot be opened by a build without the `camera` feature.
pub const NO_CAMERA_SUPPORT: &str = "this build has no camera support (rebuild with \
     `--features camera`), or feed frames through ffmpeg: see README, \"Sharing the camera\"";

/// What `run` reads: a camera, or `--input` paths classified by [`InputKind`].
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Camera {
        index: u32,
        width: u32,
        height: u32,
        fps: u32,
    },
    /// YUV4MPEG2 on stdin; `live` drops the stalest frame when the pipeline is busy.
    Stdin {
        live: bool,
    },
    /// A YUV4MPEG2 stream (a pipe or device) or a y4m file.
    Y4m {
        path: PathBuf,
        live: bool,
    },
    /// Compressed video, decoded by ffmpeg.
    Video(PathBuf),
    Images(Vec<PathBuf>),
}

impl Input {
    /// Chooses the input from `--input` paths (one y4m stream or file, one video file, `-`, or
    /// stills) or a camera (`camera` wins; cameras need the `camera` feature, checked when
    /// opened). Streams are read losslessly unless `live` (then the stalest queued frame is
    /// dropped when the pipeline is busy, as for a camera); `live` names a stream, not a file.
    pub fn select(paths: &[PathBuf], camera: Option<Input>, live: bool) -> Result<Self> {
        if let Some(cam) = camera {
            return Ok(cam);
        }
        let input =
            match paths {
                [] => return Err(Error::Config(
                    "give --input FILE (a video, .y4m or image), --input - (YUV4MPEG2 on stdin), \
                 a folder of images, or --camera N"
                        .into(),
                )),
                [one] => match InputKind::detect(one)? {
                    InputKind::Stdin => Input::Stdin { live },
                    InputKind::Stream => Input::Y4m {
                        path: one.clone(),
                        live,
                    },
                    InputKind::Y4mFile => Input::Y4m {
                        path: one.clone(),
                        live: false,
                    },
                    InputKind::Video => Input::Video(one.clone()),
                    InputKind::Images => Input::Images(paths.to_vec()),
                },
                _ => {
                    if let Some(v) = paths
                        .iter()
                        .find(|p| super::ffmpeg::has_video_extension(p) || extension(p) == "y4m")
                    {
                        return Err(Error::file(
                            v,
                            "video is read one file per run; several --input paths are stills",
                        ));
                    }
                    Input::Images(paths.to_vec())
                }
            };
        if live && !input.is_live() {
            return Err(Error::Config(
                "--live is for a stream (--input - or a pipe) that runs in real time; a file \
                 is read whole (use --realtime to pace it at its frame rate)"
                    .into(),
            ));
        }
        Ok(input)
    }

    /// Frames arrive in real time and stale ones are dropped: a camera, or a stream read
    /// with `--live`.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            Input::Camera { .. } | Input::Stdin { live: true } | Input::Y4m { live: true, .. }
        )
    }

    /// A video (consecutive frames of one scene), as opposed to unrelated stills.
    pub fn is_video(&self) -> bool {
        !matches!(self, Input::Images(_))
    }

    /// Opens the source. A camera that drops out is reopened with backoff until `cancelled()`;
    /// its first open must succeed (a missing or busy camera is an error, not a retry loop).
    pub fn open(
        &self,
        cancelled: impl Fn() -> bool + Send + 'static,
    ) -> Result<Box<dyn super::FrameSource>> {
        match self {
            #[cfg(feature = "camera")]
            &Input::Camera {
                index,
                width,
                height,
                fps,
            } => {
                use super::camera::CameraSource;
                use super::{Backoff, FrameSource, Reconnecting};
                let reopen = move || -> Result<Box<dyn FrameSource>> {
                    Ok(Box::new(CameraSource::open(index, width, height, fps)?))
                };
                let first = CameraSource::open(index, width, height, fps).map_err(|e| {
                    Error::Msg(format!(
                        "{e} (list the cameras with `fer-cam devices`, or read a recording \
                         with --input FILE)"
                    ))
                })?;
                let src = Reconnecting::new(format!("camera:{index}"), reopen, Backoff::default())
                    .with_source(Box::new(first))
                    .with_cancel(cancelled);
                Ok(Box::new(src))
            }
            #[cfg(not(feature = "camera"))]
            Input::Camera { .. } => {
                let _ = cancelled;
                Err(Error::Config(NO_CAMERA_SUPPORT.into()))
            }
            Input::Stdin { .. } => Ok(Box::new(super::Y4mSource::new(std::io::stdin(), "stdin")?)),
            Input::Video(path) => Ok(Box::new(super::ffmpeg::FfmpegSource::open(path)?)),
            Input::Y4m { path, .. } => {
                let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                Ok(Box::new(super::Y4mSource::new(
                    f,
                    format!("file:{}", path.display()),
                )?))
            }
            Input::Images(paths) => Ok(Box::new(super::ImageSource::new(paths)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_content() {
        let dir = tempfile::tempdir().unwrap();
        let y4m = dir.path().join("clip.dat");
        std::fs::write(&y4m, b"YUV4MPEG2 W2 H2\n").unwrap();
        assert_eq!(InputKind::detect(&y4m).unwrap(), InputKind::Y4mFile);
        assert_eq!(InputKind::detect(dir.path()).unwrap(), InputKind::Images);
        assert_eq!(InputKind::detect(Path::new("-")).unwrap(), InputKind::Stdin);
        assert_eq!(
            InputKind::detect(Path::new("/dev/null")).unwrap(),
            InputKind::Stream
        );
        let png = dir.path().join("x.png");
        std::fs::write(&png, b"whatever").unwrap();
        assert_eq!(InputKind::detect(&png).unwrap(), InputKind::Images);
        let raw = dir.path().join("x.yuv");
        std::fs::write(&raw, [0u8; 8]).unwrap();
        assert!(InputKind::detect(&raw)
            .unwrap_err()
            .to_string()
            .contains("raw video has no header"));
        // Video by name, or by content whatever the name.
        let mp4 = dir.path().join("talk.mp4");
        std::fs::write(&mp4, b"anything").unwrap();
        assert_eq!(InputKind::detect(&mp4).unwrap(), InputKind::Video);
        let disguised = dir.path().join("talk.bin");
        std::fs::write(&disguised, b"\0\0\0\x18ftypmp42rest").unwrap();
        assert_eq!(InputKind::detect(&disguised).unwrap(), InputKind::Video);
        assert!(InputKind::detect(Path::new("missing.mp4")).is_err());
    }

    #[test]
    fn the_input_is_chosen_from_the_paths_or_the_camera() {
        let dir = tempfile::tempdir().unwrap();
        let y4m = dir.path().join("clip.y4m");
        std::fs::write(&y4m, b"YUV4MPEG2 W2 H2\n").unwrap();
        let png = dir.path().join("a.png");
        std::fs::write(&png, b"x").unwrap();
        let mp4 = dir.path().join("talk.webm");
        std::fs::write(&mp4, b"x").unwrap();
        let file = Input::select(std::slice::from_ref(&y4m), None, false).unwrap();
        assert_eq!(
            file,
            Input::Y4m {
                path: y4m.clone(),
                live: false
            }
        );
        assert!(file.is_video() && !file.is_live());
        // Streams are lossless unless --live.
        let pipe = Input::select(&[PathBuf::from("/dev/null")], None, false).unwrap();
        assert!(pipe.is_video() && !pipe.is_live());
        let pipe = Input::select(&[PathBuf::from("/dev/null")], None, true).unwrap();
        assert!(pipe.is_live());
        let stdin = Input::select(&[PathBuf::from("-")], None, false).unwrap();
        assert_eq!(stdin, Input::Stdin { live: false });
        assert!(!stdin.is_live());
        assert!(Input::select(&[PathBuf::from("-")], None, true)
            .unwrap()
            .is_live());
        // --live names a stream, not a file.
        let e = Input::select(std::slice::from_ref(&y4m), None, true).unwrap_err();
        assert!(e.to_string().contains("--realtime"), "{e}");
        let video = Input::select(std::slice::from_ref(&mp4), None, false).unwrap();
        assert_eq!(video, Input::Video(mp4.clone()));
        assert!(video.is_video() && !video.is_live());
        let stills = Input::select(&[png.clone(), png.clone()], None, false).unwrap();
        assert_eq!(stills, Input::Images(vec![png.clone(), png.clone()]));
        assert!(!stills.is_video() && !stills.is_live());
        let cam = Input::Camera {
            index: 0,
            width: 640,
            height: 480,
            fps: 30,
        };
        assert_eq!(Input::select(&[], Some(cam.clone()), false).unwrap(), cam);
        assert!(cam.is_live() && cam.is_video());
        assert!(Input::select(&[], None, false).is_err());
        // A video among stills is refused, wherever it stands.
        let e = Input::select(&[png, mp4], None, false).unwrap_err();
        assert!(e.to_string().contains("one file per run"), "{e}");
    }
}
