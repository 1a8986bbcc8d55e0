//! One writer per output: `.NAME.fer-cam-lock` beside the output, created exclusively before
//! any byte of the write and removed after its last step. It names the writing process (pid and
//! start time), so that a lock left by a process that is gone (killed mid-write) is recognised:
//! everything beside the output then is fer-cam's own leftover, and the next writer cleans it up.
//! A lock held by a live process means a concurrent writer: the second one fails with an error
//! naming it, instead of both writing and one silently replacing the other.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Locks this process holds now (a lock of this process that is not here was left by a write
/// that failed without cleaning up, e.g. a panic: it is stale).
static HELD: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// The lock's path beside `target`.
pub(super) fn lock_path(target: &Path) -> Result<PathBuf> {
    super::hidden_sibling(target, "fer-cam-lock", target)
}

/// This process's identity: pid and start time (clock ticks since boot), so that a reused pid
/// is not taken for the writer.
fn identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    // Field 22 of stat (starttime) is the 20th after the command's closing parenthesis.
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// A held writer lock. Released explicitly ([`WriterLock::release`]) after the write has cleaned
/// up; a lock that is never released (a crash) is recognised as stale by the next writer.
pub(super) struct WriterLock {
    path: PathBuf,
}

impl WriterLock {
    /// Takes the lock for `target`. Returns it and whether a stale lock was found (a writer was
    /// killed mid-write: the leftovers beside `target` are fer-cam's own).
    pub(super) fn take(target: &Path) -> Result<(Self, bool)> {
        let path = lock_path(target)?;
        let me = identity(std::process::id()).unwrap_or_else(|| std::process::id().to_string());
        let mut stale = false;
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let named = f
                        .write_all(format!("fer-cam writer lock\n{me}\n").as_bytes())
                        .and_then(|_| f.sync_all());
                    if let Err(e) = named {
                        // (A full disk makes the file but not its text.) The empty lock names
                        // no writer: not left behind.
                        let _ = std::fs::remove_file(&path);
                        return Err(Error::file(target, format!("cannot lock for writing: {e}")));
                    }
                    if let Ok(mut held) = HELD.lock() {
                        held.get_or_insert_with(HashSet::new).insert(path.clone());
                    }
                    return Ok((Self { path }, stale));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let Some(holder) = text.strip_prefix("fer-cam writer lock\n") else {
                        return Err(Error::file(
                            &path,
                            "is in the way and was not made by fer-cam; move it elsewhere",
                        ));
                    };
                    let holder = holder.trim();
                    let ours_now = HELD
                        .lock()
                        .ok()
                        .and_then(|h| h.as_ref().map(|h| h.contains(&path)))
                        .unwrap_or(false);
                    let pid: Option<u32> = holder.split(' ').next().and_then(|p| p.parse().ok());
                    let alive = pid.and_then(identity).is_some_and(|now| now == holder)
                        && (holder != me || ours_now);
                    if alive {
                        return Err(Error::file(
                            target,
                            format!(
                                "is being written by another fer-cam (pid {}); wait for it to \
                                 finish, or choose another path",
                                pid.map_or("?".into(), |p| p.to_string())
                            ),
                        ));
                    }
                    // The writer is gone: take its lock over.
                    stale = true;
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
                Err(e) => return Err(Error::file(target, format!("cannot lock for writing: {e}"))),
            }
        }
        Err(Error::file(
            target,
            "another fer-cam took the lock at the same moment; try again",
        ))
    }

    /// Removes the lock (after the write finished or cleaned up after itself).
    pub(super) fn release(self) -> Result<()> {
        if let Ok(mut held) = HELD.lock() {
            if let Some(h) = held.as_mut() {
                h.remove(&self.path);
            }
        }
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))
    }
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), atomically where the file
/// system supports `RENAME_NOREPLACE`; elsewhere by a check then a rename.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))
    };
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them like rename(2).
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => {
            if to.symlink_metadata().is_ok() {
                Err(std::io::ErrorKind::AlreadyExists.into())
            } else {
                std::fs::rename(from, to)
            }
        }
        _ => Err(e),
    }
}

/// Flushes a directory's entries (a rename inside it) to disk.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Test-only crash points: with `FER_CAM_CRASH_AT=STEP` in the environment the process aborts
/// (no cleanup, like a kill) when a write reaches STEP. Used by the tests that prove every step
/// of a write can be recovered from.
pub(super) fn crash_point(step: &str) {
    if std::env::var("FER_CAM_CRASH_AT").is_ok_and(|s| s == step) {
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_writer_blocks_a_second_and_a_dead_ones_lock_is_taken_over() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("model");
        let (lock, stale) = WriterLock::take(&out).unwrap();
        assert!(!stale);
        let e = WriterLock::take(&out).err().unwrap().to_string();
        assert!(e.contains("being written by another fer-cam"), "{e}");
        lock.release().unwrap();
        assert!(!lock_path(&out).unwrap().exists());
        // A lock written by a process that is gone (a pid that cannot be running now).
        std::fs::write(
            lock_path(&out).unwrap(),
            "fer-cam writer lock\n4194305 12345\n",
        )
        .unwrap();
        let (lock, stale) = WriterLock::take(&out).unwrap();
        assert!(stale);
        lock.release().unwrap();
        // A file of that name that fer-cam did not write is left alone.
        std::fs::write(lock_path(&out).unwrap(), "mine").unwrap();
        assert!(WriterLock::take(&out).is_err());
        assert_eq!(
            std::fs::read_to_string(lock_path(&out).unwrap()).unwrap(),
            "mine"
        );
    }

    #[test]
    fn rename_noreplace_never_replaces() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "b");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "a");
    }
}
