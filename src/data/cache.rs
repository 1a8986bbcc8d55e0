//! A compact binary copy of a parsed dataset so later loads skip CSV parsing / image decoding.
//!
//! Layout (little-endian): magic `FERCACHE`, u32 version, u64 source fingerprint, u32 image count,
//! class names, split names (u32 count, then u32 length + UTF-8 each), labels, split ids, pixels,
//! and a trailing u64 FNV-1a checksum of everything before it. A file whose fingerprint does not
//! match the source is stale and rebuilt; one that fails its checks is reported and rebuilt.

use std::path::{Path, PathBuf};

use super::{Dataset, FACE_PIXELS};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"FERCACHE";
/// Bumped whenever the layout or the parsing rules change.
pub const CACHE_VERSION: u32 = 1;

/// 64-bit FNV-1a: a stable hash for cache keys and checksums (std's hasher is not stable).
pub struct Fnv(u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
    /// Hashes a file's identity and change times: size, mtime, and the inode's change time
    /// (ctime), which a program cannot set back, so a file edited in place and given its old
    /// size and mtime still reads as changed.
    pub fn write_meta(&mut self, meta: &std::fs::Metadata) {
        use std::os::unix::fs::MetadataExt;
        self.write(&meta.len().to_le_bytes());
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        self.write(&mtime.to_le_bytes());
        self.write(&meta.ctime().to_le_bytes());
        self.write(&meta.ctime_nsec().to_le_bytes());
        self.write(&meta.ino().to_le_bytes());
    }
}

/// `$FER_CAM_CACHE`, else `$XDG_CACHE_HOME/fer-cam`, else `$HOME/.cache/fer-cam`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k);
    cache_dir_from(var("FER_CAM_CACHE"), var("XDG_CACHE_HOME"), var("HOME"))
}

/// The cache directory from those three variables. An empty one counts as unset: it would
/// otherwise put the cache in the current directory.
fn cache_dir_from(
    fer_cam_cache: Option<std::ffi::OsString>,
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    let set = |v: Option<std::ffi::OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(fer_cam_cache)
        .or_else(|| set(xdg_cache_home).map(|d| d.join("fer-cam")))
        .or_else(|| set(home).map(|h| h.join(".cache").join("fer-cam")))
}

/// Cache file for a source path (keyed by its absolute path).
pub fn cache_path(dir: &Path, source: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
    let mut h = Fnv::new();
    h.write(abs.to_string_lossy().as_bytes());
    let stem = abs
        .file_name()
        .map(|s| {
            s.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        })
        .unwrap_or_default();
    dir.join(format!("{stem}-{:016x}.fercache", h.finish()))
}

/// Fingerprint of a single source file: size and modification time.
pub fn file_fingerprint(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mut h = Fnv::new();
    h.write(&CACHE_VERSION.to_le_bytes());
    h.write_meta(&meta);
    Ok(h.finish())
}

fn put_names(buf: &mut Vec<u8>, names: &[String]) {
    buf.extend_from_slice(&(names.len() as u32).to_le_bytes());
    for n in names {
        buf.extend_from_slice(&(n.len() as u32).to_le_bytes());
        buf.extend_from_slice(n.as_bytes());
    }
}

/// Writes the cache atomically ([`crate::fsutil::write_file_atomically`]).
pub fn write(path: &Path, fingerprint: u64, ds: &Dataset) -> Result<()> {
    let mut buf = Vec::with_capacity(ds.pixels.len() + 2 * ds.len() + 1024);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&CACHE_VERSION.to_le_bytes());
    buf.extend_from_slice(&fingerprint.to_le_bytes());
    buf.extend_from_slice(&(ds.len() as u32).to_le_bytes());
    put_names(&mut buf, &ds.class_names);
    put_names(&mut buf, &ds.split_names);
    buf.extend_from_slice(&ds.labels);
    buf.extend_from_slice(&ds.splits);
    buf.extend_from_slice(&ds.pixels);
    let mut h = Fnv::new();
    h.write(&buf);
    buf.extend_from_slice(&h.finish().to_le_bytes());
    let dir = crate::fsutil::parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Temp file + fsync + rename; a failed write (a full disk) removes its temp file.
    crate::fsutil::write_file_atomically(path, &buf)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or("truncated")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn names(&mut self) -> std::result::Result<Vec<String>, String> {
        let n = self.u32()? as usize;
        if n > 4096 {
            return Err("implausible name count".into());
        }
        (0..n)
            .map(|_| {
                let len = self.u32()? as usize;
                let b = self.take(len)?;
                String::from_utf8(b.to_vec()).map_err(|_| "name is not UTF-8".to_string())
            })
            .collect()
    }
}

/// Reads a cache file. `Ok(None)`: absent or stale (a different source fingerprint or version).
/// `Err`: present but corrupt.
pub fn read(path: &Path, fingerprint: u64) -> Result<Option<Dataset>> {
    if path.symlink_metadata().is_err() {
        return Ok(None);
    }
    // A regular file only: a FIFO in its place would block the load for ever, a device never
    // end. (Its size bounds the read: FER2013's cache is about 85 MB.)
    let buf = crate::fsutil::read_regular(path, 8 << 30)?;
    let bad = |msg: String| Error::file(path, format!("corrupt cache ({msg})"));
    if buf.len() < 24 || &buf[..8] != MAGIC {
        return Err(bad("bad magic".into()));
    }
    let mut r = Reader { buf: &buf, pos: 8 };
    if r.u32().map_err(bad)? != CACHE_VERSION || r.u64().map_err(bad)? != fingerprint {
        return Ok(None);
    }
    let (body, sum) = buf.split_at(buf.len() - 8);
    let mut h = Fnv::new();
    h.write(body);
    if h.finish().to_le_bytes() != sum {
        return Err(bad("checksum mismatch".into()));
    }
    let mut parse = || -> std::result::Result<Dataset, String> {
        let n = r.u32()? as usize;
        let class_names = r.names()?;
        let split_names = r.names()?;
        let labels = r.take(n)?.to_vec();
        let splits = r.take(n)?.to_vec();
        let pixels = r
            .take(n.checked_mul(FACE_PIXELS).ok_or("overflow")?)?
            .to_vec();
        let ds = Dataset {
            class_names,
            split_names,
            pixels,
            labels,
            splits,
            ..Default::default()
        };
        ds.check()?;
        Ok(ds)
    };
    parse().map(Some).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_or_device_in_the_caches_place_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("cache.bin");
        crate::fsutil::make_fifo(&fifo);
        let e = read(&fifo, 1).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(read(std::path::Path::new("/dev/zero"), 1).is_err());
        assert!(read(&dir.path().join("absent.bin"), 1).unwrap().is_none());
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let v = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            cache_dir_from(v(""), v(""), v("/h")),
            Some(PathBuf::from("/h/.cache/fer-cam"))
        );
        assert_eq!(
            cache_dir_from(v("/c"), v("/x"), v("/h")),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            cache_dir_from(None, v("/x"), None),
            Some(PathBuf::from("/x/fer-cam"))
        );
        assert_eq!(cache_dir_from(v(""), None, v("")), None);
    }
}
