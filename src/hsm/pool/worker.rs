//! A worker thread: takes jobs from the queue in batches, runs each on its own session with
//! repair and retry, and sends the answers back a few at a time.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use zeroize::Zeroizing;

use crate::envelope::{DEK_LEN, DataKey, GCM_NONCE_LEN, GCM_TAG_LEN};
use crate::hsm::strict;
use crate::hsm::{FaultClass, HsmError, gcm, keys};

use super::job::{Job, Op, Reply, ReplyTx};
use super::{RewrapItem, RewrapKind, Rewrapped, Shared};

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

pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) session: Session,
    pub(super) generation: u64,
}

impl Worker {
    pub(super) fn run(mut self, jobs: async_channel::Receiver<Job>, workers: usize) {
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
