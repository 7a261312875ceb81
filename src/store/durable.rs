//! Real fsync for the sled store, shared by concurrent writers (group commit).
//!
//! sled 0.34's `flush` writes its log with `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`:
//! that neither persists the file's size when the log grew nor any directory entry, nor
//! flushes the device's write cache, and guarantees nothing after a power cut (sled's real
//! fsync runs in the background about twice a second). So after sled's flush, a write is made
//! durable here: `fdatasync` of the log file (`db`: data and size), new blob files and their
//! directory (values over sled's blob threshold), and `fsync` of the store directory (the
//! snapshots sled renames into place). One writer runs a sync for everyone who finished
//! their flush before it started; writers arriving meanwhile wait for the next one, so
//! concurrent puts share syncs. After a failed sync the store refuses every later write
//! (a retried fsync can report success for data the kernel already dropped).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use crate::durable::{fsync_parent, fsync_path};

#[derive(Default)]
struct Progress {
    /// Tickets handed out: one per writer whose sled flush has returned.
    requested: u64,
    /// Every ticket up to this one is durable.
    synced: u64,
    running: bool,
    failed: Option<String>,
    /// Blob files already synced.
    blobs: HashSet<OsString>,
}

/// The store's files, made durable on demand.
pub(crate) struct StoreSync {
    dir: PathBuf,
    log: File,
    dir_handle: File,
    progress: Mutex<Progress>,
    done: Condvar,
    /// Syncs run (each may cover several writers).
    pub(crate) syncs: std::sync::atomic::AtomicU64,
}

impl StoreSync {
    /// After sled opened the store at `dir`: makes every file it has, the directory and the
    /// directory's own entry durable once, and keeps the log and the directory open.
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        let dir_handle = File::open(dir)?;
        let this = Self {
            dir: dir.to_path_buf(),
            log,
            dir_handle,
            progress: Mutex::new(Progress::default()),
            done: Condvar::new(),
            syncs: std::sync::atomic::AtomicU64::new(0),
        };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fsync_path(&entry.path())?;
            }
        }
        {
            let mut p = this.lock()?;
            this.sync_blobs(&mut p.blobs)?;
        }
        this.dir_handle.sync_all()?;
        fsync_parent(dir)?;
        Ok(this)
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, Progress>> {
        self.progress
            .lock()
            .map_err(|_| io::Error::other("the store's sync state is poisoned"))
    }

    /// fsyncs blob files not synced yet, and the blob directory if anything changed.
    fn sync_blobs(&self, synced: &mut HashSet<OsString>) -> io::Result<()> {
        let blobs = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut changed = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                fsync_path(&entry.path())?;
                changed = true;
            }
            present.insert(name);
        }
        if present.len() != synced.len() {
            changed = true;
        }
        if changed {
            fsync_path(&blobs)?;
        }
        *synced = present;
        Ok(())
    }

    /// Returns once everything sled flushed before this call is durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut p = self.lock()?;
        p.requested += 1;
        let mine = p.requested;
        loop {
            if let Some(e) = &p.failed {
                return Err(io::Error::other(format!(
                    "an earlier fsync of the store failed ({e}); restart after checking the disk"
                )));
            }
            if p.synced >= mine {
                return Ok(());
            }
            if p.running {
                p = self
                    .done
                    .wait(p)
                    .map_err(|_| io::Error::other("the store's sync state is poisoned"))?;
                continue;
            }
            p.running = true;
            let target = p.requested;
            let mut blobs = std::mem::take(&mut p.blobs);
            drop(p);
            let result = self
                .log
                .sync_data()
                .and_then(|()| self.sync_blobs(&mut blobs))
                .and_then(|()| self.dir_handle.sync_all());
            self.syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            p = self.lock()?;
            p.running = false;
            p.blobs = blobs;
            match result {
                Ok(()) => p.synced = p.synced.max(target),
                Err(e) => p.failed = Some(e.to_string()),
            }
            self.done.notify_all();
        }
    }
}
