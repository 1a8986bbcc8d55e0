//! The Kaggle `fer2013.csv` layout: header `emotion,pixels,Usage` (any column order), one image per
//! row, 2304 space-separated gray levels. Gzip input is detected by its magic bytes.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
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
fn open(path: &Path) -> Result<Box<dyn BufRead>> {
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

fn read_line_capped(reader: &mut Box<dyn BufRead>, line: &mut String) -> std::io::Result<usize> {
    let n = reader.by_ref().take(MAX_LINE).read_line(line)?;
    if n as u64 == MAX_LINE && !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(n)
}

/// Parses a whole FER2013 CSV. Every problem is an [`Error::Data`] with the file and 1-based line.
pub fn read(path: &Path) -> Result<Dataset> {
    let mut reader = open(path)?;
    let err = |line: usize, msg: String| Error::Data {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut line = String::new();
    let mut lineno = 1;
    let n = read_line_capped(&mut reader, &mut line)
        .map_err(|e| err(lineno, format!("read error: {e}")))?;
    if n == 0 {
        return Err(err(
            1,
            "empty file (expected header emotion,pixels,Usage)".into(),
        ));
    }
    // Spreadsheet programs often save CSV with a UTF-8 byte-order mark.
    let header: Vec<String> = line
        .trim_start_matches('\u{feff}')
        .trim_end_matches(['\r', '\n'])
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
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
    loop {
        line.clear();
        lineno += 1;
        let n = read_line_capped(&mut reader, &mut line).map_err(|e| {
            err(
                lineno,
                format!("read error (truncated or corrupt file?): {e}"),
            )
        })?;
        if n == 0 {
            break;
        }
        let row = line.trim_end_matches(['\r', '\n']);
        if row.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = row.split(',').collect();
        if fields.len() != n_cols {
            return Err(err(
                lineno,
                format!("expected {n_cols} fields, found {}", fields.len()),
            ));
        }
        let emotion = fields[c_emotion].trim();
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
        let usage = fields[c_usage].trim();
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
        let mut count = 0usize;
        for tok in fields[c_pixels].split_ascii_whitespace() {
            count += 1;
            if count > FACE_PIXELS {
                break;
            }
            match tok.parse::<u8>() {
                Ok(v) => ds.pixels.push(v),
                Err(_) => {
                    ds.pixels.truncate(before);
                    return Err(err(
                        lineno,
                        format!("pixel {count} is {tok:?}, not an integer in 0..=255"),
                    ));
                }
            }
        }
        if count != FACE_PIXELS {
            let found = fields[c_pixels].split_ascii_whitespace().count();
            return Err(err(
                lineno,
                format!("expected {FACE_PIXELS} pixels (48x48), found {found}"),
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
