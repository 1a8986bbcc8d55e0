//! The Kaggle `fer2013.csv` layout: header `emotion,pixels,Usage` (any column order), one image per
//! row, 2304 space-separated gray levels. Gzip input is detected by its magic bytes.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use super::{Dataset, FACE_PIXELS};
use crate::config::FER2013_CLASSES;
use crate::error::{Error, Result};

/// The official FER2013 splits, in the order their indices are stored.
pub const FER2013_SPLITS: [&str; 3] = ["Training", "PublicTest", "PrivateTest"];

/// Opens `path`, transparently decompressing gzip.
/// A FIFO (whose open blocks until a writer comes) or a device such as /dev/zero (which never
/// ends) is refused: the data must be a regular file, which the cache can also fingerprint.
fn open(path: &Path) -> Result<Box<dyn Read>> {
    crate::fsutil::regular_file(path)?;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::with_capacity(1 << 20, MultiGzDecoder::new(f)))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, f))
    })
}

/// The longest line read (a FER2013 row is about 9 KB): a file without newlines — a gzip bomb
/// of one endless line — fails here instead of filling memory.
const MAX_LINE: u64 = 1 << 20;

/// A reader that fails once a line runs past [`MAX_LINE`] bytes without a newline, whatever the
/// CSV parser above it makes of the bytes (an endless quoted field included).
struct LineCap<R> {
    inner: R,
    since_newline: u64,
}

impl<R: Read> Read for LineCap<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut parts = buf[..n].split(|&b| b == b'\n');
        let first = parts.next().map_or(0, <[u8]>::len) as u64;
        let mut longest = self.since_newline + first;
        let mut last = longest;
        for part in parts {
            last = part.len() as u64;
            longest = longest.max(last);
        }
        self.since_newline = last;
        if longest > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line longer than {MAX_LINE} bytes"),
            ));
        }
        Ok(n)
    }
}

/// Parses a whole FER2013 CSV (with the `csv` crate: quoted fields and CRLF line ends, as
/// spreadsheet programs re-save it, read like the original). Every problem is an
/// [`Error::Data`] with the file and 1-based line.
pub fn read(path: &Path) -> Result<Dataset> {
    let reader = LineCap {
        inner: open(path)?,
        since_newline: 0,
    };
    let err = |line: u64, msg: String| Error::Data {
        path: path.to_path_buf(),
        line: line as usize,
        msg,
    };
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(reader);
    let io_error = |e: &csv::Error, line: u64| match e.kind() {
        csv::ErrorKind::Io(io) => err(
            line,
            format!("read error (truncated or corrupt file?): {io}"),
        ),
        _ => err(line, e.to_string()),
    };
    let mut record = csv::ByteRecord::new();
    let got = csv
        .read_byte_record(&mut record)
        .map_err(|e| io_error(&e, 1))?;
    if !got {
        return Err(err(
            1,
            "empty file (expected header emotion,pixels,Usage)".into(),
        ));
    }
    // Spreadsheet programs often save CSV with a UTF-8 byte-order mark.
    let header: Vec<String> = record
        .iter()
        .map(|f| {
            String::from_utf8_lossy(f)
                .trim_start_matches('\u{feff}')
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    let col = |name: &str| -> Result<usize> {
        header.iter().position(|h| h == name).ok_or_else(|| {
            err(
                1,
                format!("header has no {name:?} column (expected emotion,pixels,Usage)"),
            )
        })
    };
    let (c_emotion, c_pixels, c_usage) = (col("emotion")?, col("pixels")?, col("usage")?);
    let n_cols = header.len();
    let mut ds = Dataset {
        class_names: FER2013_CLASSES.iter().map(|s| s.to_string()).collect(),
        split_names: FER2013_SPLITS.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    ds.pixels.reserve(36_000 * FACE_PIXELS);
    let mut lineno = 1;
    loop {
        // The line the next record starts on (the reader has consumed the one before it).
        lineno = csv.position().line().max(lineno + 1);
        let got = csv
            .read_byte_record(&mut record)
            .map_err(|e| io_error(&e, lineno))?;
        if !got {
            break;
        }
        let text = |i: usize| String::from_utf8_lossy(&record[i]).trim().to_string();
        if record.len() == 1 && text(0).is_empty() {
            continue;
        }
        if record.len() != n_cols {
            return Err(err(
                lineno,
                format!("expected {n_cols} fields, found {}", record.len()),
            ));
        }
        let emotion = text(c_emotion);
        let label: u8 = match emotion.parse::<u8>() {
            Ok(l) if (l as usize) < FER2013_CLASSES.len() => l,
            _ => {
                return Err(err(
                    lineno,
                    format!(
                        "unknown class {emotion:?} (expected 0..={})",
                        FER2013_CLASSES.len() - 1
                    ),
                ))
            }
        };
        let usage = text(c_usage);
        let split = FER2013_SPLITS
            .iter()
            .position(|s| *s == usage)
            .ok_or_else(|| {
                err(
                    lineno,
                    format!(
                        "unknown Usage {usage:?} (expected Training, PublicTest or PrivateTest)"
                    ),
                )
            })?;
        let before = ds.pixels.len();
        let tokens = || {
            record[c_pixels]
                .split(u8::is_ascii_whitespace)
                .filter(|t| !t.is_empty())
        };
        let mut count = 0usize;
        for tok in tokens() {
            count += 1;
            if count > FACE_PIXELS {
                break;
            }
            match std::str::from_utf8(tok)
                .ok()
                .and_then(|t| t.parse::<u8>().ok())
            {
                Some(v) => ds.pixels.push(v),
                None => {
                    ds.pixels.truncate(before);
                    return Err(err(
                        lineno,
                        format!(
                            "pixel {count} is {:?}, not an integer in 0..=255",
                            String::from_utf8_lossy(tok)
                        ),
                    ));
                }
            }
        }
        if count != FACE_PIXELS {
            ds.pixels.truncate(before);
            return Err(err(
                lineno,
                format!(
                    "expected {FACE_PIXELS} pixels (48x48), found {}",
                    tokens().count()
                ),
            ));
        }
        ds.labels.push(label);
        ds.splits.push(split as u8);
    }
    if ds.is_empty() {
        return Err(err(lineno, "no data rows".into()));
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: u8, usage: &str, seed: u32) -> (String, Vec<u8>) {
        let px: Vec<u8> = (0..FACE_PIXELS as u32)
            .map(|i| ((i * 7 + seed * 13) % 256) as u8)
            .collect();
        let text = px.iter().map(u8::to_string).collect::<Vec<_>>().join(" ");
        (format!("{label},{text},{usage}"), px)
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A spreadsheet's re-save (every field quoted, CRLF line ends, a byte-order mark) reads
    /// exactly like the original.
    #[test]
    fn a_quoted_crlf_resave_reads_like_the_original() {
        let tmp = tempfile::tempdir().unwrap();
        let rows = [
            row(3, "Training", 1),
            row(0, "PublicTest", 2),
            row(6, "PrivateTest", 3),
        ];
        let plain = std::iter::once("emotion,pixels,Usage".to_string())
            .chain(rows.iter().map(|(r, _)| r.clone()))
            .collect::<Vec<_>>()
            .join("\n");
        let quoted = std::iter::once("\u{feff}\"emotion\",\"pixels\",\"Usage\"".to_string())
            .chain(rows.iter().map(|(r, _)| {
                r.split(',')
                    .map(|f| format!("\"{f}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            }))
            .collect::<Vec<_>>()
            .join("\r\n")
            + "\r\n";
        let a = read(&write(tmp.path(), "plain.csv", &plain)).unwrap();
        let b = read(&write(tmp.path(), "quoted.csv", &quoted)).unwrap();
        assert_eq!(a.labels, vec![3, 0, 6]);
        assert_eq!(a.splits, vec![0, 1, 2]);
        assert_eq!(
            a.pixels,
            rows.iter().flat_map(|(_, p)| p.clone()).collect::<Vec<_>>()
        );
        assert_eq!(
            (a.labels, a.splits, a.pixels),
            (b.labels, b.splits, b.pixels)
        );
    }

    /// Problems name their line: a short row, a bad pixel, a wrong field count (line 3 each,
    /// after a good row), and a line past the cap.
    #[test]
    fn errors_name_the_line() {
        let tmp = tempfile::tempdir().unwrap();
        let good = row(1, "Training", 5).0;
        let cases = [
            ("2,1 2 3,Training", "expected 2304 pixels (48x48), found 3"),
            ("2,1 2 x,Training", "pixel 3 is \"x\""),
            ("2,1 2 3", "expected 3 fields, found 2"),
            ("9,1 2 3,Training", "unknown class \"9\""),
        ];
        for (i, (bad, want)) in cases.iter().enumerate() {
            let text = format!("emotion,pixels,Usage\n{good}\n{bad}\n");
            let e = read(&write(tmp.path(), &format!("{i}.csv"), &text))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains(":3"), "{e}");
        }
        let long = format!(
            "emotion,pixels,Usage\n{}\n",
            "1".repeat(MAX_LINE as usize + 10)
        );
        let e = read(&write(tmp.path(), "long.csv", &long))
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than"), "{e}");
    }
}
