//! Directories written whole (models, exports, checkpoints): built in `.NAME.tmp` beside their
//! place, then swapped in by renames, with the previous version kept at `.NAME.old` for the
//! instant between the two renames.
//!
//! The steps, under the writer lock `.NAME.fer-cam-lock` ([`super::lock`]), which exists before
//! any of them and is removed after the last:
//!
//! 1. take the lock; if the last writer was killed (its lock is stale), clean up its leftovers:
//!    `.NAME.old` is put back when `NAME` is missing (the crash fell between the renames) and
//!    removed otherwise, `.NAME.tmp` is removed;
//! 2. create `.NAME.tmp` and fill it;
//! 3. give its files the mode a new file gets, fsync them and the directory;
//! 4. rename `NAME` to `.NAME.old` (when there is one), `.NAME.tmp` to `NAME`, remove `.NAME.old`,
//!    fsync the parent;
//! 5. remove the lock.
//!
//! A kill at any step leaves the lock, so the next write (or [`recover_dir`], which `--resume`
//! calls) knows the sidecars are fer-cam's and repairs them: the reader finds the last complete
//! version. A sidecar without a stale lock (a user's own `.NAME.tmp`) is never touched: the
//! write fails, naming it. A second writer while the first is alive fails at step 1.

use std::path::{Path, PathBuf};

use super::lock::{crash_point, rename_noreplace, sync_dir, WriterLock};
use crate::error::{Error, Result};

/// The marker file inside a sidecar of earlier fer-cam versions (which marked their leftovers
/// from inside); still honoured, so their leftovers are repaired too.
const MARKER: &str = ".fer-cam-partial";

/// Whether a write may replace an existing directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Replace,
    Refuse,
}

/// The parent, temp and previous-version paths beside `dir`.
fn sidecars(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    Ok((
        super::parent_dir(dir).to_path_buf(),
        super::hidden_sibling(dir, "tmp", dir)?,
        super::hidden_sibling(dir, "old", dir)?,
    ))
}

/// Builds a directory with `fill(tmp_dir)` and swaps it in for `dir` (the steps are in the module
/// docs). `dir` may exist only as a directory holding nothing but files the new version also
/// writes ([`check_replaceable`]).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_dir(dir, Existing::Replace, fill)
}

/// As [`write_dir_atomically`], for an output that must be new: when `dir` exists — also when
/// another process made it while this one was writing — the write fails and nothing of `dir`
/// changes.
pub fn create_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_dir(dir, Existing::Refuse, fill)
}

/// Repairs what a killed write left beside `dir` (see the module docs), so that a reader —
/// `--resume` — finds the last complete directory.
pub fn recover_dir(dir: &Path) -> Result<()> {
    let (parent, tmp, old) = sidecars(dir)?;
    if !parent.is_dir() {
        // Nothing was ever written there.
        return Ok(());
    }
    let (lock, stale) = WriterLock::take(dir)?;
    let cleaned = clean_leftovers(dir, &tmp, &old, stale);
    lock.release()?;
    cleaned
}

fn write_dir(dir: &Path, existing: Existing, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (parent, tmp, old) = sidecars(dir)?;
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let (lock, stale) = WriterLock::take(dir)?;
    crash_point("dir:locked");
    if let Err(e) = clean_leftovers(dir, &tmp, &old, stale) {
        // Something not fer-cam's is in the way: left as it is.
        let _ = lock.release();
        return Err(e);
    }
    let result = swap_in(dir, existing, fill, &parent, &tmp, &old);
    if result.is_err() {
        // Under the lock, with the leftovers gone, the sidecars are this write's own: put things
        // back as they were.
        let _ = put_back(dir, &tmp, &old);
        let _ = lock.release();
        return result;
    }
    lock.release()
}

/// Steps 2-4 of the module docs.
fn swap_in(
    dir: &Path,
    existing: Existing,
    fill: impl FnOnce(&Path) -> Result<()>,
    parent: &Path,
    tmp: &Path,
    old: &Path,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let exists_error = || {
        Error::file(
            dir,
            "already exists (this output is always new; choose another path)",
        )
    };
    if existing == Existing::Refuse && dir.symlink_metadata().is_ok() {
        return Err(exists_error());
    }
    check_replaceable(dir, None)?;
    std::fs::create_dir(tmp).map_err(|e| Error::io(tmp, e))?;
    crash_point("dir:tmp-made");
    fill(tmp)?;
    crash_point("dir:filled");
    let written: Vec<std::ffi::OsString> = std::fs::read_dir(tmp)
        .map_err(|e| Error::io(tmp, e))?
        .map(|e| e.map(|e| e.file_name()).map_err(|e| Error::io(tmp, e)))
        .collect::<Result<_>>()?;
    check_replaceable(dir, Some(&written))?;
    // Files get the mode a new file gets under the umask (some writers make 0600 files).
    let probe = tmp.join(".mode-probe");
    let mode = std::fs::File::create(&probe)
        .and_then(|f| f.metadata())
        .map_err(|e| Error::io(&probe, e))?
        .permissions()
        .mode();
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))?;
    for entry in std::fs::read_dir(tmp).map_err(|e| Error::io(tmp, e))? {
        let p = entry.map_err(|e| Error::io(tmp, e))?.path();
        if p.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(&p, e))?;
            let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
            f.sync_all().map_err(|e| Error::io(&p, e))?;
        }
    }
    sync_dir(tmp).map_err(|e| Error::io(tmp, e))?;
    crash_point("dir:synced");
    if existing == Existing::Replace && dir.symlink_metadata().is_ok() {
        std::fs::rename(dir, old).map_err(|e| Error::io(dir, e))?;
        crash_point("dir:old-moved");
        std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
        crash_point("dir:new-in");
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    } else {
        rename_noreplace(tmp, dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                exists_error()
            } else {
                Error::io(dir, e)
            }
        })?;
        crash_point("dir:new-in");
    }
    sync_dir(parent).map_err(|e| Error::io(parent, e))?;
    crash_point("dir:done");
    Ok(())
}

/// Step 1's repair. A sidecar is fer-cam's when the last writer's lock was stale (it was killed
/// with the sidecars in place) or it carries an earlier version's marker; anything else in the
/// way is refused, naming it.
fn clean_leftovers(dir: &Path, tmp: &Path, old: &Path, stale: bool) -> Result<()> {
    for p in [tmp, old] {
        let Ok(meta) = p.symlink_metadata() else {
            continue;
        };
        if !(meta.is_dir() && (stale || p.join(MARKER).is_file())) {
            return Err(Error::file(
                p,
                "is in the way and was not made by fer-cam; move it elsewhere",
            ));
        }
    }
    put_back(dir, tmp, old)?;
    // An earlier version marked the directory itself before moving it aside.
    let marker = dir.join(MARKER);
    if marker.is_file() {
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    }
    Ok(())
}

/// Undoes an unfinished write whose sidecars are fer-cam's: `.NAME.old` goes back to `NAME`
/// when that is missing (the write stopped between the renames: the previous version is the last
/// complete one) and is removed otherwise; `.NAME.tmp` is removed.
fn put_back(dir: &Path, tmp: &Path, old: &Path) -> Result<()> {
    if old.is_dir() {
        if dir.symlink_metadata().is_err() {
            std::fs::rename(old, dir).map_err(|e| Error::io(dir, e))?;
        } else {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
    }
    if tmp.is_dir() {
        std::fs::remove_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
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
                    crate::log::escape(&name.to_string_lossy())
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::lock::lock_path;
    use super::*;

    fn put(t: &Path, name: &str, v: &str) -> Result<()> {
        std::fs::write(t.join(name), v).map_err(|e| Error::io(t, e))
    }

    #[test]
    fn leftovers_of_a_killed_write_are_repaired_and_modes_follow_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        let write = |v: &str| {
            write_dir_atomically(&dir, |t| {
                put(t, "state", v)?;
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
        // A writer killed between the renames: its lock (of a process that is gone), the old
        // version aside, the new one half built.
        std::fs::write(lock_path(&dir).unwrap(), "fer-cam writer lock\n4194305 1\n").unwrap();
        std::fs::rename(&dir, root.path().join(".checkpoint.old")).unwrap();
        std::fs::create_dir_all(root.path().join(".checkpoint.tmp")).unwrap();
        recover_dir(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), "1");
        write("2").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("state")).unwrap(), "2");
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n == "checkpoint" || n == "probe"),
            "{names:?}"
        );
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
        // The refusals took and gave back the lock.
        assert!(!lock_path(&dir).unwrap().exists());
    }

    #[test]
    fn a_new_only_output_is_never_replaced() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("export");
        create_dir_atomically(&dir, |t| put(t, "a", "1")).unwrap();
        let e = create_dir_atomically(&dir, |t| put(t, "a", "2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
        // Made by someone else while the write was filling its temp directory.
        let e = create_dir_atomically(&root.path().join("late"), |t| {
            std::fs::create_dir(root.path().join("late")).unwrap();
            put(t, "a", "3")
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert_eq!(
            std::fs::read_dir(root.path().join("late")).unwrap().count(),
            0
        );
        // Nothing of the failed writes is left beside them.
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_directory_holding_anything_else_is_never_replaced() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        let write = || write_dir_atomically(&dir, |t| put(t, "config.json", "{}"));
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
        // No sidecar or lock is left behind by the refusals.
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
}
