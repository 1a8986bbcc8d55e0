//! Safe file input and output: reads that refuse what would block or never end, and writes that
//! a crash or a second writer cannot leave half done or silently overwrite.
//!
//! - [`write_file_atomically`] / [`create_file_atomically`]: a file via a fresh temp file and a
//!   rename; a replaced file keeps its mode and owner.
//! - [`write_dir_atomically`] / [`create_dir_atomically`]: a directory built beside its place and
//!   swapped in by renames, under a writer lock ([`lock`]) taken before any byte is written, so
//!   a write killed at any step is recognised and repaired by the next one, and two writers of
//!   one output never both succeed.

mod dir;
mod file;
mod lock;

use std::path::Path;

use crate::error::{Error, Result};

pub use dir::{create_dir_atomically, recover_dir, write_dir_atomically};
pub use file::{check_writable, create_file_atomically, write_file_atomically};

/// The folder `path` is in: its parent, or `.` for a bare name (whose parent is empty).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.NAME.SUFFIX` beside `path` (a temp file, a lock, a sidecar directory); errors name `shown`.
fn hidden_sibling(path: &Path, suffix: &str, shown: &Path) -> Result<std::path::PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(shown, "needs a file or directory name"))?
        .to_string_lossy();
    Ok(parent_dir(path).join(format!(".{name}.{suffix}")))
}

/// A number no other call in this process gets (for private file names).
fn next_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `.NAME.PID-N.SUFFIX` beside `path`: a name only this call uses; errors name `shown`.
fn private_sibling(path: &Path, suffix: &str, shown: &Path) -> Result<std::path::PathBuf> {
    let unique = format!("{}-{}.{suffix}", std::process::id(), next_number());
    hidden_sibling(path, &unique, shown)
}

/// A new file at a [`private_sibling`] of `path`, created exclusively, so no file that happens
/// to share its name is touched (a name taken already, left by a killed process whose pid this
/// one reuses, is stepped over). Errors name `shown`, after `what`.
fn new_private_file(
    path: &Path,
    suffix: &str,
    shown: &Path,
    what: &str,
) -> Result<(std::path::PathBuf, std::fs::File)> {
    loop {
        let tmp = private_sibling(path, suffix, shown)?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::file(shown, format!("{what}: {e}"))),
        }
    }
}

/// The metadata of `path`, which must be a regular file (not a FIFO, device or directory).
pub fn regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::file(path, "is not a regular file"));
    }
    Ok(meta)
}

/// Reads a whole regular file of at most `cap` bytes. Anything else — a FIFO (which would block),
/// a device such as /dev/zero (which never ends), a directory, a larger file — is refused with
/// an error naming the path, before any large allocation.
pub fn read_regular(path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let meta = regular_file(path)?;
    if meta.len() > cap {
        return Err(Error::file(
            path,
            format!("is {} bytes; at most {cap} are read", meta.len()),
        ));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(Error::file(
            path,
            format!("grew past {cap} bytes while read"),
        ));
    }
    Ok(bytes)
}

/// Makes a FIFO at `path` (for tests of what must never block on one).
#[cfg(test)]
pub(crate) fn make_fifo(path: &Path) {
    assert!(std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siblings_sit_in_the_same_folder_with_a_dot() {
        assert_eq!(parent_dir(Path::new("a.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("d/a.json")), Path::new("d"));
        assert_eq!(
            hidden_sibling(Path::new("d/m"), "tmp", Path::new("d/m")).unwrap(),
            Path::new("d/.m.tmp")
        );
        assert!(hidden_sibling(Path::new("/"), "tmp", Path::new("/")).is_err());
    }

    #[test]
    fn only_regular_files_within_the_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_regular(&f, 5).unwrap(), b"12345");
        assert!(read_regular(&f, 4)
            .unwrap_err()
            .to_string()
            .contains("at most 4"));
        assert!(read_regular(dir.path(), 9).is_err());
        let e = read_regular(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
