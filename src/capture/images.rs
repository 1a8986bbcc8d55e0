//! Still images as frames: a list of files, or every image in a directory in name order.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use super::color::gray_image;
use super::{Chroma, Frame, FrameSource, SourceEvent};
use crate::error::{Error, Result};

const EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "pgm", "ppm"];

/// Decodes each still once, in order. Unreadable files become warnings.
pub struct ImageSource {
    files: Vec<PathBuf>,
    next: usize,
    name: String,
    keep_color: bool,
    decoded: usize,
    /// A frame held back while its warning goes out first.
    pending: Option<Frame>,
    /// Files in the directories that are not images, said once before the first frame.
    skipped: Vec<PathBuf>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

impl ImageSource {
    /// From paths; a directory contributes its image files sorted by name.
    pub fn new(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        for p in paths {
            if p.is_dir() {
                let (mut v, mut other): (Vec<PathBuf>, Vec<PathBuf>) = std::fs::read_dir(p)
                    .map_err(|e| Error::io(p, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.is_file() && !crate::decode::is_hidden(f))
                    .partition(|f| is_image(f));
                v.sort();
                other.sort();
                files.extend(v);
                skipped.extend(other);
            } else if p.is_file() {
                files.push(p.clone());
            } else {
                return Err(Error::file(p, "no such file or directory"));
            }
        }
        if files.is_empty() {
            return Err(Error::Config(format!(
                "no image files to read ({})",
                if skipped.is_empty() {
                    "the folder is empty".to_string()
                } else {
                    skipped_message(&skipped)
                }
            )));
        }
        let name = match paths {
            [one] => format!("file:{}", one.display()),
            _ => format!("files:{}", files.len()),
        };
        Ok(Self {
            files,
            next: 0,
            name,
            keep_color: false,
            decoded: 0,
            pending: None,
            skipped,
        })
    }
}

/// A still's name for the `file` field: its path as text, with bytes that are not UTF-8 written
/// as `\xNN`, so two names that differ only there stay different.
fn path_label(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in p.as_os_str().as_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// "skipped N files that are not images (.png, ...): a, b, ..." with a hint for video.
fn skipped_message(skipped: &[PathBuf]) -> String {
    let shown: Vec<String> = skipped
        .iter()
        .take(5)
        .map(|p| crate::log::escape(&p.display().to_string()))
        .collect();
    let more = skipped.len().saturating_sub(shown.len());
    let video = skipped.iter().any(|p| {
        super::ffmpeg::has_video_extension(p) || p.extension().is_some_and(|e| e == "y4m")
    });
    format!(
        "skipped {} file(s) that are not images ({}): {}{}{}",
        skipped.len(),
        EXTENSIONS.map(|e| format!(".{e}")).join(", "),
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        },
        if video {
            "; a video is read on its own: --input FILE"
        } else {
            ""
        }
    )
}

impl FrameSource for ImageSource {
    fn next_event(&mut self) -> Result<SourceEvent> {
        if let Some(frame) = self.pending.take() {
            return Ok(SourceEvent::Frame(frame));
        }
        if !self.skipped.is_empty() {
            let message = skipped_message(&self.skipped);
            self.skipped.clear();
            return Ok(SourceEvent::Warning(message));
        }
        let Some(path) = self.files.get(self.next).cloned() else {
            if self.decoded == 0 {
                // Not one picture: the input was not what it was taken for.
                return Err(Error::Msg(format!(
                    "none of the {} input file(s) could be decoded as an image",
                    self.files.len()
                )));
            }
            return Ok(SourceEvent::End);
        };
        let seq = self.next as u64;
        self.next += 1;
        match crate::decode::decode_image(&path) {
            Ok(img) => {
                let chroma = self.keep_color.then(|| {
                    let rgb = img.to_rgb8();
                    Chroma::from_rgb(&rgb, rgb.width() as usize, rgb.height() as usize)
                });
                let g = gray_image(img);
                self.decoded += 1;
                let frame = Frame {
                    seq,
                    captured: Instant::now(),
                    wall: SystemTime::now(),
                    width: g.width(),
                    height: g.height(),
                    gray: g.into_raw(),
                    label: Some(path_label(&path)),
                    chroma: chroma.flatten(),
                    pts: None,
                };
                if crate::decode::jpeg_is_truncated(&path).unwrap_or(false) {
                    self.pending = Some(frame);
                    return Ok(SourceEvent::Warning(format!(
                        "{}: truncated JPEG (no end marker): its missing part is filled in, \
                         so faces there are not real",
                        path.display()
                    )));
                }
                Ok(SourceEvent::Frame(frame))
            }
            Err(e) => Ok(SourceEvent::Warning(e.to_string())),
        }
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn keep_color(&mut self, on: bool) {
        self.keep_color = on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(src: &mut ImageSource) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match src.next_event().unwrap() {
                SourceEvent::Frame(f) => out.push(format!("frame {}", f.seq)),
                SourceEvent::Warning(w) => out.push(format!("warning {w}")),
                SourceEvent::End => return out,
            }
        }
    }

    #[test]
    fn names_that_differ_only_in_bytes_that_are_not_utf8_stay_apart() {
        use std::os::unix::ffi::OsStrExt;
        let a = Path::new(std::ffi::OsStr::from_bytes(b"photo\xff.png"));
        let b = Path::new(std::ffi::OsStr::from_bytes(b"photo\xfe.png"));
        assert_eq!(path_label(a), "photo\\xff.png");
        assert_ne!(path_label(a), path_label(b));
        assert_eq!(path_label(Path::new("été.png")), "été.png");
    }

    #[test]
    fn a_truncated_jpeg_is_shown_with_a_warning_first() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::GrayImage::from_fn(64, 64, |x, y| image::Luma([(x * 3 + y) as u8]));
        let whole = dir.path().join("a_whole.jpg");
        img.save(&whole).unwrap();
        let bytes = std::fs::read(&whole).unwrap();
        let cut = dir.path().join("b_cut.jpg");
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        assert!(!crate::decode::jpeg_is_truncated(&whole).unwrap());
        assert!(crate::decode::jpeg_is_truncated(&cut).unwrap());
        let mut src = ImageSource::new(&[dir.path().to_path_buf()]).unwrap();
        let ev = events(&mut src);
        assert_eq!(ev.len(), 3, "{ev:?}");
        assert_eq!(ev[0], "frame 0");
        assert!(
            ev[1].starts_with("warning")
                && ev[1].contains("b_cut.jpg")
                && ev[1].contains("truncated"),
            "{ev:?}"
        );
        assert_eq!(ev[2], "frame 1");
    }
}
