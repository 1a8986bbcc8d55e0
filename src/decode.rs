//! Decoding image files that other people made, with bounds: the format is taken from the bytes
//! (not the name), and the declared size is checked before any pixel buffer is allocated, so a
//! small file that claims to be 20000x20000 is refused at once instead of costing gigabytes.

use std::path::Path;

use image::{DynamicImage, ImageReader, Limits};

use crate::error::{Error, Result};

/// Largest side accepted (a 64-megapixel photo has sides under 10000).
pub const MAX_SIDE: u32 = 12_000;
/// Most bytes the decoder may allocate for one image.
pub const MAX_ALLOC: u64 = 512 << 20;

/// Decodes an image file within [`MAX_SIDE`] and [`MAX_ALLOC`]; errors name the file.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    crate::fsutil::regular_file(path)?;
    let mut reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| Error::file(path, format!("cannot decode image: {e}")))
}

/// How far from its end a JPEG's end-of-image marker may lie (some cameras append data).
const JPEG_TAIL: u64 = 64 << 10;

/// Whether `path` is a JPEG cut short: it starts with the start-of-image marker but has no
/// end-of-image marker (FF D9) in its last [`JPEG_TAIL`] bytes. Such a file still decodes, with
/// its missing end filled in, so the caller warns instead of passing off a damaged picture.
pub fn jpeg_is_truncated(path: &Path) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 2];
    if len < 4 || f.read_exact(&mut head).is_err() || head != [0xFF, 0xD8] {
        return Ok(false);
    }
    let start = len.saturating_sub(JPEG_TAIL).max(2);
    f.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(path, e))?;
    let mut tail = Vec::new();
    f.take(JPEG_TAIL)
        .read_to_end(&mut tail)
        .map_err(|e| Error::io(path, e))?;
    Ok(!tail.windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// Whether a directory entry is hidden (`.git`, macOS `._x.png` companions): never input.
pub fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_declared_size_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        // A valid 1x1 PNG whose header is rewritten to claim 20000x20000 (CRC fixed up).
        let small = dir.path().join("small.png");
        image::GrayImage::new(1, 1).save(&small).unwrap();
        let mut bytes = std::fs::read(&small).unwrap();
        bytes[16..20].copy_from_slice(&20000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&20000u32.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        let big = dir.path().join("big.png");
        std::fs::write(&big, &bytes).unwrap();
        let t = std::time::Instant::now();
        let e = decode_image(&big).unwrap_err().to_string();
        assert!(e.contains("big.png"), "{e}");
        assert!(t.elapsed().as_secs() < 2);
        assert!(decode_image(&small).is_ok());
        // The format comes from the bytes: a PNG named .jpg still decodes.
        let renamed = dir.path().join("x.jpg");
        std::fs::copy(&small, &renamed).unwrap();
        assert!(decode_image(&renamed).is_ok());
        assert!(decode_image(dir.path()).is_err());
    }

    #[test]
    fn bmp_and_netpbm_stills_decode() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
        for name in ["a.bmp", "a.pgm"] {
            let p = dir.path().join(name);
            img.save(&p).unwrap();
            let back = decode_image(&p).unwrap().into_luma8();
            assert_eq!(back.as_raw(), img.as_raw(), "{name}");
        }
    }

    /// CRC-32 (IEEE) as PNG chunks use it.
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
}
