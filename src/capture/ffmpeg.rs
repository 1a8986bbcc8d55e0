//! Compressed video (mp4, webm, mkv, mov, ...) decoded by the `ffmpeg` program into a
//! YUV4MPEG2 stream that [`Y4mSource`] reads. ffmpeg writes at a constant frame rate, so frame
//! `n` sits at `n / fps` seconds of the recording. Nothing is dropped: ffmpeg waits when fer-cam
//! is slower than the decode.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{FrameSource, SourceEvent, Y4mSource};
use crate::error::{Error, Result};

/// File name endings taken for compressed video, whatever their content.
pub const VIDEO_EXTENSIONS: [&str; 13] = [
    "mp4", "m4v", "mov", "mkv", "webm", "avi", "wmv", "flv", "mpg", "mpeg", "ts", "3gp", "ogv",
];

/// The program run, overridable for a copy that is not on PATH.
fn program() -> String {
    std::env::var("FER_CAM_FFMPEG").unwrap_or_else(|_| "ffmpeg".into())
}

/// What to do when ffmpeg cannot be started.
pub fn missing_hint(path: &Path) -> String {
    format!(
        "{} is compressed video, which fer-cam decodes with the ffmpeg program, and ffmpeg \
         is not installed (Debian/Ubuntu: sudo apt install ffmpeg; macOS: brew install ffmpeg; \
         or set FER_CAM_FFMPEG=/path/to/ffmpeg)",
        path.display()
    )
}

/// Whether the first bytes of a file look like a container ffmpeg would read: ISO media
/// (`ftyp`), Matroska/WebM (EBML), AVI (RIFF), MPEG-PS/TS or Ogg.
pub fn looks_like_video(magic: &[u8]) -> bool {
    (magic.len() >= 8 && &magic[4..8] == b"ftyp")
        || magic.starts_with(&[0x1A, 0x45, 0xDF, 0xA3])
        || (magic.len() >= 12 && magic.starts_with(b"RIFF") && &magic[8..12] == b"AVI ")
        || magic.starts_with(&[0x00, 0x00, 0x01, 0xBA])
        || magic.starts_with(b"OggS")
        || (magic.len() >= 189 && magic[0] == 0x47 && magic[188] == 0x47)
}

/// Whether `p` is named as compressed video.
pub fn has_video_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Frames of a video file, decoded by a child `ffmpeg`.
pub struct FfmpegSource {
    path: PathBuf,
    child: Child,
    frames: Y4mSource<ChildStdout>,
    stderr: StderrTail,
    ended: bool,
}

/// The last few KB ffmpeg writes to stderr, read on a thread of its own (so a talkative ffmpeg
/// never blocks on a full pipe), for the error when it fails.
struct StderrTail {
    text: Arc<Mutex<String>>,
    thread: Option<JoinHandle<()>>,
}

impl StderrTail {
    fn read(err: Option<ChildStderr>) -> Self {
        let text = Arc::new(Mutex::new(String::new()));
        let thread = err.map(|mut err| {
            let keep = text.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = err.read(&mut buf) {
                    if let Ok(mut s) = keep.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        // Keep the tail only: a broken file can make ffmpeg talk a lot.
                        if s.len() > 8192 {
                            let cut = s.len() - 4096;
                            let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                            s.drain(..cut);
                        }
                    }
                }
            })
        });
        Self { text, thread }
    }

    /// The last line ffmpeg wrote, once it has exited (empty when it said nothing).
    fn last_line(&mut self) -> String {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.text.lock().map(|s| last_line(&s)).unwrap_or_default()
    }
}

/// The error for a stream that broke: ffmpeg (stopped here) in its own words when it has any
/// (an unreadable file), else the stream's.
fn broken(path: &Path, child: &mut Child, stderr: &mut StderrTail, stream_error: Error) -> Error {
    let _ = child.kill();
    let _ = child.wait();
    let said = stderr.last_line();
    if said.is_empty() {
        stream_error
    } else {
        Error::file(path, format!("ffmpeg cannot decode it: {said}"))
    }
}

impl FfmpegSource {
    /// Starts ffmpeg on `path` and reads the stream header.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(&program(), path)
    }

    fn open_with(program: &str, path: &Path) -> Result<Self> {
        let mut child = Command::new(program)
            .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-i"])
            .arg(path)
            .args([
                "-map",
                "0:v:0",
                "-f",
                "yuv4mpegpipe",
                "-pix_fmt",
                "yuv420p",
                "-",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::Config(missing_hint(path))
                } else {
                    Error::file(path, format!("cannot start ffmpeg: {e}"))
                }
            })?;
        let mut stderr = StderrTail::read(child.stderr.take());
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::file(path, "ffmpeg gave no output pipe"))?;
        let name = format!("file:{}", path.display());
        let frames = match Y4mSource::new(stdout, name) {
            Ok(f) => f,
            Err(e) => return Err(broken(path, &mut child, &mut stderr, e)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            child,
            frames,
            stderr,
            ended: false,
        })
    }

    /// Waits for ffmpeg after the stream ended; its failure is the run's error.
    fn finish(&mut self) -> Result<()> {
        self.ended = true;
        let status = self
            .child
            .wait()
            .map_err(|e| Error::file(&self.path, format!("waiting for ffmpeg: {e}")))?;
        let said = self.stderr.last_line();
        if status.success() {
            return Ok(());
        }
        Err(Error::file(
            &self.path,
            format!(
                "ffmpeg stopped with {status}{}",
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            ),
        ))
    }
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect()
}

impl FrameSource for FfmpegSource {
    fn next_event(&mut self) -> Result<SourceEvent> {
        if self.ended {
            return Ok(SourceEvent::End);
        }
        match self.frames.next_event() {
            Ok(SourceEvent::End) => {
                self.finish()?;
                Ok(SourceEvent::End)
            }
            Ok(ev) => Ok(ev),
            Err(e) => {
                // A stream cut short: say why ffmpeg stopped, if it did.
                self.ended = true;
                Err(broken(&self.path, &mut self.child, &mut self.stderr, e))
            }
        }
    }

    fn name(&self) -> String {
        self.frames.name()
    }

    fn fps(&self) -> Option<f64> {
        self.frames.fps()
    }

    fn keep_color(&mut self, on: bool) {
        self.frames.keep_color(on);
    }
}

impl Drop for FfmpegSource {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_are_known_by_their_first_bytes() {
        let mut mp4 = vec![0, 0, 0, 0x20];
        mp4.extend(b"ftypisom");
        assert!(looks_like_video(&mp4));
        assert!(looks_like_video(&[0x1A, 0x45, 0xDF, 0xA3, 1, 2]));
        assert!(looks_like_video(b"RIFF\0\0\0\0AVI LIST"));
        assert!(!looks_like_video(b"RIFF\0\0\0\0WEBPVP8 "));
        assert!(!looks_like_video(b"\x89PNG\r\n\x1a\n"));
        assert!(!looks_like_video(b"YUV4MPEG2 W2"));
        assert!(has_video_extension(Path::new("a/Talk.MP4")));
        assert!(!has_video_extension(Path::new("a/talk.y4m")));
    }

    #[test]
    fn a_missing_ffmpeg_says_how_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let clip = dir.path().join("talk.mp4");
        std::fs::write(&clip, b"\0\0\0\x20ftypisom").unwrap();
        // A program that does not exist stands in for a machine without ffmpeg.
        let none = dir.path().join("no-ffmpeg-here");
        let e = FfmpegSource::open_with(none.to_str().unwrap(), &clip)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("apt install ffmpeg") && e.contains("talk.mp4"),
            "{e}"
        );
    }
}
