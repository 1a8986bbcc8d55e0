//! `fer-cam run --annotate PATH`: every processed frame, with each face's box, track id, label
//! and probability bar drawn on it, written as YUV4MPEG2 (4:2:0) to a new file or to a pipe / FIFO
//! (`--annotate >(ffplay -i -)` is a live preview).
//!
//! The writer is its own thread behind a small queue, so the JSON path never waits on it while
//! the source is live: a frame that finds the queue full is dropped and counted, like the camera
//! queue. File input read as fast as possible waits for the writer instead (nothing is lost),
//! but never past cancellation. A failing output (reader gone, disk full) stops annotation with
//! one message; the JSON lines go on.
//!
//! YUV4MPEG2 needs one frame size: the first frame sets it, and later frames of another size
//! (stills) are scaled to fit inside it. For stills, a folder (`--annotate DIR/`) gets one PNG
//! per photo at the photo's own size instead.

pub mod draw;

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender, TrySendError};

use crate::capture::Chroma;
use crate::emit::FaceOut;
use crate::error::{Error, Result};
use draw::Canvas;

/// Frames waiting for the writer.
const QUEUE: usize = 4;
/// How long the end of a run waits for the writer to flush what is queued.
const FINISH_GRACE: Duration = Duration::from_secs(5);

/// Where annotation goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One YUV4MPEG2 stream: a new file, or a pipe / FIFO / device.
    Stream(PathBuf),
    /// One PNG per still, in this folder (created when missing; nothing in it is replaced).
    Folder(PathBuf),
}

/// Decides the target before the run starts: a folder (an existing directory or a path ending
/// in `/`) for stills, else a stream ([`check_path`]).
pub fn target(path: &Path, stills: bool) -> Result<Target> {
    let folder = path.is_dir() || path.as_os_str().as_encoded_bytes().ends_with(b"/");
    if !folder {
        check_path(path)?;
        return Ok(Target::Stream(path.to_path_buf()));
    }
    if !stills {
        return Err(Error::file(
            path,
            "is a folder: a folder gets one PNG per still; for video give a new .y4m file, a \
             FIFO, or >(ffplay -i -)",
        ));
    }
    if !path.is_dir() && !crate::fsutil::parent_dir(path).is_dir() {
        return Err(Error::file(path, "its parent folder does not exist"));
    }
    Ok(Target::Folder(path.to_path_buf()))
}

/// Checked before the run starts: the path is either new (annotation creates it, never replacing
/// a file) or an existing pipe, FIFO or character device; its folder exists.
pub fn check_path(path: &Path) -> Result<()> {
    if path.as_os_str() == "-" {
        return Err(Error::file(
            path,
            "stdout carries the JSON lines, and `-` is not taken as a file name: give a new \
             file, a FIFO, or >(ffplay -i -)",
        ));
    }
    if is_stdout(path) {
        return Err(Error::file(
            path,
            "is this process's standard output, which carries the JSON lines",
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Err(Error::file(
            path,
            "already exists (--annotate writes a new file, a pipe or a FIFO; it never replaces a file)",
        )),
        Ok(m) if m.is_dir() => Err(Error::file(path, "is a directory")),
        Ok(_) => Ok(()),
        Err(_) if crate::fsutil::parent_dir(path).is_dir() => Ok(()),
        Err(_) => Err(Error::file(path, "its folder does not exist")),
    }
}

/// Whether `path` is the file, pipe or terminal this process's stdout writes to (same device
/// and inode), as `/dev/stdout` or `/proc/self/fd/1` are.
fn is_stdout(path: &Path) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(path) else {
        return false;
    };
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|out| out.dev() == target.dev() && out.ino() == target.ino())
}

/// What annotation did in a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnnotateStats {
    pub written: u64,
    /// Frames not written because the writer was behind (live input) or the output failed.
    pub dropped: u64,
    /// Why annotation stopped early, if it did.
    pub error: Option<String>,
}

/// A processed frame's picture, handed to the writer.
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub luma: Vec<u8>,
    pub chroma: Option<Chroma>,
    /// Its number in the source.
    pub seq: u64,
    /// The still's file, for naming its PNG.
    pub file: Option<String>,
}

/// A processed frame for the writer.
struct Job {
    picture: Picture,
    faces: Vec<FaceOut>,
    /// The output's frame rate (used by the stream header).
    fps: f64,
}

/// The writer thread and its queue.
pub struct Annotator {
    tx: Option<Sender<Job>>,
    /// Frames (or PNGs) written, and the error that stopped the writer, if one did.
    done: Receiver<(u64, Option<Error>)>,
    handle: Option<JoinHandle<()>>,
    /// Wait for the writer instead of dropping (file input, not paced).
    blocking: bool,
    dropped: u64,
    fps: f64,
}

impl Annotator {
    /// Starts the writer; `classes` label the legend. The file is created (or the FIFO opened)
    /// by the writer thread, so a FIFO without a reader blocks only that thread.
    pub fn start(target: Target, classes: Vec<String>, blocking: bool) -> Result<Self> {
        let (tx, rx) = bounded::<Job>(QUEUE);
        let (done_tx, done) = bounded(1);
        let handle = std::thread::Builder::new()
            .name("fer-annotate".into())
            .spawn(move || {
                let mut written = 0u64;
                let result = match &target {
                    Target::Stream(path) => write_all(path, &classes, rx, &mut written),
                    Target::Folder(dir) => write_pngs(dir, &classes, rx, &mut written),
                };
                let _ = done_tx.send((written, result.err()));
            })
            .map_err(|e| Error::Msg(format!("cannot start the annotation thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            done,
            handle: Some(handle),
            blocking,
            dropped: 0,
            fps: 1.0,
        })
    }

    /// The output's nominal frame rate (the stream header's `F`), set before the first frame.
    pub fn set_rate(&mut self, fps: f64) {
        self.fps = fps;
    }

    /// Queues one processed frame (its planes are moved in). Drops it when the writer is behind
    /// on live input, or has stopped.
    pub fn push(&mut self, picture: Picture, faces: &[FaceOut], cancel: &AtomicBool) {
        let Some(tx) = &self.tx else {
            self.dropped += 1;
            return;
        };
        let mut job = Job {
            picture,
            faces: faces.to_vec(),
            fps: self.fps,
        };
        if !self.blocking {
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.dropped += 1,
                Err(TrySendError::Disconnected(_)) => self.stop(),
            }
            return;
        }
        loop {
            match tx.send_timeout(job, Duration::from_millis(50)) {
                Ok(()) => return,
                Err(SendTimeoutError::Timeout(j)) if !cancel.load(Ordering::SeqCst) => job = j,
                Err(SendTimeoutError::Timeout(_)) => {
                    self.dropped += 1;
                    return;
                }
                Err(SendTimeoutError::Disconnected(_)) => return self.stop(),
            }
        }
    }

    /// The writer has gone (its output failed): drop this frame and every later one.
    fn stop(&mut self) {
        self.tx = None;
        self.dropped += 1;
    }

    /// Closes the queue and waits (a few seconds at most: a stalled reader must not hang the
    /// exit) for the writer to write what is queued.
    pub fn finish(mut self) -> AnnotateStats {
        drop(self.tx.take());
        let mut stats = AnnotateStats {
            dropped: self.dropped,
            ..Default::default()
        };
        match self.done.recv_timeout(FINISH_GRACE) {
            Ok((written, error)) => {
                stats.written = written;
                stats.error = error.map(|e| e.to_string());
            }
            Err(_) => {
                stats.error = Some(format!(
                    "the annotation output did not take the last frames within {} s (no reader?)",
                    FINISH_GRACE.as_secs()
                ));
                // The thread is left blocked in open() or write(); the process is ending.
                return stats;
            }
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        stats
    }
}

/// Opens the output: creates a new file, or writes into an existing pipe / FIFO / device.
fn open_output(path: &Path) -> Result<std::fs::File> {
    let existing = std::fs::metadata(path).is_ok();
    OpenOptions::new()
        .write(true)
        .create_new(!existing)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// The `F` tag of the stream header: a rate as a fraction.
fn rate_tag(fps: f64) -> String {
    let fps = if fps.is_finite() && fps > 0.0 {
        fps.min(1000.0)
    } else {
        1.0
    };
    if (fps - fps.round()).abs() < 1e-9 {
        format!("F{}:1", fps.round() as u64)
    } else {
        format!("F{}:1000", (fps * 1000.0).round() as u64)
    }
}

/// The writer thread: draws each frame and writes it, counting into `written`.
fn write_all(path: &Path, classes: &[String], rx: Receiver<Job>, written: &mut u64) -> Result<()> {
    let mut out: Option<(BufWriter<std::fs::File>, usize, usize)> = None;
    let fail = |e: std::io::Error| Error::io(path, e);
    for job in rx.iter() {
        let Some(canvas) = drawn(job.picture, &job.faces) else {
            continue;
        };
        let (w, h) = match &out {
            Some((_, w, h)) => (*w, *h),
            None => (canvas.width, canvas.height),
        };
        let mut canvas = canvas.fit(w, h);
        canvas.legend(classes);
        if out.is_none() {
            let mut o = BufWriter::new(open_output(path)?);
            writeln!(
                o,
                "YUV4MPEG2 W{w} H{h} {} Ip A1:1 C420jpeg",
                rate_tag(job.fps)
            )
            .map_err(fail)?;
            out = Some((o, w, h));
        }
        let Some((o, _, _)) = out.as_mut() else {
            continue;
        };
        o.write_all(b"FRAME\n").map_err(fail)?;
        o.write_all(&canvas.y).map_err(fail)?;
        o.write_all(&canvas.chroma.u).map_err(fail)?;
        o.write_all(&canvas.chroma.v).map_err(fail)?;
        o.flush().map_err(fail)?;
        *written += 1;
    }
    if let Some((mut o, _, _)) = out {
        o.flush().map_err(fail)?;
    }
    Ok(())
}

/// The picture with its faces drawn on it; `None` for planes of the wrong size.
fn drawn(p: Picture, faces: &[FaceOut]) -> Option<Canvas> {
    let (w, h) = (p.width as usize, p.height as usize);
    if p.luma.len() != w * h {
        return None;
    }
    let mut canvas = Canvas::new(w, h, p.luma, p.chroma);
    canvas.faces(faces);
    Some(canvas)
}

/// The folder writer: one PNG per still, `NNNNNN-NAME.png` (the still's number and file stem),
/// each a new file, counted into `written`.
fn write_pngs(dir: &Path, classes: &[String], rx: Receiver<Job>, written: &mut u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for job in rx.iter() {
        let seq = job.picture.seq;
        let stem = job
            .picture
            .file
            .as_deref()
            .and_then(|f| Path::new(f).file_stem())
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "frame".into());
        // A name that is safe on any file system: letters, digits, '-', '_' and '.'.
        let stem: String = stem
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(100)
            .collect();
        let Some(mut canvas) = drawn(job.picture, &job.faces) else {
            continue;
        };
        canvas.legend(classes);
        let path = dir.join(format!("{seq:06}-{stem}.png"));
        let img =
            image::RgbImage::from_raw(canvas.width as u32, canvas.height as u32, canvas.to_rgb())
                .ok_or_else(|| Error::file(&path, "picture of the wrong size"))?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = BufWriter::new(file);
        img.write_to(&mut w, image::ImageFormat::Png)
            .map_err(|e| Error::file(&path, e.to_string()))?;
        w.flush().map_err(|e| Error::io(&path, e))?;
        *written += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_tags() {
        assert_eq!(rate_tag(25.0), "F25:1");
        assert_eq!(rate_tag(29.97), "F29970:1000");
        assert_eq!(rate_tag(f64::NAN), "F1:1");
        assert_eq!(rate_tag(0.0), "F1:1");
    }

    #[test]
    fn paths_that_would_lose_data_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.y4m");
        std::fs::write(&file, b"keep").unwrap();
        assert!(check_path(&file)
            .unwrap_err()
            .to_string()
            .contains("never replaces"));
        assert!(check_path(dir.path()).is_err());
        assert!(check_path(&dir.path().join("no/such/x.y4m")).is_err());
        assert!(check_path(&dir.path().join("new.y4m")).is_ok());
        assert!(check_path(Path::new("/dev/null")).is_ok());
    }

    #[test]
    fn writes_one_frame_per_push_at_the_first_frame_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.y4m");
        let mut a =
            Annotator::start(target(&path, false).unwrap(), vec!["happy".into()], true).unwrap();
        a.set_rate(2.0);
        let cancel = AtomicBool::new(false);
        a.push(picture(8, 4, 50, 0), &[], &cancel);
        a.push(picture(4, 4, 60, 1), &[], &cancel); // another size: fitted into 8x4
        let stats = a.finish();
        assert_eq!((stats.written, stats.dropped, stats.error), (2, 0, None));
        let bytes = std::fs::read(&path).unwrap();
        let header = b"YUV4MPEG2 W8 H4 F2:1 Ip A1:1 C420jpeg\n";
        assert!(bytes.starts_with(header));
        let frame = 6 + 32 + 2 * 4 * 2;
        assert_eq!(bytes.len(), header.len() + 2 * frame);
        // A new run never replaces the file it wrote.
        assert!(target(&path, false).is_err());
    }

    fn picture(width: u32, height: u32, gray: u8, seq: u64) -> Picture {
        Picture {
            width,
            height,
            luma: vec![gray; (width * height) as usize],
            chroma: None,
            seq,
            file: Some(format!("photos/p {seq}.jpg")),
        }
    }

    #[test]
    fn a_folder_gets_one_png_per_still_at_its_own_size() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        // A folder is for stills only; it may not exist yet (named with a trailing '/').
        let slash = PathBuf::from(format!("{}/", dir.display()));
        assert!(target(&slash, false).is_err());
        let t = target(&slash, true).unwrap();
        assert_eq!(t, Target::Folder(slash.clone()));
        let mut a = Annotator::start(t, vec!["happy".into()], true).unwrap();
        let cancel = AtomicBool::new(false);
        a.push(picture(64, 40, 50, 0), &[], &cancel);
        a.push(picture(30, 90, 60, 1), &[], &cancel);
        let stats = a.finish();
        assert_eq!((stats.written, stats.error), (2, None));
        for (name, size) in [("000000-p_0.png", (64, 40)), ("000001-p_1.png", (30, 90))] {
            let img = image::open(dir.join(name)).unwrap();
            assert_eq!((img.width(), img.height()), size, "{name}");
        }
        // A second run into the same folder does not replace what the first wrote.
        let mut a = Annotator::start(target(&dir, true).unwrap(), vec![], true).unwrap();
        a.push(picture(64, 40, 70, 0), &[], &cancel);
        let stats = a.finish();
        assert_eq!(stats.written, 0);
        assert!(stats.error.unwrap().contains("000000-p_0.png"));
        assert_eq!(image::open(dir.join("000000-p_0.png")).unwrap().width(), 64);
    }
}
