//! YUV4MPEG2 reader (the format `ffmpeg -f yuv4mpegpipe` writes). The luma plane is kept; chroma
//! is read and discarded unless colour is asked for (then it is reduced to 4:2:0). Header: `YUV4MPEG2 W<w> H<h> [F<n>:<d>] [C<colorspace>] ...`,
//! then per frame `FRAME[ params]\n` and the planes.

use std::io::{BufRead, BufReader, Read};
use std::time::{Instant, SystemTime};

use super::{Chroma, Frame, FrameSource, SourceEvent};
use crate::error::{Error, Result};

/// Largest frame side accepted (guards allocations against garbage headers).
const MAX_SIDE: u32 = 16384;

/// A YUV4MPEG2 stream.
pub struct Y4mSource<R: Read> {
    reader: BufReader<R>,
    name: String,
    width: u32,
    height: u32,
    chroma_bytes: usize,
    /// Size of each chroma plane as stored (4:2:0, 4:2:2 or 4:4:4).
    chroma_plane: (usize, usize),
    keep_color: bool,
    fps: Option<f64>,
    seq: u64,
    scratch: Vec<u8>,
}

fn read_line_limited<R: BufRead>(r: &mut R, limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r.take(limit as u64).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(line))
}

/// Slowest and fastest frame rates accepted (a rate outside them is a broken header, and would
/// make `--realtime` wait for years or not at all).
pub const FPS_RANGE: (f64, f64) = (0.01, 1000.0);

/// A y4m `F` value, `NUM:DEN` in whole numbers (DEN defaults to 1), within [`FPS_RANGE`].
fn frame_rate(val: &str) -> std::result::Result<f64, String> {
    let (n, d) = val.split_once(':').unwrap_or((val, "1"));
    let (Ok(n), Ok(d)) = (n.parse::<u64>(), d.parse::<u64>()) else {
        return Err(format!(
            "bad frame rate {:?} (expected F<num>:<den> in whole numbers)",
            crate::log::escape(val)
        ));
    };
    let fps = n as f64 / d as f64;
    if d == 0 || !(FPS_RANGE.0..=FPS_RANGE.1).contains(&fps) {
        return Err(format!(
            "frame rate {n}:{d} outside {}..{} fps",
            FPS_RANGE.0, FPS_RANGE.1
        ));
    }
    Ok(fps)
}

impl<R: Read> Y4mSource<R> {
    /// Reads and checks the stream header.
    pub fn new(inner: R, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let bad = |msg: String| Error::file(&name, msg);
        let mut reader = BufReader::with_capacity(1 << 20, inner);
        let line = read_line_limited(&mut reader, 4096)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?
            .ok_or_else(|| bad("empty input (expected a YUV4MPEG2 stream)".into()))?;
        if !line.ends_with(b"\n") {
            return Err(bad("not a YUV4MPEG2 stream (no header line)".into()));
        }
        let text = String::from_utf8_lossy(&line[..line.len() - 1]).to_string();
        let mut parts = text.split(' ');
        if parts.next() != Some("YUV4MPEG2") {
            return Err(bad(
                "not a YUV4MPEG2 stream (header must start with YUV4MPEG2)".into(),
            ));
        }
        let (mut width, mut height, mut fps, mut colorspace) =
            (0u32, 0u32, None, "420jpeg".to_string());
        for p in parts.filter(|p| !p.is_empty()) {
            // Split after the first character, not byte: the header may hold any bytes.
            let mut chars = p.chars();
            let tag = chars.next().unwrap_or(' ');
            let val = chars.as_str();
            match tag {
                'W' => width = val.parse().map_err(|_| bad(format!("bad width {val:?}")))?,
                'H' => {
                    height = val
                        .parse()
                        .map_err(|_| bad(format!("bad height {val:?}")))?
                }
                'F' => fps = Some(frame_rate(val).map_err(bad)?),
                'C' => colorspace = val.to_string(),
                _ => {}
            }
        }
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(bad(format!(
                "frame size {width}x{height} is missing or out of range"
            )));
        }
        let (w, h) = (width as usize, height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let deep = |c: &str| {
            c.strip_prefix("mono")
                .or_else(|| c.get(3..)?.strip_prefix('p'))
                .is_some_and(|bits| !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit()))
        };
        if deep(&colorspace) {
            return Err(bad(format!(
                "colorspace C{colorspace} has more than 8 bits per sample; only 8-bit streams are \
                 read (convert with ffmpeg ... -pix_fmt yuv420p -f yuv4mpegpipe)"
            )));
        }
        let (chroma_bytes, chroma_plane) = match colorspace.as_str() {
            "420" | "420jpeg" | "420paldv" | "420mpeg2" => (2 * cw * ch, (cw, ch)),
            "422" => (2 * cw * h, (cw, h)),
            "444" => (2 * w * h, (w, h)),
            "444alpha" => (3 * w * h, (w, h)),
            "mono" => (0, (0, 0)),
            other => {
                return Err(bad(format!(
                    "colorspace C{other} is not supported (420jpeg, 420paldv, 420mpeg2, 422, 444, \
                     444alpha, mono)"
                )))
            }
        };
        Ok(Self {
            reader,
            name,
            width,
            height,
            chroma_bytes,
            chroma_plane,
            keep_color: false,
            fps,
            seq: 0,
            scratch: Vec::new(),
        })
    }

    /// Frame size.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }
}

impl<R: Read> FrameSource for Y4mSource<R> {
    fn next_event(&mut self) -> Result<SourceEvent> {
        let n = self.seq;
        let name = self.name.clone();
        let bad = |msg: String| Error::file(&name, format!("frame {n}: {msg}"));
        let Some(line) = read_line_limited(&mut self.reader, 1024)
            .map_err(|e| bad(format!("read error: {e}")))?
        else {
            return Ok(SourceEvent::End);
        };
        // `FRAME`, then parameters after a space or nothing: `FRAMEX` is not a marker.
        let marker = line.strip_prefix(b"FRAME").unwrap_or_default();
        if !matches!(marker.first(), Some(b' ' | b'\n')) || !line.ends_with(b"\n") {
            return Err(bad(
                "expected a FRAME marker (corrupt or truncated stream)".into()
            ));
        }
        let captured = Instant::now();
        let wall = SystemTime::now();
        let luma = self.width as usize * self.height as usize;
        let mut gray = vec![0u8; luma];
        let read_exact = |r: &mut BufReader<R>, buf: &mut [u8], what: &str| -> Result<()> {
            r.read_exact(buf).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    bad(format!("truncated {what} (expected {} bytes)", buf.len()))
                } else {
                    bad(format!("read error: {e}"))
                }
            })
        };
        read_exact(&mut self.reader, &mut gray, "luma plane")?;
        self.scratch.resize(self.chroma_bytes, 0);
        let mut scratch = std::mem::take(&mut self.scratch);
        read_exact(&mut self.reader, &mut scratch, "chroma planes")?;
        let (w, h) = (self.width as usize, self.height as usize);
        let (pw, ph) = self.chroma_plane;
        let chroma = if self.keep_color && self.chroma_bytes > 0 {
            Chroma::from_planes(&scratch, w, h, pw, ph)
        } else {
            None
        };
        self.scratch = scratch;
        self.seq += 1;
        Ok(SourceEvent::Frame(Frame {
            seq: n,
            captured,
            wall,
            width: self.width,
            height: self.height,
            gray,
            label: None,
            chroma,
            pts: self.fps.map(|f| n as f64 / f),
        }))
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn fps(&self) -> Option<f64> {
        self.fps
    }

    fn keep_color(&mut self, on: bool) {
        self.keep_color = on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(w: usize, h: usize, frames: usize) -> Vec<u8> {
        let mut v = format!("YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n").into_bytes();
        for f in 0..frames {
            v.extend_from_slice(b"FRAME\n");
            v.extend((0..w * h).map(|i| (i + f) as u8));
            v.extend(std::iter::repeat_n(
                128u8,
                2 * w.div_ceil(2) * h.div_ceil(2),
            ));
        }
        v
    }

    #[test]
    fn reads_frames_and_end() {
        let data = stream(5, 3, 2);
        let mut s = Y4mSource::new(&data[..], "t.y4m").unwrap();
        assert_eq!(s.size(), (5, 3));
        assert_eq!(s.fps(), Some(25.0));
        let SourceEvent::Frame(f) = s.next_event().unwrap() else {
            panic!()
        };
        assert_eq!(f.seq, 0);
        assert_eq!(f.gray[..3], [0, 1, 2]);
        let SourceEvent::Frame(f) = s.next_event().unwrap() else {
            panic!()
        };
        assert_eq!((f.seq, f.gray[0]), (1, 1));
        assert!(matches!(s.next_event().unwrap(), SourceEvent::End));
    }

    #[test]
    fn frame_rates_outside_the_sane_range_are_header_errors() {
        assert_eq!(frame_rate("30000:1001"), Ok(30000.0 / 1001.0));
        assert_eq!(frame_rate("25"), Ok(25.0));
        for bad in [
            "1:inf",
            "1e-20:1",
            "1:1e300",
            "1:4294967295",
            "0:1",
            "5:0",
            "x",
            "-1:1",
        ] {
            assert!(frame_rate(bad).is_err(), "{bad}");
            let head = format!("YUV4MPEG2 W4 H2 F{bad} Ip C420jpeg\n");
            let e = Y4mSource::new(head.as_bytes(), "t.y4m")
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("frame rate"), "{bad}: {e}");
        }
    }

    #[test]
    fn colour_only_when_asked() {
        let data = stream(5, 3, 2);
        let mut s = Y4mSource::new(&data[..], "t.y4m").unwrap();
        let SourceEvent::Frame(f) = s.next_event().unwrap() else {
            panic!()
        };
        assert!(f.chroma.is_none());
        s.keep_color(true);
        let SourceEvent::Frame(f) = s.next_event().unwrap() else {
            panic!()
        };
        assert_eq!(f.chroma, Some(Chroma::neutral(5, 3)));
    }

    #[test]
    fn garbage_and_truncation_are_clear_errors() {
        for (bytes, want) in [
            (b"".to_vec(), "empty input"),
            (b"RIFF....WAVE\n".to_vec(), "not a YUV4MPEG2 stream"),
            (b"YUV4MPEG2 W0 H10\n".to_vec(), "frame size 0x10"),
            (b"YUV4MPEG2 W10 H10 Cfoo\n".to_vec(), "colorspace Cfoo"),
            (b"YUV4MPEG2 W10 H10 C420p10\n".to_vec(), "more than 8 bits"),
            (b"YUV4MPEG2 W10 H10 Cmono16\n".to_vec(), "more than 8 bits"),
            (b"YUV4MPEG2 W10 H10 C422p12\n".to_vec(), "more than 8 bits"),
            // Multi-byte characters where a tag is expected: an error, not a panic.
            (
                "YUV4MPEG2 W10 H10 \u{e9}x Wé\n".as_bytes().to_vec(),
                "bad width",
            ),
            (vec![0u8; 5000], "not a YUV4MPEG2 stream"),
        ] {
            let e = Y4mSource::new(&bytes[..], "x.y4m")
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(want) && e.starts_with("x.y4m"), "{e}");
        }
        let mut data = stream(8, 8, 2);
        data.truncate(data.len() - 10);
        let mut s = Y4mSource::new(&data[..], "t.y4m").unwrap();
        assert!(matches!(s.next_event().unwrap(), SourceEvent::Frame(_)));
        let e = s.next_event().unwrap_err().to_string();
        assert!(e.contains("frame 1: truncated chroma planes"), "{e}");
        let mut data = stream(8, 8, 1);
        data.extend_from_slice(b"GARBAGE\n");
        let mut s = Y4mSource::new(&data[..], "t.y4m").unwrap();
        s.next_event().unwrap();
        assert!(s
            .next_event()
            .unwrap_err()
            .to_string()
            .contains("FRAME marker"));
        // Parameters after a space are allowed; a longer word is not a marker.
        let frame = |marker: &[u8]| {
            let mut data = stream(8, 8, 1);
            let at = data.windows(6).position(|w| w == b"FRAME\n").unwrap();
            data.splice(at..at + 6, marker.iter().copied());
            let mut s = Y4mSource::new(&data[..], "t.y4m").unwrap();
            s.next_event().map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(frame(b"FRAME Ixyz\n").is_ok());
        assert!(frame(b"FRAMEX\n").unwrap_err().contains("FRAME marker"));
    }
}
