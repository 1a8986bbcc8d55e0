//! One writer per output: `.NAME.fer-cam-lock` beside the output, put in place before any byte
//! of the write and removed after its last step. Its text is written to a private file first and
//! then linked to the lock's name, which fails if a lock is there, so a lock never exists without
//! its text. It names the writing process (pid and start time), so that a lock left by a process
//! that is gone (killed mid-write) is recognised: everything beside the output then is fer-cam's
//! own leftover, and the next writer cleans it up. A lock held by a live process means a
//! concurrent writer: the second one fails with an error naming it, instead of both writing and
//! one silently replacing the other.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{new_private_file, next_number, private_sibling};
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

/// A lock's first line; the second names its writer.
const HEADER: &str = "fer-cam writer lock\n";

/// The locks this process holds, for one thread at a time (still readable after a thread
/// panicked while it had them).
fn held() -> MutexGuard<'static, Option<HashSet<PathBuf>>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Puts a lock holding `text` at `path`, unless one is there already (`false`). The text is
/// written to a private file first and then linked to `path`, which fails if `path` exists as
/// atomically as an exclusive create would, so a lock is never seen without its text (a second
/// writer reading a lock made empty and not yet written took it for a stranger's file).
fn place(path: &Path, text: &str, target: &Path) -> Result<bool> {
    const FAILED: &str = "cannot lock for writing";
    let failed = |e: std::io::Error| Error::file(target, format!("{FAILED}: {e}"));
    let (tmp, mut file) = new_private_file(target, "fer-cam-lock.new", target, FAILED)?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|_| file.sync_all());
    if let Err(e) = written {
        // (A full disk makes the file but not its text.)
        let _ = std::fs::remove_file(&tmp);
        return Err(failed(e));
    }
    let linked = std::fs::hard_link(&tmp, path).or_else(|e| match e.raw_os_error() {
        // File systems without hard links: the same by a rename that never replaces.
        Some(libc::EPERM) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EMLINK) => {
            rename_noreplace(&tmp, path)
        }
        _ => Err(e),
    });
    // Gone already where the rename moved it.
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(failed(e)),
    }
}

/// Removes a dead writer's lock, which read `seen`. It is first moved aside and read again, so
/// that a live lock another writer put there since (after taking the same stale lock over) is
/// put back, not removed. `false`: there was nothing to remove any more.
fn drop_stale(path: &Path, seen: &str, target: &Path) -> Result<bool> {
    let aside = private_sibling(target, "fer-cam-lock.stale", target)?;
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(path, e)),
    }
    let moved = std::fs::read_to_string(&aside).unwrap_or_default();
    if moved != seen {
        let back = rename_noreplace(&aside, path);
        if back.is_err() {
            let _ = std::fs::remove_file(&aside);
        }
        return Err(Error::file(
            target,
            "another fer-cam took the lock at the same moment; try again",
        ));
    }
    std::fs::remove_file(&aside).map_err(|e| Error::io(&aside, e))?;
    Ok(true)
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
        // The third line tells this take's lock from others of this process.
        let mine = format!("{HEADER}{me}\n{}\n", next_number());
        let mut stale = false;
        for _ in 0..4 {
            {
                // Placed and recorded as held in one step for the other threads.
                let mut held = held();
                if place(&path, &mine, target)? {
                    held.get_or_insert_with(HashSet::new).insert(path.clone());
                    return Ok((Self { path }, stale));
                }
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                // Released between the two steps: try again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => String::new(),
            };
            let Some(holder) = text.strip_prefix(HEADER) else {
                return Err(Error::file(
                    &path,
                    "is in the way and was not made by fer-cam; move it elsewhere",
                ));
            };
            let holder = holder.lines().next().unwrap_or_default().trim();
            let ours_now = held().as_ref().is_some_and(|h| h.contains(&path));
            let pid: Option<u32> = holder.split(' ').next().and_then(|p| p.parse().ok());
            let alive = pid.and_then(identity).is_some_and(|now| now == holder)
                && (holder != me || ours_now);
            if alive {
                return Err(Error::file(
                    target,
                    format!(
                        "is being written by another fer-cam (pid {}); wait for it to finish, \
                         or choose another path",
                        pid.map_or("?".into(), |p| p.to_string())
                    ),
                ));
            }
            // The writer is gone: take its lock over.
            if drop_stale(&path, &text, target)? {
                stale = true;
            }
        }
        Err(Error::file(
            target,
            "another fer-cam took the lock at the same moment; try again",
        ))
    }

    /// Removes the lock (after the write finished or cleaned up after itself).
    pub(super) fn release(self) -> Result<()> {
        // Removed and no longer recorded as held in one step for the other threads.
        let mut held = held();
        if let Some(h) = held.as_mut() {
            h.remove(&self.path);
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

    /// Writers racing for one lock (threads here; processes behave the same, with another
    /// identity): each is refused as "being written" or gets the lock, and none ever reads a
    /// lock without its text and takes it for a stranger's file. Nothing else is left.
    #[test]
    fn racing_writers_never_see_a_lock_without_its_text() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("model");
        for _ in 0..300 {
            let barrier = std::sync::Barrier::new(4);
            let errors: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            match WriterLock::take(&out) {
                                Ok((lock, stale)) => {
                                    assert!(!stale);
                                    lock.release().unwrap();
                                    None
                                }
                                Err(e) => Some(e.to_string()),
                            }
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().unwrap())
                    .collect()
            });
            for e in &errors {
                assert!(e.contains("being written by another fer-cam"), "{e}");
            }
            assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        }
    }

    /// A dead writer's lock is taken over once: a second writer that judged the same lock
    /// stale finds the first one's live lock in its place and leaves it there.
    #[test]
    fn a_stale_lock_taken_over_by_another_writer_is_put_back() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("model");
        let path = lock_path(&out).unwrap();
        let dead = "fer-cam writer lock\n4194305 12345\n";
        std::fs::write(&path, dead).unwrap();
        let (lock, stale) = WriterLock::take(&out).unwrap();
        assert!(stale);
        let live = std::fs::read_to_string(&path).unwrap();
        // The slower writer read the dead lock before the takeover.
        let e = drop_stale(&path, dead, &out).unwrap_err().to_string();
        assert!(e.contains("at the same moment"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), live);
        lock.release().unwrap();
        assert!(!drop_stale(&path, dead, &out).unwrap());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    /// Private files left by a killed process whose pid this one reuses are stepped over.
    #[test]
    fn a_leftover_private_file_does_not_block_the_lock() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("model");
        // More names than the other tests of this process take meanwhile, so the next one is
        // taken.
        let first = next_number();
        for n in first..first + 10_000 {
            let name = format!(".model.{}-{n}.fer-cam-lock.new", std::process::id());
            std::fs::write(root.path().join(name), "left").unwrap();
        }
        let (lock, _) = WriterLock::take(&out).unwrap();
        lock.release().unwrap();
        // Only the leftovers remain.
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 10_000);
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
