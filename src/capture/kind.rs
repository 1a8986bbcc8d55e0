//! What `--input` names, decided from what it holds rather than what it is called: a y4m
//! stream is recognised by its magic bytes whatever its extension, pipes and devices are live
//! streams, and formats fer-cam does not read are refused with the command that converts them.

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
    /// Stills: an image file or a directory of them.
    Images,
}

fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Refuses compressed video by name, before anything is opened.
pub fn refuse_compressed(p: &Path) -> Result<()> {
    if ["mp4", "mkv", "avi", "mov", "webm"].contains(&extension(p).as_str()) {
        return Err(Error::file(
            p,
            format!(
                "compressed video is not decoded here; pipe it through ffmpeg: \
                 ffmpeg -i {} -f yuv4mpegpipe - | fer-cam run --input -",
                p.display()
            ),
        ));
    }
    Ok(())
}

impl InputKind {
    /// Detects the kind of a single input path (several paths are always stills).
    pub fn detect(p: &Path) -> Result<Self> {
        if p.as_os_str() == "-" {
            return Ok(InputKind::Stdin);
        }
        refuse_compressed(p)?;
        let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        if meta.is_dir() {
            return Ok(InputKind::Images);
        }
        if !meta.is_file() {
            return Ok(InputKind::Stream);
        }
        let mut magic = [0u8; 9];
        let n = std::fs::File::open(p)
            .and_then(|mut f| f.read(&mut magic))
            .map_err(|e| Error::io(p, e))?;
        let ext = extension(p);
        if &magic[..n] == b"YUV4MPEG2" || ext == "y4m" {
            return Ok(InputKind::Y4mFile);
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
    Stdin,
    /// A live YUV4MPEG2 stream (a pipe or device) or a y4m file.
    Y4m {
        path: PathBuf,
        live: bool,
    },
    Images(Vec<PathBuf>),
}

impl Input {
    /// Chooses the input from `--input` paths (one y4m stream or file, `-`, or stills) or a
    /// camera (`camera` wins; cameras need the `camera` feature, checked when opened). Every
    /// path naming compressed video is refused before anything is opened.
    pub fn select(paths: &[PathBuf], camera: Option<Input>) -> Result<Self> {
        if let Some(cam) = camera {
            return Ok(cam);
        }
        for p in paths {
            refuse_compressed(p)?;
        }
        Ok(match paths {
            [] => return Err(Error::Config(
                "give --input FILE.y4m, --input - (YUV4MPEG2 on stdin), image files, or --camera N"
                    .into(),
            )),
            [one] => match InputKind::detect(one)? {
                InputKind::Stdin => Input::Stdin,
                InputKind::Stream => Input::Y4m {
                    path: one.clone(),
                    live: true,
                },
                InputKind::Y4mFile => Input::Y4m {
                    path: one.clone(),
                    live: false,
                },
                InputKind::Images => Input::Images(paths.to_vec()),
            },
            _ => Input::Images(paths.to_vec()),
        })
    }

    /// Frames arrive in real time (a camera, stdin, a pipe): stale ones are dropped.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            Input::Camera { .. } | Input::Stdin | Input::Y4m { live: true, .. }
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
                let first = CameraSource::open(index, width, height, fps)?;
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
            Input::Stdin => Ok(Box::new(super::Y4mSource::new(std::io::stdin(), "stdin")?)),
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
        let e = InputKind::detect(Path::new("talk.mp4"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("yuv4mpegpipe"), "{e}");
    }

    #[test]
    fn the_input_is_chosen_from_the_paths_or_the_camera() {
        let dir = tempfile::tempdir().unwrap();
        let y4m = dir.path().join("clip.y4m");
        std::fs::write(&y4m, b"YUV4MPEG2 W2 H2\n").unwrap();
        let png = dir.path().join("a.png");
        std::fs::write(&png, b"x").unwrap();
        let file = Input::select(std::slice::from_ref(&y4m), None).unwrap();
        assert_eq!(
            file,
            Input::Y4m {
                path: y4m.clone(),
                live: false
            }
        );
        assert!(file.is_video() && !file.is_live());
        let pipe = Input::select(&[PathBuf::from("/dev/null")], None).unwrap();
        assert!(pipe.is_video() && pipe.is_live());
        let stdin = Input::select(&[PathBuf::from("-")], None).unwrap();
        assert_eq!(stdin, Input::Stdin);
        assert!(stdin.is_live());
        let stills = Input::select(&[png.clone(), y4m.clone()], None).unwrap();
        assert_eq!(stills, Input::Images(vec![png.clone(), y4m.clone()]));
        assert!(!stills.is_video() && !stills.is_live());
        let cam = Input::Camera {
            index: 0,
            width: 640,
            height: 480,
            fps: 30,
        };
        assert_eq!(Input::select(&[], Some(cam.clone())).unwrap(), cam);
        assert!(cam.is_live() && cam.is_video());
        assert!(Input::select(&[], None).is_err());
        // Compressed video is refused wherever it stands in the list.
        let e = Input::select(&[png, PathBuf::from("talk.mp4")], None).unwrap_err();
        assert!(e.to_string().contains("yuv4mpegpipe"), "{e}");
    }
}
