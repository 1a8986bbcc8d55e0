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

/// Repairs what a crash between the two renames of [`write_dir_atomically`] leaves: `dir` gone
/// and its previous version at `.name.old`. The previous version is put back (the new one may be
/// incomplete), so a reader — `--resume` — finds the last complete directory instead of none.
pub fn recover_dir(dir: &Path) -> Result<()> {
    let (_, _, old) = sidecars(dir)?;
    if !dir.exists() && old.is_dir() {
        std::fs::rename(&old, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Builds a directory with `fill(tmp_dir)` next to `dir`, fsyncs its files, then swaps it in for
/// `dir` by renames. A crash leaves either the old directory (possibly beside a stale temp one
/// of this function's own naming, which the next write removes) or, between the two renames,
/// the old one at `.name.old`, which [`recover_dir`] puts back. Files get the mode a new file
/// gets under the process umask (some writers create 0600 files, unreadable to the group).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (parent, tmp, old) = sidecars(dir)?;
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    recover_dir(dir)?;
    for stale in [&tmp, &old] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(|e| Error::io(stale, e))?;
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;
    let probe = tmp.join(".mode-probe");
    let mode = std::fs::File::create(&probe)
        .and_then(|f| f.metadata())
        .map_err(|e| Error::io(&probe, e))?
        .permissions()
        .mode();
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))?;
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
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
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

/// Writes a file via a temp file + rename.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Simulate the crash: the old version moved aside, the new one not yet in place.
        std::fs::rename(&dir, root.path().join(".checkpoint.old")).unwrap();
        std::fs::create_dir_all(root.path().join(".checkpoint.tmp")).unwrap();
        recover_dir(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), "1");
        write("2").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), "2");
        assert!(!root.path().join(".checkpoint.old").exists());
        assert!(!root.path().join(".checkpoint.tmp").exists());
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
