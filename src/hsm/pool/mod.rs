//! The HSM worker pool: a fixed number of threads, each with its own PKCS#11 session,
//! serving wrap and unwrap jobs from a bounded queue.
//!
//! Blocking PKCS#11 calls never run on the async runtime. On SoftHSM2 one worker is fastest
//! (two threads in one process run at about half the rate of one, all waiting on the token's
//! mutex), on a network HSM several sessions in parallel pay off: the worker count is
//! configuration. Requests wait for a worker no longer than their deadline. One login serves
//! the process; an anchor session keeps it (and the session copies of master keys) alive.
//!
//! This file holds the public types, the state the threads share (`Shared`, `Ctx`), and
//! starting and stopping the pool; `api.rs` the operations callers use, `job.rs` what
//! travels on the queue, `worker.rs` the worker threads, `shared.rs` the anchor session, the
//! keyring and recovery, and `session.rs` the anchor's login and the session limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread;

use cryptoki::context::Pkcs11;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::keys::MacKey;
use super::{HsmError, TokenSelector};

mod api;
mod job;
mod session;
mod shared;
mod worker;

use job::Job;
use session::{fit_workers, open_anchor};
use worker::Worker;

/// Which object the workers use for master key operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyCopy {
    /// A session-object copy made at start (CKA_TOKEN=false): ~1.7× faster on SoftHSM2,
    /// but SoftHSM2 and Kryoptic refuse it for keys with CKA_MODIFIABLE=false (the service
    /// then falls back to the token object and says so in the log).
    Session,
    /// The token object itself.
    #[default]
    Token,
}

/// Tuning of the pool.
#[derive(Debug, Clone)]
pub struct HsmOptions {
    /// Worker threads, one session each.
    pub workers: usize,
    /// Jobs that may wait for a worker.
    pub queue_depth: usize,
    /// Which master key object to use.
    pub key_copy: KeyCopy,
}

impl Default for HsmOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            queue_depth: 1024,
            key_copy: KeyCopy::Token,
        }
    }
}

/// A wrapped data key as the envelope mechanism stores it: IV || ciphertext || tag.
pub type WrappedDek = Vec<u8>;

/// How a record to re-wrap is sealed (see [`Hsm::rewrap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewrapKind {
    /// Envelope: data key wrapped by C_Encrypt AES-GCM, value sealed in process.
    Envelope,
    /// Strict (hsm-only): data key wrapped with AES-KW, value sealed in the token.
    Strict,
}

/// One record to re-wrap: its sealed parts, the AAD it was sealed under (with its master
/// key version) and the AAD to seal it under the new one.
pub struct RewrapItem {
    /// How it is sealed.
    pub kind: RewrapKind,
    /// The master key version that wraps its data key now.
    pub from_mk: u32,
    /// The AAD it was sealed under.
    pub old_aad: Vec<u8>,
    /// The AAD to seal it under (binds the new master key version).
    pub new_aad: Vec<u8>,
    /// The wrapped data key.
    pub wrapped_dek: Vec<u8>,
    /// The value's AES-GCM nonce.
    pub nonce: Vec<u8>,
    /// The value's ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// A record re-sealed by [`Hsm::rewrap`]: a fresh data key wrapped under the new master
/// key and the value sealed under it with the new AAD.
pub struct Rewrapped {
    /// The new wrapped data key.
    pub wrapped_dek: Vec<u8>,
    /// The value's new nonce.
    pub nonce: Vec<u8>,
    /// The value's new ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// The token, as the service uses it.
pub struct Hsm {
    jobs: async_channel::Sender<Job>,
    shared: Arc<Shared>,
    /// The worker and recovery threads, joined when the pool is dropped.
    threads: Vec<thread::JoinHandle<()>>,
}

/// What the token connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsmState {
    /// Serving.
    Ready,
    /// Lost (removed, unreachable); the pool re-initialises the library with backoff.
    Recovering,
}

/// The library context, its token and the anchor session; replaced whole when the pool
/// re-initialises after the token was lost.
struct Ctx {
    pkcs11: Pkcs11,
    slot: Slot,
    /// Holds the process's login and the session copies of master keys.
    anchor: Mutex<Session>,
    /// Bumped on every re-initialisation; workers reopen their sessions when it changes.
    generation: u64,
}

struct Shared {
    ctx: RwLock<Ctx>,
    selector: TokenSelector,
    pin: AuthPin,
    key_copy: KeyCopy,
    keyring: RwLock<BTreeMap<u32, ObjectHandle>>,
    macs: RwLock<BTreeMap<MacKey, ObjectHandle>>,
    lost: AtomicBool,
    recover: Mutex<bool>,
    recover_signal: Condvar,
    closed: AtomicBool,
}

impl Hsm {
    /// Opens the token that `selector` names, logs in, finds the master keys and starts the
    /// workers. Fails on configuration errors (token absent, wrong PIN); a token without a
    /// master key opens, and [`Hsm::current_master_key`] says `None`.
    pub fn open(
        pkcs11: Pkcs11,
        selector: &TokenSelector,
        pin: AuthPin,
        options: &HsmOptions,
    ) -> Result<Self, HsmError> {
        let slot = super::find_token(&pkcs11, selector)?;
        let workers = fit_workers(&pkcs11, slot, options.workers.max(1))?;
        let anchor = open_anchor(&pkcs11, slot, &pin)?;
        let shared = Arc::new(Shared {
            ctx: RwLock::new(Ctx {
                pkcs11,
                slot,
                anchor: Mutex::new(anchor),
                generation: 0,
            }),
            selector: selector.clone(),
            pin,
            key_copy: options.key_copy,
            keyring: RwLock::new(BTreeMap::new()),
            macs: RwLock::new(BTreeMap::new()),
            lost: AtomicBool::new(false),
            recover: Mutex::new(false),
            recover_signal: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        shared.reload_keys()?;

        let (tx, rx) = async_channel::bounded::<Job>(options.queue_depth.max(1));
        let mut threads = Vec::with_capacity(workers + 1);
        for i in 0..workers {
            let session = {
                let ctx = shared.ctx.read().map_err(|_| HsmError::Closed)?;
                ctx.pkcs11.open_ro_session_no_drop(ctx.slot)?
            };
            let worker = Worker {
                shared: shared.clone(),
                session,
                generation: 0,
            };
            let rx = rx.clone();
            threads.push(
                thread::Builder::new()
                    .name(format!("hsm-worker-{i}"))
                    .spawn(move || worker.run(rx, workers))
                    .map_err(HsmError::Thread)?,
            );
        }
        let recovery = shared.clone();
        threads.push(
            thread::Builder::new()
                .name("hsm-recovery".into())
                .spawn(move || recovery.recovery_loop())
                .map_err(HsmError::Thread)?,
        );
        Ok(Self {
            jobs: tx,
            shared,
            threads,
        })
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.jobs.len()
    }

    /// Whether the token is serving or being recovered.
    pub fn state(&self) -> HsmState {
        if self.shared.lost.load(Ordering::Acquire) {
            HsmState::Recovering
        } else {
            HsmState::Ready
        }
    }

    /// The master key version new writes use: the highest in the token.
    pub fn current_master_key(&self) -> Option<u32> {
        self.shared
            .keyring
            .read()
            .ok()
            .and_then(|k| k.keys().next_back().copied())
    }

    /// Master key versions the service knows.
    pub fn master_key_versions(&self) -> Vec<u32> {
        self.shared
            .keyring
            .read()
            .map(|k| k.keys().copied().collect())
            .unwrap_or_default()
    }
}

impl Drop for Hsm {
    fn drop(&mut self) {
        // Workers end when the queue closes; the recovery thread when told.
        self.jobs.close();
        self.shared.closed.store(true, Ordering::Release);
        self.shared.recover_signal.notify_all();
        // Wait for them, so that no thread of ours still holds the library (its last session
        // or context) when the process exits: SoftHSM2's exit handlers then tear it down
        // under that thread, and the process died with SIGSEGV after a clean stop (seen in
        // CI). A pool dropped on one of its own threads (by a job holding the last handle)
        // cannot wait for that thread.
        let me = thread::current().id();
        for t in self.threads.drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}
