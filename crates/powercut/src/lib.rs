//! # powercut: a FUSE filesystem that forgets what was not synced
//!
//! Test support for strongroom, in the spirit of LazyFS. [`Powercut::mount`] mounts a
//! filesystem over a *backing* directory: reads and writes pass through to the backing
//! files at once (so the processes under test see an ordinary filesystem), while the
//! simulator keeps, apart, the *durable* state — what a machine would find on its disk after
//! losing power — and an ordered journal of every change not yet made durable.
//! [`Powercut::cut`] cuts the power: from that moment every request on the mount fails
//! with `EIO`, the journal is dropped (or a random prefix of it kept), and
//! [`Powercut::restart`] unmounts, rewrites the backing directory to the durable state and
//! mounts it again, so the test can restart its service on what remains.
//!
//! ## What is durable, exactly (conservative, like ext4 without `auto_da_alloc`)
//!
//! - **`fsync` and `fdatasync` of a file** (also `O_SYNC`/`O_DSYNC` writes, which the
//!   kernel turns into an fsync): every write and size change (truncate, extension) made to
//!   that file before the call. *Not* its directory entry: a new file is lost after a cut
//!   unless its directory was fsync'd after the file was created, whatever the file's own
//!   syncs. A file whose entry is durable but whose data never was comes back empty (or with
//!   its last synced contents).
//! - **`fsync` of a directory**: every entry created (`creat`, `mkdir`), removed (`unlink`,
//!   `rmdir`) or renamed in it before the call. A rename is durable once either of its two
//!   directories is synced; a rename over an existing name is atomic (the old file or the
//!   new one, never neither). A new directory is durable only once its parent is synced.
//! - **Nothing else**: `sync_file_range` (it reaches no FUSE request: the mount has no
//!   writeback cache, so there is nothing for it to start), `close`, `sync`/`syncfs`, a
//!   process exiting or being killed. Modes, owners and times are passed through and kept
//!   as they were at the cut; they are not what this simulates.
//!
//! ## What a cut keeps
//!
//! [`Keep::Nothing`]: exactly the durable state. [`Keep::RandomPrefix`]: additionally the
//! first *k* unsynced operations in the order they were made (data writes, size changes and
//! entry changes alike), *k* uniform in `0..=pending` from the seed — a device that writes
//! back in order and lost its tail. A single `write` call is kept whole or not at all.
//! [`Keep::Everything`]: what `kill -9` alone leaves (a control). The [`CutReport`] says how
//! many operations and bytes were pending and kept.
//!
//! ## Limits
//!
//! Regular files and directories only (no hard links, symlinks or special files: `EPERM`);
//! no `fallocate` (`EOPNOTSUPP`, callers fall back to writing); one FUSE worker thread;
//! locks are the kernel's local locks. The durable copy of a changed file is held in memory
//! (fine for test stores of a few MiB). The simulator never fsyncs the backing directory
//! itself: the machine running the test does not lose power.
//!
//! ## Mounting needs
//!
//! `/dev/fuse` and either root (the `mount` system call) or `fusermount3` (Debian's `fuse3`
//! package). [`unavailable`] says why a machine cannot mount, for tests to print and skip.
//!
//! ## The `powercut` binary
//!
//! `powercut BACKING MOUNTPOINT` mounts and reads commands from standard input, one a line,
//! answering each on standard output: `status` (pending operations, syncs), `cut` (drop all
//! unsynced), `cut-prefix SEED` (keep a random prefix), `cut-all` (keep everything),
//! `restart` (after a cut: rewrite the backing directory and mount again), `quit` (unmount
//! and exit; also at end of input).

pub mod fs;
pub mod model;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::{BackgroundSession, Config, MountOption};

pub use model::{CutReport, Keep, Stats};

/// Errors of the simulator.
#[derive(Debug)]
pub enum Error {
    /// Mounting failed (FUSE unusable on this machine, mountpoint missing…).
    Mount(std::io::Error),
    /// Reading or rewriting the backing directory failed.
    Backing(std::io::Error),
    /// `restart` before `cut`, or the state lock was poisoned.
    State(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Mount(e) => write!(f, "cannot mount the power-cut filesystem: {e}"),
            Error::Backing(e) => write!(f, "backing directory: {e}"),
            Error::State(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for Error {}

/// A mounted power-cut filesystem; unmounted on drop.
pub struct Powercut {
    backing: PathBuf,
    mountpoint: PathBuf,
    state: Arc<Mutex<fs::State>>,
    session: Option<BackgroundSession>,
}

impl std::fmt::Debug for Powercut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Powercut")
            .field("backing", &self.backing)
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

fn mount_session(
    mountpoint: &Path,
    state: Arc<Mutex<fs::State>>,
) -> Result<BackgroundSession, Error> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("powercut".into()),
        MountOption::Subtype("powercut".into()),
    ];
    fuser::spawn_mount(fs::PowercutFs { state }, mountpoint, &config).map_err(Error::Mount)
}

impl Powercut {
    /// Mounts over `backing` (whose current contents count as durable) at `mountpoint` (an
    /// existing empty directory, not inside `backing`).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<Self, Error> {
        let backing = backing.canonicalize().map_err(Error::Backing)?;
        let model = model::Model::scan(&backing).map_err(Error::Backing)?;
        let state = Arc::new(Mutex::new(fs::State::new(model)));
        let session = mount_session(mountpoint, state.clone())?;
        Ok(Self {
            backing,
            mountpoint: mountpoint.to_path_buf(),
            state,
            session: Some(session),
        })
    }

    /// The mountpoint.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Counters of the current mount.
    pub fn stats(&self) -> Stats {
        self.state
            .lock()
            .map(|s| s.model.stats())
            .unwrap_or_default()
    }

    /// Cuts the power now: every request on the mount fails with `EIO` from here on, and
    /// the durable state becomes final (with what `keep` keeps of the unsynced operations).
    /// Kill the processes using the mount, then [`Powercut::restart`].
    pub fn cut(&self, keep: Keep) -> Result<CutReport, Error> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::State("state lock poisoned"))?;
        if st.cut {
            return Err(Error::State("the power is already cut"));
        }
        st.cut = true;
        st.model.cut(keep).map_err(Error::Backing)
    }

    /// After [`Powercut::cut`] (and once no process uses the mount): unmounts, rewrites the
    /// backing directory to what survived, and mounts it again.
    pub fn restart(&mut self) -> Result<(), Error> {
        {
            let st = self
                .state
                .lock()
                .map_err(|_| Error::State("state lock poisoned"))?;
            if !st.cut {
                return Err(Error::State("restart without a cut"));
            }
        }
        self.unmount();
        {
            let st = self
                .state
                .lock()
                .map_err(|_| Error::State("state lock poisoned"))?;
            st.model.rebuild().map_err(Error::Backing)?;
        }
        let model = model::Model::scan(&self.backing).map_err(Error::Backing)?;
        self.state = Arc::new(Mutex::new(fs::State::new(model)));
        self.session = Some(mount_session(&self.mountpoint, self.state.clone())?);
        Ok(())
    }

    fn unmount(&mut self) {
        if let Some(session) = self.session.take() {
            // Detach first: succeeds even while a dying process still holds a file open;
            // the session ends once the last reference is gone.
            if let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
                // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
                #[allow(unsafe_code)]
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH)
                };
            }
            let _ = session.umount_and_join();
        }
    }
}

impl Drop for Powercut {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Why this machine cannot mount the simulator (`None`: it can). Tries a real mount of an
/// empty directory, so the answer is what the tests would meet.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse does not exist (no FUSE in this kernel or container)".into());
    }
    let probe = || -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("powercut-probe-{}", std::process::id()));
        let (backing, mnt) = (dir.join("b"), dir.join("m"));
        std::fs::create_dir_all(&backing).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        let result = Powercut::mount(&backing, &mnt)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                std::fs::write(p.path().join("probe"), b"x").map_err(|e| e.to_string())?;
                drop(p);
                Ok(())
            });
        let _ = std::fs::remove_dir_all(&dir);
        result
    };
    probe().err()
}
