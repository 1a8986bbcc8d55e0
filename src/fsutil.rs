//! Crash-safe file writes: a reader sees the old content or the new, never half of either.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temp and previous-version names [`write_dir_atomically`] uses beside `dir`.
fn sidecars(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir
        .file_name()
        .ok_or_else(|| Error::file(dir, "directory needs a name"))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp"));
    let old = parent.join(format!(".{name}.old"));
    Ok((parent, tmp, old))
}

/// The file that marks a directory beside `dir` as one [`write_dir_atomically`] made: only such a
/// leftover is ever removed (a user's own `.name.tmp` is left alone and reported).
const MARKER: &str = ".fer-cam-partial";

fn is_ours(p: &Path) -> bool {
    p.join(MARKER).is_file()
}

/// Repairs what a crash between the two renames of [`write_dir_atomically`] leaves: `dir` gone
/// and its previous version at `.name.old`. The previous version is put back (the new one may be
/// incomplete), so a reader — `--resume` — finds the last complete directory instead of none.
pub fn recover_dir(dir: &Path) -> Result<()> {
    let (_, _, old) = sidecars(dir)?;
    if !dir.exists() && old.is_dir() && is_ours(&old) {
        std::fs::rename(&old, dir).map_err(|e| Error::io(dir, e))?;
        let marker = dir.join(MARKER);
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    }
    Ok(())
}

/// Builds a directory with `fill(tmp_dir)` next to `dir`, fsyncs its files, then swaps it in for
/// `dir` by renames. A crash leaves either the old directory (possibly beside a stale temp one,
/// which the next write removes) or, between the two renames, the old one at `.name.old`, which
/// [`recover_dir`] puts back. Both sidecars carry a marker file while they exist, and a sidecar
/// without it (not made here) is never removed: the write fails instead, naming it. Files get
/// the mode a new file gets under the process umask (some writers create 0600 files, unreadable
/// to the group).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (parent, tmp, old) = sidecars(dir)?;
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    recover_dir(dir)?;
    for stale in [&tmp, &old] {
        if stale.symlink_metadata().is_ok() {
            if !stale.is_dir() || !is_ours(stale) {
                return Err(Error::file(
                    stale,
                    "is in the way and was not made by fer-cam; move it elsewhere",
                ));
            }
            std::fs::remove_dir_all(stale).map_err(|e| Error::io(stale, e))?;
        }
    }
    check_replaceable(dir, None)?;
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mark = |d: &Path| {
        let m = d.join(MARKER);
        std::fs::write(&m, b"").map_err(|e| Error::io(&m, e))
    };
    mark(&tmp)?;
    fill(&tmp)?;
    let written: Vec<std::ffi::OsString> = std::fs::read_dir(&tmp)
        .map_err(|e| Error::io(&tmp, e))?
        .map(|e| e.map(|e| e.file_name()).map_err(|e| Error::io(&tmp, e)))
        .collect::<Result<_>>()?;
    if let Err(e) = check_replaceable(dir, Some(&written)) {
        // The temp directory is ours (marked): nothing of the user's is touched.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let probe = tmp.join(".mode-probe");
    let mode = std::fs::File::create(&probe)
        .and_then(|f| f.metadata())
        .map_err(|e| Error::io(&probe, e))?
        .permissions()
        .mode();
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))?;
    let tmp_marker = tmp.join(MARKER);
    std::fs::remove_file(&tmp_marker).map_err(|e| Error::io(&tmp_marker, e))?;
    for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
        let p = entry.map_err(|e| Error::io(&tmp, e))?.path();
        if p.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(&p, e))?;
            let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
            f.sync_all().map_err(|e| Error::io(&p, e))?;
        }
    }
    if dir.exists() {
        // The previous version moves aside marked, so that only recover_dir or the next write
        // (not a user's own `.name.old`) ever takes it back or removes it.
        mark(dir)?;
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Refuses to replace `dir` unless it is absent or a real directory (not a link or a file) that
/// holds nothing but files named in `written` (what the new version contains): replacing a
/// user's own directory — `init --out ~/work --force` — would delete whatever else is in it.
fn check_replaceable(dir: &Path, written: Option<&[std::ffi::OsString]>) -> Result<()> {
    let Ok(meta) = dir.symlink_metadata() else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(Error::file(
            dir,
            "exists and is not a directory fer-cam wrote; it is left alone",
        ));
    }
    let Some(written) = written else {
        return Ok(());
    };
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !is_file || !written.contains(&name) {
            return Err(Error::file(
                dir,
                format!(
                    "holds {}, which fer-cam did not write; the directory is left alone \
                     (move that out, or choose another path)",
                    name.to_string_lossy()
                ),
            ));
        }
    }
    Ok(())
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

/// Writes a file via a new temp file beside it + rename, so a reader never sees half a file.
/// The temp file's name is fresh (`.NAME.PID-N.tmp`, created exclusively), so no file that
/// happens to share a "temp" name is ever replaced; it is removed again if the write fails.
///
/// What `path` names decides how: a new name or a regular file is replaced as above (through a
/// symbolic link, the file it points to); a stream such as `/dev/stdout`, a FIFO or `/dev/full`
/// is written in place (a rename would swap the device node itself for a file); a directory or
/// a dangling link is refused.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let path = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?,
        Ok(m) if m.is_dir() => return Err(Error::file(path, "is a directory")),
        Ok(_) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            return f
                .write_all(bytes)
                .and_then(|_| f.flush())
                .map_err(|e| Error::io(path, e));
        }
        Err(_) if path.symlink_metadata().is_ok() => {
            return Err(Error::file(path, "is a link to nothing"));
        }
        Err(_) => path.to_path_buf(),
    };
    let path = path.as_path();
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file name"))?
        .to_string_lossy();
    let dir = path.parent().unwrap_or(Path::new(""));
    let (tmp, mut file) = loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|_| file.flush())
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
        for other in ["report.tmp", "report.json.tmp", ".report.json.tmp"] {
            assert_eq!(
                std::fs::read_to_string(root.path().join(other)).unwrap(),
                "keep"
            );
        }
        // A failed write (the target is a directory) leaves no temp file behind.
        let dir = root.path().join("sub");
        std::fs::create_dir(&dir).unwrap();
        assert!(write_file_atomically(&dir, b"x").is_err());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 5);
    }

    #[test]
    fn a_crash_between_the_renames_is_repaired_and_modes_follow_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        let write = |v: &str| {
            write_dir_atomically(&dir, |t| {
                std::fs::write(t.join("state"), v).map_err(|e| Error::io(t, e))?;
                // A writer that makes owner-only files.
                std::fs::set_permissions(t.join("state"), std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| Error::io(t, e))
            })
        };
        write("1").unwrap();
        let mode = std::fs::metadata(dir.join("state"))
            .unwrap()
            .permissions()
            .mode();
        let probe = root.path().join("probe");
        std::fs::File::create(&probe).unwrap();
        let want = std::fs::metadata(&probe).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, want & 0o777);
        // Simulate the crash: the old version moved aside (marked, as the write marks it), the
        // new one half-built (marked, as made here).
        std::fs::write(dir.join(MARKER), "").unwrap();
        std::fs::rename(&dir, root.path().join(".checkpoint.old")).unwrap();
        std::fs::create_dir_all(root.path().join(".checkpoint.tmp")).unwrap();
        std::fs::write(root.path().join(".checkpoint.tmp").join(MARKER), "").unwrap();
        recover_dir(&dir).unwrap();
        assert!(!dir.join(MARKER).exists());
        assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), "1");
        write("2").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), "2");
        assert!(!root.path().join(".checkpoint.old").exists());
        assert!(!root.path().join(".checkpoint.tmp").exists());
        assert!(!dir.join(MARKER).exists());
        // A user's own directory (or file) with a sidecar's name is neither removed nor used.
        for name in [".checkpoint.tmp", ".checkpoint.old"] {
            let theirs = root.path().join(name);
            std::fs::create_dir_all(&theirs).unwrap();
            std::fs::write(theirs.join("notes.txt"), "mine").unwrap();
            let e = write("3").unwrap_err().to_string();
            assert!(e.contains("not made by fer-cam"), "{e}");
            assert_eq!(
                std::fs::read_to_string(theirs.join("notes.txt")).unwrap(),
                "mine"
            );
            assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), "2");
            std::fs::remove_dir_all(&theirs).unwrap();
        }
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

    #[test]
    fn a_directory_holding_anything_else_is_never_replaced() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        let write = || {
            write_dir_atomically(&dir, |t| {
                std::fs::write(t.join("config.json"), "{}").map_err(|e| Error::io(t, e))
            })
        };
        write().unwrap();
        // Only what the write itself produces: replaced.
        write().unwrap();
        // A user's file inside: refused, and the file and the old version stay.
        std::fs::write(dir.join("notes.txt"), "keep").unwrap();
        let err = write().unwrap_err().to_string();
        assert!(err.contains("notes.txt"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
            "keep"
        );
        assert!(dir.join("config.json").is_file());
        std::fs::remove_file(dir.join("notes.txt")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        assert!(write().is_err());
        assert!(dir.join("sub").is_dir());
        // No sidecar is left behind by the refusals.
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        // A file or a link in the directory's place: refused and left as it was.
        let file = root.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(write_dir_atomically(&file, |_| Ok(())).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(write_dir_atomically(&link, |_| Ok(())).is_err());
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    }

    #[test]
    fn streams_are_written_in_place_and_links_through() {
        use std::os::unix::fs::FileTypeExt;
        let root = tempfile::tempdir().unwrap();
        // A FIFO keeps its node (a rename would have put a file in its place).
        let fifo = root.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
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
