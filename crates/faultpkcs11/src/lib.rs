//! # faultpkcs11: a fault-injecting PKCS#11 module for tests
//!
//! Test support for strongroom. Debian 12's p11-kit proxy cannot forward the AES-GCM and
//! key-wrap parameters strongroom needs, so it cannot stand in for a network HSM; this module
//! does. Built as `libfaultpkcs11.so` (the `cdylib` side of this crate), it loads the real
//! module, takes its `CK_FUNCTION_LIST` from `C_GetFunctionList`, and hands the application its
//! own list in which every one of the 68 PKCS#11 2.40 entry points forwards to the real one —
//! except where the test has commanded a fault. The `rlib` side is [`Control`], the safe API a
//! test uses to command those faults, and [`library_path`], which finds the built module.
//!
//! ## Loading
//!
//! Point the application (cryptoki's `Pkcs11::new`) at `libfaultpkcs11.so` instead of the real
//! module. The library exports `C_GetFunctionList` (and `faultpkcs11_faults_injected`, a
//! `uint64_t (void)` counter of the answers it made up) and deliberately **not**
//! `C_GetInterface`: cryptoki 0.12 prefers `C_GetInterface` when a module exports it, so
//! without it cryptoki takes our forwarding list through `C_GetFunctionList`. The list reports
//! version 2.40.
//!
//! ## Environment (read once, at the first `C_GetFunctionList`)
//!
//! - `FAULTPKCS11_MODULE`: the real module (default `/usr/lib/softhsm/libsofthsm2.so`).
//! - `FAULTPKCS11_CONTROL`: the control file. Unset: no faults, ever (pure forwarding).
//! - `FAULTPKCS11_LIB`: only for [`library_path`] (where the test finds this library).
//!
//! ## Control file
//!
//! `key=value` lines; blank lines and `#` comments are ignored, as are unknown keys and values
//! that do not parse. A missing file means no faults. The module stats the file on every call
//! and re-reads it when its inode, size, mtime or ctime change (and, to be safe against
//! coarse timestamps, on every call during the first second of a new version's life). Write it
//! atomically (temp file + rename), as [`Control`] does. The first version the module sees is
//! the baseline for the counters.
//!
//! | key | effect |
//! |---|---|
//! | `token=present\|absent` | `absent`: the token disappears. `C_GetSlotList(tokenPresent=TRUE)` lists no slot, `C_GetSlotInfo` clears `CKF_TOKEN_PRESENT`, `C_GetTokenInfo`, `C_GetMechanismList/Info`, `C_InitToken` and `C_OpenSession` answer `CKR_TOKEN_NOT_PRESENT`, every call on an existing session answers `CKR_DEVICE_REMOVED`. Back to `present`: sessions opened before answer `CKR_SESSION_HANDLE_INVALID`, new sessions work, and the login is gone (as for `drop_login`). |
//! | `invalidate_sessions=N` | whenever N increases, every session open at that moment answers `CKR_SESSION_HANDLE_INVALID` from then on; new sessions work. |
//! | `drop_login=N` | whenever N increases, crypto and object calls (`C_Encrypt*`, `C_Decrypt*`, `C_Sign*`, `C_Verify*`, `C_FindObjects*`, `C_Get/SetAttributeValue`, `C_GetObjectSize`, `C_Create/Copy/DestroyObject`, `C_GenerateKey(Pair)`, `C_Wrap/Unwrap/DeriveKey`, `C_DigestKey`, the dual-function updates) answer `CKR_USER_NOT_LOGGED_IN`, and `C_GetSessionInfo` reports a public session, until the application calls `C_Login` again. That `C_Login` is forwarded; `CKR_OK` or `CKR_USER_ALREADY_LOGGED_IN` (the real module never logged out) both restore the login, and the answer is passed through as is. `C_GenerateRandom` and digests are not affected. |
//! | `device_error_rate=F` | that fraction (0.0–1.0) of `C_Encrypt`, `C_Decrypt`, `C_Sign` and `C_Verify` calls — length queries included, so cryptoki's `encrypt` (two `C_Encrypt` calls) fails more often than F — answer `CKR_DEVICE_ERROR`. The real module is called only to end its operation (result discarded), as a failed call must, so the session stays usable. xorshift64* seeded from the clock. |
//! | `seed=N` | reseeds that PRNG whenever N changes (reproducible error sequences). |
//! | `latency_ms=N` | sleep N ms before each `C_Encrypt`, `C_Decrypt`, `C_Sign`, `C_Verify` and `C_GenerateRandom` call (not before calls already refused by another fault). |
//! | `max_sessions=N` | `C_OpenSession` answers `CKR_SESSION_COUNT` while N sessions opened through the module are open and alive (closes and `C_CloseAllSessions` are tracked; sessions killed by a fault no longer count). `none` or no line: no limit. |
//!
//! Faults are per process (PKCS#11 state is): several processes can share one control file,
//! and each applies it to its own sessions. Closing a dead session still closes the real one
//! (the application sees the fault's answer). While the token is absent the real module keeps
//! running: its sessions and login survive underneath, which is why `C_Login` may answer
//! `CKR_USER_ALREADY_LOGGED_IN` after the token returns.
//!
//! ## Example
//!
//! ```no_run
//! use std::time::Duration;
//! let dir = tempfile::tempdir().unwrap();
//! let control = faultpkcs11::Control::new(dir.path().join("faults"));
//! // In the process under test: FAULTPKCS11_CONTROL=<control.path()>, module = library_path().
//! let module = faultpkcs11::library_path().expect("run `cargo build -p faultpkcs11` first");
//! control.token_present(false).unwrap();
//! control.token_present(true).unwrap();
//! control.latency(Duration::from_millis(20)).unwrap();
//! control.clear().unwrap();
//! # let _ = module;
//! ```
//!
//! ## Building the `.so`
//!
//! Cargo compiles both crate types whenever it compiles this library, also as a dependency, but
//! where the `.so` lands depends on the command (measured with cargo 1.95):
//!
//! - `cargo test` / `cargo nextest run` of a package that has `faultpkcs11` as a
//!   dev-dependency, or of this package, with or without `--workspace`:
//!   `target/<profile>/deps/libfaultpkcs11.so` only (no copy in `target/<profile>/`).
//! - `cargo build -p faultpkcs11` or `cargo build --workspace`: also
//!   `target/<profile>/libfaultpkcs11.so` (a hard link to the `deps/` file).
//! - `cargo build` of the root package alone: not built (dev-dependencies are not).
//!
//! [`library_path`] looks in `deps/` first, then in the profile directory, so any test run finds
//! the copy it just built. Set `FAULTPKCS11_LIB` to use another one (e.g. from a nextest archive).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod config;
mod control;
mod module;

pub use control::{
    Control, DEFAULT_MODULE, ENV_CONTROL, ENV_LIB, ENV_MODULE, LIBRARY_FILE_NAME, library_path,
};
