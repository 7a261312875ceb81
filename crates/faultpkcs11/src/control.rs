//! The test side: writes the control file and finds the built module. Safe Rust only.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::{Config, clamp_rate};

/// Env var naming the control file the module reads (unset: the module injects no faults).
pub const ENV_CONTROL: &str = "FAULTPKCS11_CONTROL";
/// Env var naming the real PKCS#11 module to forward to.
pub const ENV_MODULE: &str = "FAULTPKCS11_MODULE";
/// Env var that overrides where [`library_path`] finds `libfaultpkcs11.so`.
pub const ENV_LIB: &str = "FAULTPKCS11_LIB";
/// The real module used when [`ENV_MODULE`] is unset.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// File name of the built module.
pub const LIBRARY_FILE_NAME: &str = "libfaultpkcs11.so";

/// Commands the fault module of a process under test through its control file.
///
/// Every method reads the current file (a missing file counts as "no faults"), changes one
/// setting and replaces the file atomically (write a temporary file in the same directory, then
/// rename it over the old one), so the module never sees a half-written file. The counters behind
/// [`Control::invalidate_sessions`] and [`Control::drop_login`] are kept in the file, so several
/// `Control` values for one path agree. Read-modify-write is not locked: do not command one file
/// from two threads at once.
///
/// Give the module the path with `FAULTPKCS11_CONTROL=<path>` in the environment of the process
/// that loads it, before it calls `C_GetFunctionList` (the module reads the variable once).
#[derive(Debug, Clone)]
pub struct Control {
    path: PathBuf,
}

impl Control {
    /// A controller for the control file at `path`. Does no I/O; the file need not exist.
    pub fn new(path: impl Into<PathBuf>) -> Control {
        Control { path: path.into() }
    }

    /// The control file's path (the value for `FAULTPKCS11_CONTROL`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `token=present|absent`. Absent: the token disappears (calls on sessions answer
    /// CKR_DEVICE_REMOVED, C_OpenSession/C_GetTokenInfo CKR_TOKEN_NOT_PRESENT). Present again:
    /// sessions opened before answer CKR_SESSION_HANDLE_INVALID and the login is gone.
    pub fn token_present(&self, present: bool) -> io::Result<()> {
        self.update(|c| c.token_present = present)
    }

    /// Bumps `invalidate_sessions`: every session open now answers CKR_SESSION_HANDLE_INVALID
    /// from now on; new sessions work.
    pub fn invalidate_sessions(&self) -> io::Result<()> {
        self.update(|c| c.invalidate_sessions += 1)
    }

    /// Bumps `drop_login`: crypto and object calls answer CKR_USER_NOT_LOGGED_IN until the
    /// application calls C_Login again.
    pub fn drop_login(&self) -> io::Result<()> {
        self.update(|c| c.drop_login += 1)
    }

    /// `device_error_rate`: that fraction (clamped to 0.0..=1.0) of C_Encrypt, C_Decrypt, C_Sign
    /// and C_Verify calls answer CKR_DEVICE_ERROR.
    pub fn device_error_rate(&self, rate: f64) -> io::Result<()> {
        self.update(|c| c.device_error_rate = clamp_rate(rate))
    }

    /// `latency_ms`: sleep this long (millisecond resolution, rounded down) before each
    /// C_Encrypt, C_Decrypt, C_Sign, C_Verify and C_GenerateRandom call.
    pub fn latency(&self, latency: Duration) -> io::Result<()> {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.update(|c| c.latency_ms = ms)
    }

    /// `max_sessions`: C_OpenSession answers CKR_SESSION_COUNT while this many sessions opened
    /// through the module are open. `None` removes the limit.
    pub fn max_sessions(&self, max: Option<u32>) -> io::Result<()> {
        self.update(|c| c.max_sessions = max.map(u64::from))
    }

    /// `seed`: reseeds the module's fault PRNG (for a reproducible `device_error_rate` sequence).
    pub fn seed(&self, seed: u64) -> io::Result<()> {
        self.update(|c| c.seed = Some(seed))
    }

    /// Removes every fault: token present, no error rate, no latency, no session limit. The
    /// invalidate/drop counters (and the seed) are kept, so clearing never triggers or re-arms
    /// them.
    pub fn clear(&self) -> io::Result<()> {
        self.update(|c| {
            *c = Config {
                invalidate_sessions: c.invalidate_sessions,
                drop_login: c.drop_login,
                seed: c.seed,
                ..Config::default()
            }
        })
    }

    fn read(&self) -> io::Result<Config> {
        match fs::read_to_string(&self.path) {
            Ok(text) => Ok(Config::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Config)) -> io::Result<()> {
        let mut config = self.read()?;
        change(&mut config);
        self.write_atomically(config.render().as_bytes())
    }

    fn write_atomically(&self, bytes: &[u8]) -> io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let file_name = self.path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "control path has no file name")
        })?;
        let mut tmp_name = OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = self.path.with_file_name(tmp_name);
        let result = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| fs::rename(&tmp, &self.path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// Where the built `libfaultpkcs11.so` is: `$FAULTPKCS11_LIB` if set (returned as given, even if
/// it does not exist), else in the cargo profile directory of the running executable
/// (`target/<profile>/`, the parent of the `deps/` a test binary runs from, or of `examples/`):
/// first `target/<profile>/deps/libfaultpkcs11.so`, then `target/<profile>/libfaultpkcs11.so`.
/// `None` if neither exists.
///
/// Why `deps/` first: a test build (`cargo test`, `cargo nextest run`, with or without
/// `--workspace`) that has this crate as a (dev-)dependency compiles the `.so` into `deps/` but
/// never copies it up to `target/<profile>/`; only `cargo build -p faultpkcs11` (or
/// `--workspace`) does that, as a hard link to the `deps/` file of that moment. So the `deps/`
/// copy is never older than the other and is the one the current test build made.
pub fn library_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(ENV_LIB).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let profile_dir = match dir.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => dir.parent()?,
        _ => dir,
    };
    [
        profile_dir.join("deps").join(LIBRARY_FILE_NAME),
        profile_dir.join(LIBRARY_FILE_NAME),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_survive_clear_and_writes_are_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control");
        let control = Control::new(&path);
        control.invalidate_sessions().unwrap();
        control.invalidate_sessions().unwrap();
        control.drop_login().unwrap();
        control.token_present(false).unwrap();
        control.device_error_rate(2.0).unwrap();
        control.latency(Duration::from_millis(15)).unwrap();
        control.max_sessions(Some(3)).unwrap();
        let c = Config::parse(&fs::read_to_string(&path).unwrap());
        assert_eq!(c.invalidate_sessions, 2);
        assert_eq!(c.drop_login, 1);
        assert!(!c.token_present);
        assert_eq!(c.device_error_rate, 1.0);
        assert_eq!(c.latency_ms, 15);
        assert_eq!(c.max_sessions, Some(3));

        Control::new(&path).clear().unwrap();
        let c = Config::parse(&fs::read_to_string(&path).unwrap());
        assert_eq!(
            c,
            Config {
                invalidate_sessions: 2,
                drop_login: 1,
                ..Config::default()
            }
        );
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
