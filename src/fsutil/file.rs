//! Single files written whole: a fresh temp file beside the target (`.NAME.PID-N.tmp`, created
//! exclusively, so no file that happens to share a temp-like name is touched), fsynced, then
//! renamed over the target. A crash leaves at most that uniquely named temp file, which is never
//! in any later write's way. Errors name the path the user gave, not the temp file.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::lock::{crash_point, rename_noreplace};
use crate::error::{Error, Result};

/// What a write does with the path it was given.
enum Target {
    /// A stream (`/dev/stdout`, a FIFO, `/dev/full`): written in place.
    Stream,
    /// A regular file to replace (through a link, the file it points to), with its metadata.
    Replace(PathBuf, std::fs::Metadata),
    /// A new file.
    New(PathBuf),
}

fn target(path: &Path) -> Result<Target> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Target::Replace(
            std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?,
            m,
        )),
        Ok(m) if m.is_dir() => Err(Error::file(path, "is a directory")),
        Ok(_) => Ok(Target::Stream),
        Err(_) if path.symlink_metadata().is_ok() => Err(Error::file(path, "is a link to nothing")),
        Err(_) => Ok(Target::New(path.to_path_buf())),
    }
}

/// Writes `bytes` to `path` so that a reader sees the old content or the new, never half.
/// A new name or a regular file is written through a temp file and a rename; a replaced file
/// keeps its mode and, where this process may set it, its owner and group. A stream such as
/// `/dev/stdout`, a FIFO or `/dev/full` is written in place (a rename would swap the device node
/// itself for a file); a directory or a dangling link is refused.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    match target(path)? {
        Target::Stream => write_stream(path, bytes),
        Target::Replace(real, meta) => put(path, &real, bytes, Some(&meta), false),
        Target::New(p) => put(path, &p, bytes, None, false),
    }
}

/// As [`write_file_atomically`], for an output that must be new: when `path` exists — also when
/// another process wrote it meanwhile — the write fails and the file is left as it is. A stream
/// is written in place.
pub fn create_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    match target(path)? {
        Target::Stream => write_stream(path, bytes),
        Target::Replace(..) => Err(exists(path)),
        Target::New(p) => put(path, &p, bytes, None, true),
    }
}

/// Checks, before any long work, that `path` can be written: its folder exists and takes a new
/// file (the rename's temp file), so a read-only or missing folder fails now, not after an hour
/// of work. A stream is not opened (a FIFO would wait for its reader).
pub fn check_writable(path: &Path) -> Result<()> {
    match target(path)? {
        Target::Stream => Ok(()),
        Target::Replace(real, _) | Target::New(real) => probe_dir(path, &real),
    }
}

/// Whether a new file can be made beside `real` (the rename's temp file needs it).
fn probe_dir(path: &Path, real: &Path) -> Result<()> {
    let (tmp, file) = temp_beside(path, real)?;
    drop(file);
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

fn exists(path: &Path) -> Error {
    Error::file(
        path,
        "already exists (written meanwhile by another process?); it is left as it is",
    )
}

fn write_stream(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.flush())
        .map_err(|e| Error::io(path, e))
}

/// A new temp file beside `real`, named for it; errors name `path` (what the user gave).
fn temp_beside(path: &Path, real: &Path) -> Result<(PathBuf, std::fs::File)> {
    super::new_private_file(real, "tmp", path, "cannot be written")
}

/// Temp file, copy of the replaced file's mode and owner, fsync, rename (or a rename that
/// refuses to replace, when `new_only`).
fn put(
    path: &Path,
    real: &Path,
    bytes: &[u8],
    replaced: Option<&std::fs::Metadata>,
    new_only: bool,
) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (tmp, mut file) = temp_beside(path, real)?;
    let written = (|| -> std::io::Result<()> {
        file.write_all(bytes)?;
        if let Some(m) = replaced {
            file.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
            // Another user's file keeps its owner where this process may give it (root);
            // elsewhere the rename makes it ours, as any editor's save would.
            match std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid())) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                other => other?,
            }
        }
        file.sync_all()?;
        crash_point("file:synced");
        if new_only {
            rename_noreplace(&tmp, real)
        } else {
            std::fs::rename(&tmp, real)
        }
    })();
    match written {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Err(exists(path))
            } else {
                Err(Error::file(path, format!("cannot be written: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_leave_files_with_temp_like_names_alone() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("report.json");
        // Names an earlier, simpler scheme would have used as its temp file.
        for other in ["report.tmp", "report.json.tmp", ".report.json.tmp"] {
            std::fs::write(root.path().join(other), "keep").unwrap();
        }
        write_file_atomically(&path, b"one").unwrap();
        write_file_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let mut names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".report.json.tmp",
                "report.json",
                "report.json.tmp",
                "report.tmp"
            ]
        );
        // A failed write (the target is a directory) leaves no temp file behind.
        let dir = root.path().join("sub");
        std::fs::create_dir(&dir).unwrap();
        assert!(write_file_atomically(&dir, b"x").is_err());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 5);
    }

    #[test]
    fn a_replaced_file_keeps_its_mode_and_a_new_one_is_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("secret.json");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_file_atomically(&path, b"new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        // New-only: refused when the file is there, also when it appeared meanwhile.
        let e = create_file_atomically(&path, b"x").unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let fresh = root.path().join("fresh.json");
        create_file_atomically(&fresh, b"1").unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "1");
        assert!(create_file_atomically(&fresh, b"2").is_err());
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "1");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2);
    }

    #[test]
    fn unwritable_outputs_are_found_before_the_work_and_named_as_given() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let ro = root.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let out = ro.join("e.json");
        // Root may write anywhere: then there is nothing to find.
        let writable = std::fs::File::create(ro.join("probe")).is_ok();
        let _ = std::fs::remove_file(ro.join("probe"));
        if !writable {
            let e = check_writable(&out).unwrap_err().to_string();
            assert!(e.contains("e.json") && !e.contains(".tmp"), "{e}");
            let e = write_file_atomically(&out, b"x").unwrap_err().to_string();
            assert!(e.contains("e.json") && !e.contains(".tmp"), "{e}");
        }
        assert!(check_writable(&root.path().join("missing/e.json")).is_err());
        assert!(check_writable(&root.path().join("ok.json")).is_ok());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn streams_are_written_in_place_and_links_through() {
        use std::os::unix::fs::FileTypeExt;
        let root = tempfile::tempdir().unwrap();
        // A FIFO keeps its node (a rename would have put a file in its place).
        let fifo = root.path().join("fifo");
        crate::fsutil::make_fifo(&fifo);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(&fifo).unwrap())
        };
        write_file_atomically(&fifo, b"data").unwrap();
        assert_eq!(reader.join().unwrap(), b"data");
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        // A device that fails the write: an error, the node untouched.
        let full = Path::new("/dev/full");
        if full.exists() {
            assert!(write_file_atomically(full, b"x").is_err());
            assert!(std::fs::metadata(full)
                .unwrap()
                .file_type()
                .is_char_device());
        }
        // Through a link: the target gets the content, the link stays a link.
        let target = root.path().join("target.json");
        std::fs::write(&target, "old").unwrap();
        let link = root.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_file_atomically(&link, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        // A dangling link and a directory: refused.
        let dangling = root.path().join("dangling");
        std::os::unix::fs::symlink(root.path().join("nowhere"), &dangling).unwrap();
        assert!(write_file_atomically(&dangling, b"x").is_err());
        assert!(!root.path().join("nowhere").exists());
        assert!(write_file_atomically(root.path(), b"x").is_err());
    }
}
