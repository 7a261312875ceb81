//! The HSM worker pool: a fixed number of threads, each with its own PKCS#11 session,
//! serving wrap and unwrap jobs from a bounded queue.
//!
//! Blocking PKCS#11 calls never run on the async runtime. On SoftHSM2 one worker is fastest
//! (two threads in one process run at about half the rate of one, all waiting on the token's
//! mutex), on a network HSM several sessions in parallel pay off: the worker count is
//! configuration. Requests wait for a worker no longer than their deadline. One login serves
//! the process; an anchor session keeps it (and the session copies of master keys) alive.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use super::keys::MacKey;
use super::strict::{self, StrictSealed};
use super::{FaultClass, HsmError, TokenSelector, gcm, keys};
use crate::envelope::{DEK_LEN, DataKey, GCM_NONCE_LEN, GCM_TAG_LEN};

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
enum Op {
    NewDek {
        mk: u32,
        aad: Vec<u8>,
    },
    Unwrap {
        mk: u32,
        wrapped: Vec<u8>,
        aad: Vec<u8>,
    },
    /// Strict mode: seal a value in the token under a fresh AES-KW-wrapped data key.
    StrictSeal {
        mk: u32,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    },
    /// Strict mode: open a value in the token.
    StrictOpen {
        mk: u32,
        wrapped: Vec<u8>,
        nonce: Vec<u8>,
        aad: Vec<u8>,
        ciphertext: Vec<u8>,
    },
    /// Re-wrap: open each record under its master key and seal it again under `to`, in
    /// one job.
    Rewrap {
        to: u32,
        items: Vec<RewrapItem>,
    },
    /// A chain of MACs: m_0 = prev, m_i = HMAC(m_{i-1} || body_i).
    MacChain {
        kind: MacKey,
        prev: Vec<u8>,
        bodies: Vec<Vec<u8>>,
    },
    Verify {
        kind: MacKey,
        data: Vec<u8>,
        tag: Vec<u8>,
    },
}

impl Op {
    /// The operation's name in metrics (`strongroom_hsm_calls_total{operation}`).
    fn name(&self) -> &'static str {
        match self {
            Op::NewDek { .. } => "new_data_key",
            Op::Unwrap { .. } => "unwrap_data_key",
            Op::StrictSeal { .. } => "strict_seal",
            Op::StrictOpen { .. } => "strict_open",
            Op::Rewrap { .. } => "rewrap",
            Op::MacChain { .. } => "mac_chain",
            Op::Verify { .. } => "mac_verify",
        }
    }
}

enum Reply {
    NewDek(DataKey, WrappedDek),
    Dek(DataKey),
    StrictSealed(StrictSealed),
    Plaintext(Zeroizing<Vec<u8>>),
    Rewrapped(Vec<Result<Rewrapped, HsmError>>),
    Macs(Vec<Vec<u8>>),
    Verified(bool),
}

type ReplyTx = oneshot::Sender<Result<Reply, HsmError>>;

struct Job {
    op: Op,
    reply: ReplyTx,
    /// When the caller stops waiting (`None`: too far ahead to represent). The caller's own
    /// timer enforces it; the worker only uses it to skip work nobody will read.
    deadline: Option<Instant>,
}

/// Most jobs a worker takes from the queue per wake (its share when there are several
/// workers). The rest stay queued for the next round or another worker, which keeps the
/// queue from running dry while the runtime handles the answers of this round.
const MAX_BATCH: usize = 32;

/// How long a finished answer may wait to go out with the next ones, so that one wake of the
/// runtime covers several answers. On a fast token (SoftHSM2: ~18 µs a call) about a dozen
/// go out together; on a slow one (a call as long as this or longer) every answer goes out as
/// soon as it is ready. The caller's deadline is enforced on its side regardless.
const REPLY_HOLD: Duration = Duration::from_micros(300);

/// How long a worker polls an empty queue before it parks. The next job usually arrives
/// within microseconds under load (the runtime is answering the last batch); parking and
/// being woken costs more than that. Short, because on a small machine the runtime needs
/// the CPU to produce that job.
const POLL_BEFORE_PARK: Duration = Duration::from_micros(20);

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

    /// Finds the master keys again (e.g. after an officer generated one).
    pub async fn reload_keys(&self) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.reload_keys())
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Makes a fresh data key with the token's RNG and wraps it under master key `mk`
    /// (C_Encrypt AES-GCM with `aad`). Returns the key in the clear and wrapped.
    pub async fn new_data_key(
        &self,
        mk: u32,
        aad: Vec<u8>,
        deadline: Duration,
    ) -> Result<(DataKey, WrappedDek), HsmError> {
        match self.submit(Op::NewDek { mk, aad }, deadline).await? {
            Reply::NewDek(dek, wrapped) => Ok((dek, wrapped)),
            _ => Err(HsmError::Closed),
        }
    }

    /// Unwraps a data key (C_Decrypt AES-GCM with `aad`) under master key `mk`.
    pub async fn unwrap_data_key(
        &self,
        mk: u32,
        wrapped: Vec<u8>,
        aad: Vec<u8>,
        deadline: Duration,
    ) -> Result<DataKey, HsmError> {
        match self
            .submit(Op::Unwrap { mk, wrapped, aad }, deadline)
            .await?
        {
            Reply::Dek(dek) => Ok(dek),
            _ => Err(HsmError::Closed),
        }
    }

    /// Strict mode: seals `plaintext` inside the token (see [`strict::seal`]) under master key
    /// `mk` with `aad`. The data key never leaves the token in the clear.
    pub async fn strict_seal(
        &self,
        mk: u32,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
        deadline: Duration,
    ) -> Result<StrictSealed, HsmError> {
        match self
            .submit(Op::StrictSeal { mk, aad, plaintext }, deadline)
            .await?
        {
            Reply::StrictSealed(sealed) => Ok(sealed),
            _ => Err(HsmError::Closed),
        }
    }

    /// Strict mode: opens a value inside the token (see [`strict::open`]); only the
    /// plaintext comes out.
    pub async fn strict_open(
        &self,
        mk: u32,
        wrapped: Vec<u8>,
        nonce: Vec<u8>,
        aad: Vec<u8>,
        ciphertext: Vec<u8>,
        deadline: Duration,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let op = Op::StrictOpen {
            mk,
            wrapped,
            nonce,
            aad,
            ciphertext,
        };
        match self.submit(op, deadline).await? {
            Reply::Plaintext(p) => Ok(p),
            _ => Err(HsmError::Closed),
        }
    }

    /// Re-wraps `items` under master key `to` in one job (one trip to a worker): for each,
    /// opens it under its own master key and AAD and seals it again under `to` and its new
    /// AAD with a fresh data key. Envelope records: the old data key is unwrapped
    /// (C_Decrypt), the value opened and sealed again in the worker under a new data key
    /// from the token's RNG, which is wrapped under `to` (C_Encrypt); every host copy (old
    /// key, new key, value) is zeroized when the record is done. Strict records never leave
    /// the token's keys: the old data key is unwrapped into a sensitive, non-extractable
    /// session object and the value decrypted in the token, then sealed in the token under
    /// a new data key wrapped with AES-KW under `to` (as [`strict::open`] then
    /// [`strict::seal`]); only the value passes through host memory, zeroized at once.
    ///
    /// Each answer is the item's: a record that does not authenticate is
    /// [`HsmError::UnwrapAuthentication`] and the others are still done. Any other fault
    /// fails the whole job (after the pool's usual repair and retry).
    pub async fn rewrap(
        &self,
        to: u32,
        items: Vec<RewrapItem>,
        deadline: Duration,
    ) -> Result<Vec<Result<Rewrapped, HsmError>>, HsmError> {
        let n = items.len();
        match self.submit(Op::Rewrap { to, items }, deadline).await? {
            Reply::Rewrapped(out) if out.len() == n => Ok(out),
            _ => Err(HsmError::Closed),
        }
    }

    /// Computes a chain of HMAC-SHA256 tags in the token under MAC key `kind`:
    /// `m_i = HMAC(m_{i-1} || body_i)` with `m_0 = prev`. One queue hop for the whole batch.
    pub async fn mac_chain(
        &self,
        kind: MacKey,
        prev: Vec<u8>,
        bodies: Vec<Vec<u8>>,
        deadline: Duration,
    ) -> Result<Vec<Vec<u8>>, HsmError> {
        match self
            .submit(Op::MacChain { kind, prev, bodies }, deadline)
            .await?
        {
            Reply::Macs(m) => Ok(m),
            _ => Err(HsmError::Closed),
        }
    }

    /// Verifies an HMAC-SHA256 tag in the token.
    pub async fn mac_verify(
        &self,
        kind: MacKey,
        data: Vec<u8>,
        tag: Vec<u8>,
        deadline: Duration,
    ) -> Result<bool, HsmError> {
        match self
            .submit(Op::Verify { kind, data, tag }, deadline)
            .await?
        {
            Reply::Verified(ok) => Ok(ok),
            _ => Err(HsmError::Closed),
        }
    }

    /// Whether the token holds MAC key `kind`.
    pub fn has_mac_key(&self, kind: MacKey) -> bool {
        self.shared
            .macs
            .read()
            .map(|m| m.contains_key(&kind))
            .unwrap_or(false)
    }

    /// Generates the next master key version in the token and starts using it for new
    /// writes; returns its version.
    pub async fn generate_master_key(&self) -> Result<u32, HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let version = shared.with_anchor(keys::generate)?;
            shared.reload_keys()?;
            Ok(version)
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Every master key version's state as the token keeps it (see [`lifecycle`]).
    ///
    /// [`lifecycle`]: super::lifecycle
    pub async fn key_states(&self) -> Result<super::lifecycle::KeyStates, HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.with_anchor(super::lifecycle::KeyStates::read))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Every master key version the token holds (whatever its state), lowest first.
    pub async fn master_keys_in_token(&self) -> Result<Vec<u32>, HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(|a| Ok(keys::find(a)?.into_iter().map(|(v, _)| v).collect()))
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Moves master key `version` to `state` in the token (destroying its object for
    /// [`Destroyed`](super::lifecycle::KeyState::Destroyed)) and finds the keys again, so a
    /// disabled version leaves the keyring at once.
    pub async fn set_key_state(
        &self,
        version: u32,
        state: super::lifecycle::KeyState,
    ) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(|a| super::lifecycle::set_state(a, version, state))?;
            shared.reload_keys()
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Reads a private strongroom data object from the token.
    pub async fn read_data(&self, label: impl Into<String>) -> Result<Option<Vec<u8>>, HsmError> {
        let shared = self.shared.clone();
        let label = label.into();
        tokio::task::spawn_blocking(move || shared.with_anchor(|a| keys::read_data(a, &label)))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Writes a private strongroom data object into the token.
    pub async fn write_data(
        &self,
        label: impl Into<String>,
        value: Vec<u8>,
    ) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        let label = label.into();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(|a| keys::write_data(a, &label, &value))
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    /// Every replica's copy of the data object `base`, as (label, value) (see
    /// [`keys::list_data`]).
    pub async fn list_data(
        &self,
        base: impl Into<String>,
    ) -> Result<Vec<(String, Vec<u8>)>, HsmError> {
        let shared = self.shared.clone();
        let base = base.into();
        tokio::task::spawn_blocking(move || shared.with_anchor(|a| keys::list_data(a, &base)))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Destroys the private data object `label`; whether it existed.
    pub async fn delete_data(&self, label: impl Into<String>) -> Result<bool, HsmError> {
        let shared = self.shared.clone();
        let label = label.into();
        tokio::task::spawn_blocking(move || shared.with_anchor(|a| keys::delete_data(a, &label)))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Reads the audit checkpoint object from the token.
    pub async fn read_checkpoint(&self) -> Result<Option<Vec<u8>>, HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.with_anchor(keys::read_checkpoint))
            .await
            .map_err(|_| HsmError::Closed)?
    }

    /// Writes the audit checkpoint object into the token.
    pub async fn write_checkpoint(&self, value: Vec<u8>) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.with_anchor(|anchor| keys::write_checkpoint(anchor, &value))
        })
        .await
        .map_err(|_| HsmError::Closed)?
    }

    async fn submit(&self, op: Op, deadline: Duration) -> Result<Reply, HsmError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            op,
            reply,
            deadline: Instant::now().checked_add(deadline),
        };
        let run = async {
            self.jobs.send(job).await.map_err(|_| HsmError::Closed)?;
            rx.await.map_err(|_| HsmError::Closed)?
        };
        tokio::time::timeout(deadline, run)
            .await
            .map_err(|_| HsmError::Timeout)?
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

impl Shared {
    /// Runs `f` on the anchor session of the current context.
    fn with_anchor<R>(
        &self,
        mut f: impl FnMut(&Session) -> Result<R, HsmError>,
    ) -> Result<R, HsmError> {
        if self.lost.load(Ordering::Acquire) {
            return Err(HsmError::Unavailable);
        }
        let ctx = self.ctx.read().map_err(|_| HsmError::Closed)?;
        let mut anchor = ctx.anchor.lock().map_err(|_| HsmError::Closed)?;
        let mut result = f(&anchor);
        if let Err(e) = &result
            && e.class() == FaultClass::SessionLost
        {
            // The anchor itself is gone: open a new one, log in, and retry once. Session
            // copies of master keys died with it, so find the keys again in that mode.
            tracing::warn!(error = %e, "the anchor session is lost; reopening it");
            *anchor = open_anchor(&ctx.pkcs11, ctx.slot, &self.pin)?;
            if self.key_copy == KeyCopy::Session {
                self.reload_keys_on(&anchor)?;
            }
            result = f(&anchor);
        }
        if let Err(e) = &result
            && e.class() == FaultClass::TokenLost
        {
            drop(anchor);
            drop(ctx);
            self.mark_lost(e);
        }
        result
    }

    fn reload_keys(&self) -> Result<(), HsmError> {
        self.with_anchor(|anchor| self.reload_keys_on(anchor))
    }

    fn reload_keys_on(&self, anchor: &Session) -> Result<(), HsmError> {
        let mut ring = BTreeMap::new();
        let (trusted, rejected) = keys::find_trusted(anchor)?;
        for why in rejected {
            tracing::error!("refusing a master key: {why}");
        }
        // Disabled and destroyed versions stay out of the keyring (lifecycle.rs).
        let states = super::lifecycle::KeyStates::read(anchor)?;
        for (version, handle) in trusted {
            if !states.get(version).opens() {
                continue;
            }
            let working = match self.key_copy {
                KeyCopy::Token => handle,
                KeyCopy::Session => match keys::session_copy(anchor, handle) {
                    Ok(copy) => copy,
                    // Tokens refuse C_CopyObject with a template on a key that has
                    // CKA_MODIFIABLE=false, as our master keys do: SoftHSM2 with
                    // CKR_ATTRIBUTE_READ_ONLY, Kryoptic with CKR_ACTION_PROHIBITED. Use the
                    // token object.
                    Err(HsmError::Pkcs11 {
                        rv: RvError::AttributeReadOnly | RvError::ActionProhibited,
                        ..
                    }) => {
                        tracing::warn!(
                            version,
                            "the token refuses a session copy of this master key; using the token object"
                        );
                        handle
                    }
                    Err(e) => return Err(e),
                },
            };
            ring.insert(version, working);
        }
        let mut macs = BTreeMap::new();
        for kind in MacKey::ALL {
            if let Some(h) = keys::find_mac(anchor, kind)? {
                macs.insert(kind, h);
            }
        }
        *self.macs.write().map_err(|_| HsmError::Closed)? = macs;
        let mut current = self.keyring.write().map_err(|_| HsmError::Closed)?;
        if self.key_copy == KeyCopy::Session {
            // Old session copies are no longer referenced once the ring is replaced; token
            // objects (used where no copy could be made) are never destroyed here.
            let token_objects: Vec<ObjectHandle> =
                keys::find(anchor)?.into_iter().map(|(_, h)| h).collect();
            for old in current.values().filter(|h| !token_objects.contains(h)) {
                let _ = anchor.destroy_object(*old);
            }
        }
        *current = ring;
        Ok(())
    }

    fn key(&self, mk: u32) -> Result<ObjectHandle, HsmError> {
        self.keyring
            .read()
            .map_err(|_| HsmError::Closed)?
            .get(&mk)
            .copied()
            .ok_or(HsmError::MasterKeyMissing(mk))
    }

    fn keyring_empty(&self) -> bool {
        self.keyring.read().map(|k| k.is_empty()).unwrap_or(true)
    }

    fn mac_key(&self, kind: MacKey) -> Result<ObjectHandle, HsmError> {
        self.macs
            .read()
            .map_err(|_| HsmError::Closed)?
            .get(&kind)
            .copied()
            .ok_or(HsmError::MacKeyMissing(kind.label()))
    }

    fn relogin(&self) -> Result<(), HsmError> {
        self.with_anchor(|anchor| super::login(anchor, &self.pin))
    }

    /// Marks the token lost and wakes the recovery thread.
    fn mark_lost(&self, why: &HsmError) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %why, "the token is lost: answering UNAVAILABLE and re-initialising the PKCS#11 library with backoff");
        }
        if let Ok(mut pending) = self.recover.lock() {
            *pending = true;
        }
        self.recover_signal.notify_all();
    }

    /// Waits for the token to be lost, then re-initialises the library with backoff until
    /// the token is back; the pool then serves again with no process restart.
    fn recovery_loop(self: Arc<Self>) {
        loop {
            {
                let Ok(mut pending) = self.recover.lock() else {
                    return;
                };
                while !*pending && !self.closed.load(Ordering::Acquire) {
                    pending = match self.recover_signal.wait(pending) {
                        Ok(p) => p,
                        Err(_) => return,
                    };
                }
                if self.closed.load(Ordering::Acquire) {
                    return;
                }
                *pending = false;
            }
            let mut backoff = Duration::from_millis(50);
            let mut attempt = 0u32;
            loop {
                if self.closed.load(Ordering::Acquire) {
                    return;
                }
                attempt += 1;
                match self.reinitialise() {
                    Ok(generation) => {
                        self.lost.store(false, Ordering::Release);
                        tracing::info!(generation, attempt, "the token is back: serving again");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, retry_in_ms = backoff.as_millis() as u64, "the token is still unavailable");
                        thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    /// Finalises and initialises the library again, finds the token, logs in and finds the
    /// keys. Old sessions are abandoned, never closed: their handles may be reused.
    fn reinitialise(&self) -> Result<u64, HsmError> {
        let mut ctx = self.ctx.write().map_err(|_| HsmError::Closed)?;
        let _ = ctx.pkcs11.clone().finalize();
        ctx.pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
        let slot = super::find_token(&ctx.pkcs11, &self.selector)?;
        let anchor = open_anchor(&ctx.pkcs11, slot, &self.pin)?;
        self.reload_keys_on(&anchor)?;
        ctx.slot = slot;
        ctx.anchor = Mutex::new(anchor);
        ctx.generation += 1;
        Ok(ctx.generation)
    }
}

struct Worker {
    shared: Arc<Shared>,
    session: Session,
    generation: u64,
}

impl Worker {
    fn run(mut self, jobs: async_channel::Receiver<Job>, workers: usize) {
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        let mut replies: Vec<(ReplyTx, Result<Reply, HsmError>)> = Vec::with_capacity(MAX_BATCH);
        // How long the last job took: the guess for the next one.
        let mut last_took = Duration::ZERO;
        while let Some(first) = next_job(&jobs) {
            batch.push(first);
            // This worker's share of what waits, so that other workers are not left idle.
            let share = (jobs.len() / workers).min(MAX_BATCH - 1);
            for _ in 0..share {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let mut held_since = None;
            for job in batch.drain(..) {
                if job.reply.is_closed() {
                    // The caller's deadline passed while the job waited.
                    continue;
                }
                let now = Instant::now();
                if job.deadline.is_some_and(|d| now >= d) {
                    // The caller is giving up (its timer fires about now): answer as it will.
                    let _ = job.reply.send(Err(HsmError::Timeout));
                    continue;
                }
                // Hold the finished answers only while the next job is expected to be quick.
                if held_since.is_some_and(|t: Instant| now - t + last_took >= REPLY_HOLD) {
                    send_replies(&mut replies);
                    held_since = None;
                }
                let result = self.execute_with_recovery(&job.op);
                let done = Instant::now();
                let class = result.as_ref().err().map(|e| format!("{:?}", e.class()));
                crate::metrics::hsm_call(job.op.name(), done - now, class);
                replies.push((job.reply, result));
                last_took = done - now;
                held_since.get_or_insert(done);
            }
            send_replies(&mut replies);
        }
    }

    /// Runs a job; on a lost session, login or key handle, repairs and retries.
    /// A lost token is handed to the recovery thread and answered UNAVAILABLE at once.
    fn execute_with_recovery(&mut self, op: &Op) -> Result<Reply, HsmError> {
        // Transient faults (a device error on one call) get two retries, other repairable
        // faults one: each on a repaired session, and all within the caller's deadline,
        // which the caller enforces.
        let mut attempts = 0;
        loop {
            if self.shared.lost.load(Ordering::Acquire) {
                return Err(HsmError::Unavailable);
            }
            let result = {
                let ctx = self.shared.ctx.read().map_err(|_| HsmError::Closed)?;
                if self.generation != ctx.generation {
                    // The library was re-initialised: the old session is gone.
                    self.session = ctx.pkcs11.open_ro_session_no_drop(ctx.slot)?;
                    self.generation = ctx.generation;
                }
                self.execute(op)
            };
            let e = match result {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            let class = e.class();
            if class == FaultClass::TokenLost {
                self.shared.mark_lost(&e);
                return Err(e);
            }
            attempts += 1;
            let allowed = if class == FaultClass::Transient { 3 } else { 2 };
            if attempts >= allowed {
                return Err(e);
            }
            let repaired = match class {
                FaultClass::SessionLost | FaultClass::Transient => self.reopen_session(),
                FaultClass::LoginLost => self.shared.relogin(),
                FaultClass::KeyLost => {
                    let had_keys = !self.shared.keyring_empty();
                    self.shared.reload_keys().and_then(|()| {
                        // Every key vanished at once: the token was reloaded or its storage went
                        // away underneath the module. Re-initialise as for a lost token.
                        if had_keys && self.shared.keyring_empty() {
                            self.shared.mark_lost(&e);
                            Err(HsmError::Unavailable)
                        } else {
                            Ok(())
                        }
                    })
                }
                _ => return Err(e),
            };
            tracing::warn!(error = %e, "HSM fault; repairing and retrying");
            if let Err(r) = repaired {
                if r.class() == FaultClass::TokenLost {
                    self.shared.mark_lost(&r);
                }
                return Err(r);
            }
        }
    }

    fn reopen_session(&mut self) -> Result<(), HsmError> {
        let ctx = self.shared.ctx.read().map_err(|_| HsmError::Closed)?;
        self.session = ctx.pkcs11.open_ro_session_no_drop(ctx.slot)?;
        self.generation = ctx.generation;
        Ok(())
    }

    fn execute(&self, op: &Op) -> Result<Reply, HsmError> {
        const TAG_BITS: u64 = GCM_TAG_LEN as u64 * 8;
        match op {
            Op::NewDek { mk, aad } => {
                let key = self.shared.key(*mk)?;
                let mut dek = Zeroizing::new([0u8; DEK_LEN]);
                self.session.generate_random_slice(dek.as_mut())?;
                let mut iv = [0u8; GCM_NONCE_LEN];
                self.session.generate_random_slice(&mut iv)?;
                let ct = gcm::encrypt(&self.session, key, &iv, aad, TAG_BITS, dek.as_ref())?;
                let mut wrapped = Vec::with_capacity(GCM_NONCE_LEN + ct.len());
                wrapped.extend_from_slice(&iv);
                wrapped.extend_from_slice(&ct);
                let dek = DataKey::from_slice(dek.as_ref()).ok_or(HsmError::BadKeyLength)?;
                Ok(Reply::NewDek(dek, wrapped))
            }
            Op::Unwrap { mk, wrapped, aad } => {
                let key = self.shared.key(*mk)?;
                if wrapped.len() != GCM_NONCE_LEN + DEK_LEN + GCM_TAG_LEN {
                    return Err(HsmError::UnwrapAuthentication);
                }
                let (iv, ct) = wrapped.split_at(GCM_NONCE_LEN);
                let plain = gcm::decrypt(&self.session, key, iv, aad, TAG_BITS, ct)?;
                let dek = DataKey::from_slice(&plain).ok_or(HsmError::BadKeyLength)?;
                Ok(Reply::Dek(dek))
            }
            Op::StrictSeal { mk, aad, plaintext } => {
                let key = self.shared.key(*mk)?;
                let sealed = strict::seal(&self.session, key, aad, plaintext)?;
                Ok(Reply::StrictSealed(sealed))
            }
            Op::StrictOpen {
                mk,
                wrapped,
                nonce,
                aad,
                ciphertext,
            } => {
                let key = self.shared.key(*mk)?;
                let plain = strict::open(&self.session, key, wrapped, nonce, aad, ciphertext)?;
                Ok(Reply::Plaintext(plain))
            }
            Op::Rewrap { to, items } => {
                let new_key = self.shared.key(*to)?;
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match self.rewrap_one(new_key, item) {
                        Ok(r) => out.push(Ok(r)),
                        // This record does not open: answered as such, the rest go on.
                        Err(e) if e.class() == FaultClass::Authentication => out.push(Err(e)),
                        // A token fault: the whole job is repaired and retried, or fails.
                        Err(e) => return Err(e),
                    }
                }
                Ok(Reply::Rewrapped(out))
            }
            Op::MacChain { kind, prev, bodies } => {
                let key = self.shared.mac_key(*kind)?;
                let mut macs = Vec::with_capacity(bodies.len());
                let mut last = prev.clone();
                let mut input = Vec::new();
                for body in bodies {
                    input.clear();
                    input.extend_from_slice(&last);
                    input.extend_from_slice(body);
                    last = keys::hmac(&self.session, key, &input)?;
                    macs.push(last.clone());
                }
                Ok(Reply::Macs(macs))
            }
            Op::Verify { kind, data, tag } => {
                let key = self.shared.mac_key(*kind)?;
                Ok(Reply::Verified(keys::hmac_verify(
                    &self.session,
                    key,
                    data,
                    tag,
                )?))
            }
        }
    }
}

impl Worker {
    /// Re-wraps one record of an [`Op::Rewrap`] under `new_key` (see [`Hsm::rewrap`]).
    fn rewrap_one(&self, new_key: ObjectHandle, item: &RewrapItem) -> Result<Rewrapped, HsmError> {
        const TAG_BITS: u64 = GCM_TAG_LEN as u64 * 8;
        let old_key = self.shared.key(item.from_mk)?;
        match item.kind {
            RewrapKind::Strict => {
                let plain = strict::open(
                    &self.session,
                    old_key,
                    &item.wrapped_dek,
                    &item.nonce,
                    &item.old_aad,
                    &item.ciphertext,
                )?;
                let sealed = strict::seal(&self.session, new_key, &item.new_aad, &plain)?;
                drop(plain);
                Ok(Rewrapped {
                    wrapped_dek: sealed.wrapped_dek,
                    nonce: sealed.nonce,
                    ciphertext: sealed.ciphertext,
                })
            }
            RewrapKind::Envelope => {
                if item.wrapped_dek.len() != GCM_NONCE_LEN + DEK_LEN + GCM_TAG_LEN {
                    return Err(HsmError::UnwrapAuthentication);
                }
                let (iv, ct) = item.wrapped_dek.split_at(GCM_NONCE_LEN);
                let old = gcm::decrypt(&self.session, old_key, iv, &item.old_aad, TAG_BITS, ct)?;
                let old = DataKey::from_slice(&old).ok_or(HsmError::BadKeyLength)?;
                let value =
                    crate::envelope::open(&old, &item.nonce, &item.old_aad, &item.ciphertext)
                        .map_err(|_| HsmError::UnwrapAuthentication)?;
                drop(old);
                // The new data key and its wrapping IV in one call to the token's RNG.
                let mut fresh = Zeroizing::new([0u8; DEK_LEN + GCM_NONCE_LEN]);
                self.session.generate_random_slice(fresh.as_mut())?;
                let (dek, iv) = fresh.split_at(DEK_LEN);
                let new = DataKey::from_slice(dek).ok_or(HsmError::BadKeyLength)?;
                let sealed =
                    crate::envelope::seal(&new, &item.new_aad, value.expose()).map_err(|_| {
                        HsmError::InvalidParameter("the system random generator failed")
                    })?;
                drop(value);
                let wrapped = gcm::encrypt(
                    &self.session,
                    new_key,
                    iv,
                    &item.new_aad,
                    TAG_BITS,
                    new.expose(),
                )?;
                drop(new);
                let mut wrapped_dek = Vec::with_capacity(GCM_NONCE_LEN + wrapped.len());
                wrapped_dek.extend_from_slice(iv);
                wrapped_dek.extend_from_slice(&wrapped);
                Ok(Rewrapped {
                    wrapped_dek,
                    nonce: sealed.nonce.to_vec(),
                    ciphertext: sealed.ciphertext,
                })
            }
        }
    }
}

/// The next job: polls the queue for a short while, then parks until one comes. `None` once
/// the queue is closed and empty.
fn next_job(jobs: &async_channel::Receiver<Job>) -> Option<Job> {
    let mut started = None;
    loop {
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(async_channel::TryRecvError::Closed) => return None,
            Err(async_channel::TryRecvError::Empty) => {}
        }
        let now = Instant::now();
        if now - *started.get_or_insert(now) >= POLL_BEFORE_PARK {
            return jobs.recv_blocking().ok();
        }
        thread::yield_now();
    }
}

/// Answers finished jobs; a caller that gave up in the meantime just misses its answer.
fn send_replies(replies: &mut Vec<(ReplyTx, Result<Reply, HsmError>)>) {
    for (reply, result) in replies.drain(..) {
        let _ = reply.send(result);
    }
}

/// Opens the anchor session and logs in. Sessions of the pool are opened "no drop": after a
/// re-initialisation their handles may belong to new sessions, so they are never closed.
fn open_anchor(pkcs11: &Pkcs11, slot: Slot, pin: &AuthPin) -> Result<Session, HsmError> {
    // Read-write: officers' operations through the service create token objects.
    let anchor = pkcs11.open_rw_session_no_drop(slot)?;
    super::login(&anchor, pin)?;
    Ok(anchor)
}

/// The number of workers that fits the token's session limit (one more session is the
/// anchor).
fn fit_workers(pkcs11: &Pkcs11, slot: Slot, wanted: usize) -> Result<usize, HsmError> {
    let info = pkcs11.get_token_info(slot)?;
    let limit = match info.max_session_count() {
        cryptoki::slot::Limit::Max(n) => Some(n as usize),
        _ => None,
    };
    match limit {
        Some(max) if max < 2 => Err(HsmError::InvalidParameter(
            "the token allows fewer than two sessions; strongroom needs an anchor and a worker",
        )),
        Some(max) if wanted + 1 > max => {
            tracing::warn!(
                wanted,
                max,
                "hsm.workers exceeds the token's session limit; using {}",
                max - 1
            );
            Ok(max - 1)
        }
        _ => Ok(wanted),
    }
}
