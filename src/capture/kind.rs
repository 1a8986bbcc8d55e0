//! What `--input` names, decided from what it holds rather than what it is called: a y4m
//! stream is recognised by its magic bytes whatever its extension, pipes and devices are live
//! streams, and formats fer-cam does not read are refused with the command that converts them.

use std::io::Read;
use std::path::Path;

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
}
