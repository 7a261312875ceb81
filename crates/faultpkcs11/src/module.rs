//! The PKCS#11 module (the cdylib side): a CK_FUNCTION_LIST whose entries forward to the real
//! module's, with fault checks in front of some of them. All of the crate's `unsafe` is here.

#![allow(non_snake_case)] // the entry points keep their PKCS#11 names
#![allow(clippy::too_many_arguments)] // C_GenerateKeyPair, C_UnwrapKey

use std::collections::HashMap;
use std::ffi::c_void;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cryptoki_sys::*;
use libloading::Library;

use crate::config::Config;
use crate::control::{DEFAULT_MODULE, ENV_CONTROL, ENV_MODULE};

// ---------------------------------------------------------------------------------------------
// The real module
// ---------------------------------------------------------------------------------------------

struct Real {
    /// Kept loaded for the life of the process (statics are never dropped), so the function
    /// pointers in `list` stay valid.
    _lib: Library,
    list: CK_FUNCTION_LIST,
}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();

/// The real module's function list, loading the module on first use.
fn real() -> Result<&'static CK_FUNCTION_LIST, CK_RV> {
    match REAL.get_or_init(load_real) {
        Ok(real) => Ok(&real.list),
        Err(_) => Err(CKR_GENERAL_ERROR),
    }
}

/// One entry point of the real module.
fn real_fn<F>(pick: impl FnOnce(&CK_FUNCTION_LIST) -> Option<F>) -> Result<F, CK_RV> {
    pick(real()?).ok_or(CKR_FUNCTION_NOT_SUPPORTED)
}

fn load_real() -> Result<Real, String> {
    let path = std::env::var_os(ENV_MODULE)
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_MODULE), PathBuf::from);
    let result = load_real_from(&path);
    if let Err(e) = &result {
        eprintln!("faultpkcs11: cannot use {}: {e}", path.display());
    }
    result
}

fn load_real_from(path: &std::path::Path) -> Result<Real, String> {
    type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;

    // SAFETY: loading a library runs its initialisers. A PKCS#11 module is built to be
    // dlopen'ed by applications, and which module to load is the test's explicit choice
    // (FAULTPKCS11_MODULE or SoftHSM2's standard path). libloading opens it RTLD_LOCAL, so its
    // C_* symbols do not interpose on anyone else's.
    let lib = unsafe { Library::new(path) }.map_err(|e| e.to_string())?;
    // SAFETY: PKCS#11 2.40 §5.2 gives C_GetFunctionList exactly this signature; we copy the
    // function pointer out, and `lib` (which it points into) is kept alive next to it.
    let get: GetFunctionList = unsafe { lib.get::<GetFunctionList>(b"C_GetFunctionList\0") }
        .map(|symbol| *symbol)
        .map_err(|e| e.to_string())?;
    let ours: GetFunctionList = C_GetFunctionList;
    if get as usize == ours as usize {
        // FAULTPKCS11_MODULE names this very library: calling it would recurse into this
        // OnceLock's initialiser.
        return Err("FAULTPKCS11_MODULE points at faultpkcs11 itself".into());
    }
    let mut list_ptr: *mut CK_FUNCTION_LIST = ptr::null_mut();
    // SAFETY: `get` is the module's C_GetFunctionList (see above); its one argument is a valid,
    // writable pointer to our local.
    let rv = unsafe { get(&mut list_ptr) };
    if rv != CKR_OK || list_ptr.is_null() {
        return Err(format!("its C_GetFunctionList answered {rv:#x}"));
    }
    // SAFETY: on CKR_OK the module has stored a pointer to its function list, which it keeps
    // valid while it is loaded (we never unload it); we read it once and keep a copy.
    // CK_FUNCTION_LIST (2.40 layout) is plain data: a version and 68 nullable fn pointers.
    let list = unsafe { list_ptr.read() };
    Ok(Real { _lib: lib, list })
}

// ---------------------------------------------------------------------------------------------
// Fault state
// ---------------------------------------------------------------------------------------------

static FAULTS: AtomicU64 = AtomicU64::new(0);

/// Counts one injected fault and returns its code.
fn fault(rv: CK_RV) -> CK_RV {
    FAULTS.fetch_add(1, Ordering::Relaxed);
    rv
}

/// The number of faults this module has injected in this process (every answer it made up
/// instead of the real module's). Exported for tests that load the module with `dlopen`.
#[unsafe(no_mangle)]
pub extern "C" fn faultpkcs11_faults_injected() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// What identifies one version of the control file without reading it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FileSig {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileSig {
    fn of(m: &std::fs::Metadata) -> FileSig {
        FileSig {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }

    /// File timestamps come from a coarse clock (one tick, up to 10 ms), and the rename of a new
    /// version can reuse the inode of the version it replaces: two versions written in one tick
    /// may look the same. Like git's "racily clean" rule, a version whose mtime is within a
    /// second of when we read it is re-read on every call until it is older than that.
    fn is_racy(&self, read_at: SystemTime) -> bool {
        let mtime_ns = i128::from(self.mtime) * 1_000_000_000 + i128::from(self.mtime_nsec);
        let read_ns = read_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        mtime_ns + 1_000_000_000 > read_ns
    }
}

struct Cached {
    sig: Option<FileSig>,
    racy: bool,
}

#[derive(Debug, Clone, Copy)]
struct SessionEntry {
    slot: CK_SLOT_ID,
    /// The generation it was opened in; it is dead once the state's generation moves on.
    generation: u64,
}

struct State {
    control: Option<PathBuf>,
    /// None until the control file has been looked at once.
    cached: Option<Cached>,
    config: Config,
    /// Bumped by `invalidate_sessions` increases and by the token's return.
    generation: u64,
    /// Set by `drop_login` increases and token loss; cleared by a successful C_Login.
    login_required: bool,
    /// Sessions opened through this module and not yet closed.
    sessions: HashMap<CK_SESSION_HANDLE, SessionEntry>,
    rng: u64,
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| Mutex::new(State::new()));

/// The state, with the control file re-read if it changed.
fn state() -> MutexGuard<'static, State> {
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    state.refresh();
    state
}

impl State {
    fn new() -> State {
        let time_seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        State {
            control: std::env::var_os(ENV_CONTROL)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            cached: None,
            config: Config::default(),
            generation: 0,
            login_required: false,
            sessions: HashMap::new(),
            rng: seed_rng(time_seed ^ u64::from(std::process::id()).rotate_left(32)),
        }
    }

    /// One stat per call; the file is read only when it changed (or is racily new).
    fn refresh(&mut self) {
        let Some(path) = self.control.as_ref() else {
            return;
        };
        let sig = std::fs::metadata(path).ok().map(|m| FileSig::of(&m));
        if let Some(cached) = &self.cached {
            if cached.sig == sig && !cached.racy {
                return;
            }
        }
        let read_at = SystemTime::now();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(_) => return, // keep the current settings; try again on the next call
        };
        let first = self.cached.is_none();
        self.cached = Some(Cached {
            sig,
            racy: sig.is_some_and(|s| s.is_racy(read_at)),
        });
        self.apply(Config::parse(&text), first);
    }

    /// Takes a new version of the file. The first version read is the baseline: counters
    /// trigger only when they increase after that.
    fn apply(&mut self, new: Config, first: bool) {
        if !first {
            let old = &self.config;
            if old.token_present != new.token_present {
                // Gone or back: either way the login does not survive it.
                self.login_required = true;
                if new.token_present {
                    self.generation += 1;
                }
            }
            if new.invalidate_sessions > old.invalidate_sessions {
                self.generation += 1;
            }
            if new.drop_login > old.drop_login {
                self.login_required = true;
            }
        }
        if let Some(seed) = new.seed {
            if first || self.config.seed != Some(seed) {
                self.rng = seed_rng(seed);
            }
        }
        self.config = new;
    }

    /// Slot-level calls that need the token (C_GetTokenInfo, C_OpenSession, …).
    fn token_check(&self, _slot: CK_SLOT_ID) -> Option<CK_RV> {
        (!self.config.token_present).then_some(CKR_TOKEN_NOT_PRESENT)
    }

    /// Any call on an existing session.
    fn session_check(&self, session: CK_SESSION_HANDLE) -> Option<CK_RV> {
        if !self.config.token_present {
            return Some(CKR_DEVICE_REMOVED);
        }
        match self.sessions.get(&session) {
            Some(s) if s.generation != self.generation => Some(CKR_SESSION_HANDLE_INVALID),
            // Handles we did not open are the real module's business.
            _ => None,
        }
    }

    /// Crypto and object calls: the session must be alive and the login current.
    fn login_check(&self, session: CK_SESSION_HANDLE) -> Option<CK_RV> {
        self.session_check(session)
            .or_else(|| self.login_required.then_some(CKR_USER_NOT_LOGGED_IN))
    }

    /// Calls with no fault of their own.
    fn no_check<T>(&self, _first_arg: T) -> Option<CK_RV> {
        None
    }

    fn live_sessions(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| s.generation == self.generation)
            .count()
    }

    fn latency(&self) -> Duration {
        Duration::from_millis(self.config.latency_ms)
    }

    /// Whether this call gets a CKR_DEVICE_ERROR (xorshift64*).
    fn roll_device_error(&mut self) -> bool {
        let rate = self.config.device_error_rate;
        if rate <= 0.0 {
            return false;
        }
        if rate >= 1.0 {
            return true;
        }
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 / (1u64 << 53) as f64) < rate
    }
}

fn seed_rng(seed: u64) -> u64 {
    // splitmix64 step, so that small seeds give well-mixed, non-zero xorshift states.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

/// Runs a check against fresh state; a fault it finds is counted.
fn guard(check: impl FnOnce(&State) -> Option<CK_RV>) -> Option<CK_RV> {
    check(&state()).map(fault)
}

/// For the calls that may sleep or fail with CKR_DEVICE_ERROR: the check's fault, or the
/// latency to add and whether to inject a device error.
fn crypto_preamble(
    session: CK_SESSION_HANDLE,
    needs_login: bool,
    may_fail: bool,
) -> Result<(Duration, bool), CK_RV> {
    let mut state = state();
    let check = if needs_login {
        state.login_check(session)
    } else {
        state.session_check(session)
    };
    if let Some(rv) = check {
        return Err(fault(rv));
    }
    let inject = may_fail && state.roll_device_error();
    Ok((state.latency(), inject))
}

fn sleep(latency: Duration) {
    if !latency.is_zero() {
        std::thread::sleep(latency);
    }
}

// ---------------------------------------------------------------------------------------------
// Plain forwarding wrappers
// ---------------------------------------------------------------------------------------------

/// Defines wrappers that run `State::$check(first argument)` and, if it finds no fault, call the
/// real module's function of the same name with the same arguments.
macro_rules! forward {
    ($check:ident: $( $name:ident($first:ident: $first_ty:ty $(, $arg:ident: $ty:ty)* $(,)?); )*) => {$(
        unsafe extern "C" fn $name($first: $first_ty $(, $arg: $ty)*) -> CK_RV {
            let f = match real_fn(|list| list.$name) {
                Ok(f) => f,
                Err(rv) => return rv,
            };
            if let Some(rv) = guard(|state| state.$check($first)) {
                return rv;
            }
            // SAFETY: `f` is the real module's entry point of the same name and type, from the
            // function list it gave us (kept loaded for good). The arguments are our caller's,
            // unchanged: the caller owes us the same PKCS#11 contract the real module expects.
            unsafe { f($first $(, $arg)*) }
        }
    )*};
}

forward! { no_check:
    C_Initialize(p_init_args: *mut c_void);
    C_GetInfo(p_info: *mut CK_INFO);
    C_WaitForSlotEvent(flags: CK_FLAGS, p_slot: *mut CK_SLOT_ID, p_reserved: *mut c_void);
}

forward! { token_check:
    C_GetTokenInfo(slot: CK_SLOT_ID, p_info: *mut CK_TOKEN_INFO);
    C_GetMechanismList(slot: CK_SLOT_ID, p_list: *mut CK_MECHANISM_TYPE, pul_count: *mut CK_ULONG);
    C_GetMechanismInfo(slot: CK_SLOT_ID, mech: CK_MECHANISM_TYPE, p_info: *mut CK_MECHANISM_INFO);
    C_InitToken(slot: CK_SLOT_ID, p_pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG, p_label: *mut CK_UTF8CHAR);
}

forward! { session_check:
    C_InitPIN(h: CK_SESSION_HANDLE, p_pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG);
    C_SetPIN(h: CK_SESSION_HANDLE, p_old: *mut CK_UTF8CHAR, old_len: CK_ULONG, p_new: *mut CK_UTF8CHAR, new_len: CK_ULONG);
    C_GetOperationState(h: CK_SESSION_HANDLE, p_state: *mut CK_BYTE, pul_len: *mut CK_ULONG);
    C_SetOperationState(h: CK_SESSION_HANDLE, p_state: *mut CK_BYTE, len: CK_ULONG, h_enc_key: CK_OBJECT_HANDLE, h_auth_key: CK_OBJECT_HANDLE);
    C_Logout(h: CK_SESSION_HANDLE);
    C_DigestInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM);
    C_Digest(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_digest: *mut CK_BYTE, pul_digest_len: *mut CK_ULONG);
    C_DigestUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG);
    C_DigestFinal(h: CK_SESSION_HANDLE, p_digest: *mut CK_BYTE, pul_digest_len: *mut CK_ULONG);
    C_SeedRandom(h: CK_SESSION_HANDLE, p_seed: *mut CK_BYTE, len: CK_ULONG);
    C_GetFunctionStatus(h: CK_SESSION_HANDLE);
    C_CancelFunction(h: CK_SESSION_HANDLE);
}

forward! { login_check:
    C_CreateObject(h: CK_SESSION_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph_object: *mut CK_OBJECT_HANDLE);
    C_CopyObject(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph_new: *mut CK_OBJECT_HANDLE);
    C_DestroyObject(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE);
    C_GetObjectSize(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, pul_size: *mut CK_ULONG);
    C_GetAttributeValue(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    C_SetAttributeValue(h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    C_FindObjectsInit(h: CK_SESSION_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    C_FindObjects(h: CK_SESSION_HANDLE, ph_objects: *mut CK_OBJECT_HANDLE, max: CK_ULONG, pul_count: *mut CK_ULONG);
    C_FindObjectsFinal(h: CK_SESSION_HANDLE);
    C_EncryptInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_EncryptUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, pul_out_len: *mut CK_ULONG);
    C_EncryptFinal(h: CK_SESSION_HANDLE, p_out: *mut CK_BYTE, pul_out_len: *mut CK_ULONG);
    C_DecryptInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_DecryptUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, pul_out_len: *mut CK_ULONG);
    C_DecryptFinal(h: CK_SESSION_HANDLE, p_out: *mut CK_BYTE, pul_out_len: *mut CK_ULONG);
    C_DigestKey(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE);
    C_SignInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_SignUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG);
    C_SignFinal(h: CK_SESSION_HANDLE, p_sig: *mut CK_BYTE, pul_sig_len: *mut CK_ULONG);
    C_SignRecoverInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_SignRecover(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_sig: *mut CK_BYTE, pul_sig_len: *mut CK_ULONG);
    C_VerifyInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_VerifyUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG);
    C_VerifyFinal(h: CK_SESSION_HANDLE, p_sig: *mut CK_BYTE, sig_len: CK_ULONG);
    C_VerifyRecoverInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_VerifyRecover(h: CK_SESSION_HANDLE, p_sig: *mut CK_BYTE, sig_len: CK_ULONG, p_data: *mut CK_BYTE, pul_data_len: *mut CK_ULONG);
    C_DigestEncryptUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, pul_out_len: *mut CK_ULONG);
    C_DecryptDigestUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, pul_out_len: *mut CK_ULONG);
    C_SignEncryptUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, pul_out_len: *mut CK_ULONG);
    C_DecryptVerifyUpdate(h: CK_SESSION_HANDLE, p_part: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, pul_out_len: *mut CK_ULONG);
    C_GenerateKey(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph_key: *mut CK_OBJECT_HANDLE);
    C_GenerateKeyPair(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, p_pub: *mut CK_ATTRIBUTE, pub_count: CK_ULONG, p_priv: *mut CK_ATTRIBUTE, priv_count: CK_ULONG, ph_pub: *mut CK_OBJECT_HANDLE, ph_priv: *mut CK_OBJECT_HANDLE);
    C_WrapKey(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, wrapping_key: CK_OBJECT_HANDLE, key: CK_OBJECT_HANDLE, p_wrapped: *mut CK_BYTE, pul_wrapped_len: *mut CK_ULONG);
    C_UnwrapKey(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, unwrapping_key: CK_OBJECT_HANDLE, p_wrapped: *mut CK_BYTE, wrapped_len: CK_ULONG, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph_key: *mut CK_OBJECT_HANDLE);
    C_DeriveKey(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, base_key: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph_key: *mut CK_OBJECT_HANDLE);
}

// ---------------------------------------------------------------------------------------------
// Wrappers with more to do
// ---------------------------------------------------------------------------------------------

/// The only symbol the module exports besides the fault counter: PKCS#11 2.40's entry point.
/// No `C_GetInterface` (PKCS#11 3.0) on purpose: cryptoki 0.12 prefers it when a module has it,
/// and without it cryptoki falls back to this function, i.e. to our forwarding list.
///
/// # Safety
///
/// `pp_list` must be null or point to writable memory for one pointer. The list returned must
/// not be written to (PKCS#11 treats it as read-only; it is a static).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(pp_list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if pp_list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    if let Err(rv) = real() {
        return rv;
    }
    // Take the control file's first version as the baseline now, before any session exists.
    drop(state());
    // SAFETY: `pp_list` is non-null and the caller guarantees it is writable (see above). The
    // pointer we store is to a static that lives as long as the library; callers only read it.
    unsafe { pp_list.write(ptr::addr_of!(FUNCTION_LIST).cast_mut()) };
    CKR_OK
}

unsafe extern "C" fn C_Finalize(p_reserved: *mut c_void) -> CK_RV {
    let f = match real_fn(|list| list.C_Finalize) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    // SAFETY: the real module's C_Finalize, with our caller's argument unchanged.
    let rv = unsafe { f(p_reserved) };
    if rv == CKR_OK {
        let mut state = state();
        state.sessions.clear();
        state.login_required = false;
    }
    rv
}

unsafe extern "C" fn C_GetSlotList(
    token_present: CK_BBOOL,
    p_slot_list: *mut CK_SLOT_ID,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    let f = match real_fn(|list| list.C_GetSlotList) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    if token_present != CK_FALSE && !state().config.token_present {
        // The token is gone: no slot has one.
        if pul_count.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        // SAFETY: non-null, and PKCS#11 requires pulCount to point to a writable CK_ULONG.
        unsafe { pul_count.write(0) };
        fault(CKR_OK);
        return CKR_OK;
    }
    // SAFETY: the real module's C_GetSlotList, with our caller's arguments unchanged.
    unsafe { f(token_present, p_slot_list, pul_count) }
}

unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, p_info: *mut CK_SLOT_INFO) -> CK_RV {
    let f = match real_fn(|list| list.C_GetSlotInfo) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    // SAFETY: the real module's C_GetSlotInfo, with our caller's arguments unchanged.
    let rv = unsafe { f(slot, p_info) };
    if rv == CKR_OK && !p_info.is_null() && !state().config.token_present {
        // SAFETY: the real module has just filled `*p_info` (it answered CKR_OK), so it is a
        // valid, writable CK_SLOT_INFO provided by our caller.
        unsafe { (*p_info).flags &= !CKF_TOKEN_PRESENT };
    }
    rv
}

unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    p_application: *mut c_void,
    notify: CK_NOTIFY,
    ph_session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    let f = match real_fn(|list| list.C_OpenSession) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    // The lock is held across the real call so that the session limit is exact under threads.
    // (A module that invoked `notify` from inside C_OpenSession would deadlock a callback that
    // re-entered us; SoftHSM2 never invokes it.)
    let mut state = state();
    if let Some(rv) = state.token_check(slot) {
        return fault(rv);
    }
    if let Some(max) = state.config.max_sessions {
        if state.live_sessions() as u64 >= max {
            return fault(CKR_SESSION_COUNT);
        }
    }
    // SAFETY: the real module's C_OpenSession, with our caller's arguments unchanged.
    let rv = unsafe { f(slot, flags, p_application, notify, ph_session) };
    if rv == CKR_OK && !ph_session.is_null() {
        // SAFETY: on CKR_OK the real module has stored the new handle in `*ph_session`, a valid
        // CK_SESSION_HANDLE location provided by our caller.
        let handle = unsafe { ph_session.read() };
        let generation = state.generation;
        state
            .sessions
            .insert(handle, SessionEntry { slot, generation });
    }
    rv
}

unsafe extern "C" fn C_CloseSession(h: CK_SESSION_HANDLE) -> CK_RV {
    let f = match real_fn(|list| list.C_CloseSession) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    // Forget the handle before the real module can hand it out again, and close the real session
    // even when it is dead to the application, so the real module does not leak it.
    let made_up = {
        let mut state = state();
        let check = state.session_check(h);
        state.sessions.remove(&h);
        check
    };
    // SAFETY: the real module's C_CloseSession, with our caller's argument unchanged.
    let rv = unsafe { f(h) };
    made_up.map_or(rv, fault)
}

unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    let f = match real_fn(|list| list.C_CloseAllSessions) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    // Held across the call, like C_OpenSession, so no open on this slot interleaves.
    let mut state = state();
    // SAFETY: the real module's C_CloseAllSessions, with our caller's argument unchanged.
    let rv = unsafe { f(slot) };
    if rv == CKR_OK {
        state.sessions.retain(|_, s| s.slot != slot);
    }
    state.token_check(slot).map_or(rv, fault)
}

unsafe extern "C" fn C_GetSessionInfo(h: CK_SESSION_HANDLE, p_info: *mut CK_SESSION_INFO) -> CK_RV {
    let f = match real_fn(|list| list.C_GetSessionInfo) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    if let Some(rv) = guard(|state| state.session_check(h)) {
        return rv;
    }
    // SAFETY: the real module's C_GetSessionInfo, with our caller's arguments unchanged.
    let rv = unsafe { f(h, p_info) };
    if rv == CKR_OK && !p_info.is_null() && state().login_required {
        // SAFETY: the real module has just filled `*p_info` (it answered CKR_OK), so it is a
        // valid, writable CK_SESSION_INFO provided by our caller.
        let info = unsafe { &mut *p_info };
        // Report the login we pretend is gone.
        info.state = match info.state {
            CKS_RO_USER_FUNCTIONS => CKS_RO_PUBLIC_SESSION,
            CKS_RW_USER_FUNCTIONS | CKS_RW_SO_FUNCTIONS => CKS_RW_PUBLIC_SESSION,
            other => other,
        };
    }
    rv
}

unsafe extern "C" fn C_Login(
    h: CK_SESSION_HANDLE,
    user_type: CK_USER_TYPE,
    p_pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    let f = match real_fn(|list| list.C_Login) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    if let Some(rv) = guard(|state| state.session_check(h)) {
        return rv;
    }
    // SAFETY: the real module's C_Login, with our caller's arguments unchanged.
    let rv = unsafe { f(h, user_type, p_pin, pin_len) };
    // The real module may still be logged in from before the fault: that counts as logging in
    // again (the answer is passed through as it is).
    if rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN {
        state().login_required = false;
    }
    rv
}

/// C_Encrypt, C_Decrypt and C_Sign share this shape.
type OneShot = unsafe extern "C" fn(
    CK_SESSION_HANDLE,
    *mut CK_BYTE,
    CK_ULONG,
    *mut CK_BYTE,
    *mut CK_ULONG,
) -> CK_RV;

/// The checks, latency and device errors of C_Encrypt, C_Decrypt and C_Sign.
///
/// # Safety
///
/// `f` is the real module's C_Encrypt, C_Decrypt or C_Sign, and the other arguments are what our
/// caller passed to ours (valid under the PKCS#11 contract of that function).
unsafe fn one_shot(
    f: OneShot,
    h: CK_SESSION_HANDLE,
    p_in: *mut CK_BYTE,
    in_len: CK_ULONG,
    p_out: *mut CK_BYTE,
    pul_out_len: *mut CK_ULONG,
) -> CK_RV {
    let (latency, inject) = match crypto_preamble(h, true, true) {
        Ok(plan) => plan,
        Err(rv) => return rv,
    };
    sleep(latency);
    if inject {
        // SAFETY: this function's own contract (`f`, `p_in` and `in_len` as our caller gave them).
        unsafe { end_one_shot(f, h, p_in, in_len) };
        return fault(CKR_DEVICE_ERROR);
    }
    // SAFETY: this function's own contract: the real function, with the caller's arguments.
    unsafe { f(h, p_in, in_len, p_out, pul_out_len) }
}

/// A failed C_Encrypt/C_Decrypt/C_Sign ends the operation (PKCS#11 §5.2), but the real module
/// never saw our made-up failure and would keep its operation active: the next C_EncryptInit on
/// the session would answer CKR_OPERATION_ACTIVE. So run the real call into a scratch buffer and
/// throw the result away.
///
/// # Safety
///
/// As for [`one_shot`].
unsafe fn end_one_shot(f: OneShot, h: CK_SESSION_HANDLE, p_in: *mut CK_BYTE, in_len: CK_ULONG) {
    let mut needed: CK_ULONG = 0;
    // SAFETY: a length query (null output, our local as the length); input as our caller gave it.
    let rv = unsafe { f(h, p_in, in_len, ptr::null_mut(), &mut needed) };
    if rv != CKR_OK {
        return; // a failure other than CKR_BUFFER_TOO_SMALL has already ended it
    }
    let Ok(size) = usize::try_from(needed) else {
        return;
    };
    let mut scratch = vec![0u8; size.max(1)];
    let mut len = needed;
    // SAFETY: `scratch` is writable for `needed` bytes (at least) and `len` says so; input as
    // our caller gave it.
    unsafe { f(h, p_in, in_len, scratch.as_mut_ptr(), &mut len) };
    scratch.fill(0);
    std::hint::black_box(&scratch);
}

unsafe extern "C" fn C_Encrypt(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    data_len: CK_ULONG,
    p_out: *mut CK_BYTE,
    pul_out_len: *mut CK_ULONG,
) -> CK_RV {
    match real_fn(|list| list.C_Encrypt) {
        // SAFETY: `f` is the real C_Encrypt; the arguments are our caller's, unchanged.
        Ok(f) => unsafe { one_shot(f, h, p_data, data_len, p_out, pul_out_len) },
        Err(rv) => rv,
    }
}

unsafe extern "C" fn C_Decrypt(
    h: CK_SESSION_HANDLE,
    p_enc: *mut CK_BYTE,
    enc_len: CK_ULONG,
    p_out: *mut CK_BYTE,
    pul_out_len: *mut CK_ULONG,
) -> CK_RV {
    match real_fn(|list| list.C_Decrypt) {
        // SAFETY: `f` is the real C_Decrypt; the arguments are our caller's, unchanged.
        Ok(f) => unsafe { one_shot(f, h, p_enc, enc_len, p_out, pul_out_len) },
        Err(rv) => rv,
    }
}

unsafe extern "C" fn C_Sign(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    data_len: CK_ULONG,
    p_sig: *mut CK_BYTE,
    pul_sig_len: *mut CK_ULONG,
) -> CK_RV {
    match real_fn(|list| list.C_Sign) {
        // SAFETY: `f` is the real C_Sign; the arguments are our caller's, unchanged.
        Ok(f) => unsafe { one_shot(f, h, p_data, data_len, p_sig, pul_sig_len) },
        Err(rv) => rv,
    }
}

unsafe extern "C" fn C_Verify(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    data_len: CK_ULONG,
    p_sig: *mut CK_BYTE,
    sig_len: CK_ULONG,
) -> CK_RV {
    let f = match real_fn(|list| list.C_Verify) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    let (latency, inject) = match crypto_preamble(h, true, true) {
        Ok(plan) => plan,
        Err(rv) => return rv,
    };
    sleep(latency);
    // SAFETY: the real module's C_Verify, with our caller's arguments unchanged. C_Verify always
    // ends the operation, so for an injected error it is called and its answer thrown away.
    let rv = unsafe { f(h, p_data, data_len, p_sig, sig_len) };
    if inject { fault(CKR_DEVICE_ERROR) } else { rv }
}

unsafe extern "C" fn C_GenerateRandom(
    h: CK_SESSION_HANDLE,
    p_random: *mut CK_BYTE,
    len: CK_ULONG,
) -> CK_RV {
    let f = match real_fn(|list| list.C_GenerateRandom) {
        Ok(f) => f,
        Err(rv) => return rv,
    };
    let (latency, _) = match crypto_preamble(h, false, false) {
        Ok(plan) => plan,
        Err(rv) => return rv,
    };
    sleep(latency);
    // SAFETY: the real module's C_GenerateRandom, with our caller's arguments unchanged.
    unsafe { f(h, p_random, len) }
}

// ---------------------------------------------------------------------------------------------
// The function list
// ---------------------------------------------------------------------------------------------

/// PKCS#11 2.40 layout: a version and 68 entry points, every one of them ours.
static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_of_the_list_is_filled() {
        // 68 entry points after the 8-byte version, all non-null.
        const N: usize = 68;
        assert_eq!(
            std::mem::size_of::<CK_FUNCTION_LIST>(),
            8 + N * std::mem::size_of::<usize>()
        );
        // SAFETY: CK_FUNCTION_LIST is repr(C): a CK_VERSION padded to 8 bytes, then N
        // Option<fn> fields, each pointer-sized with None as the null pointer. Reading them as
        // N usize values is reading initialised plain data of the same size and alignment.
        let entries: [usize; N] = unsafe {
            ptr::addr_of!(FUNCTION_LIST)
                .cast::<u8>()
                .add(8)
                .cast::<[usize; N]>()
                .read()
        };
        assert!(entries.iter().all(|&p| p != 0));
    }

    #[test]
    fn counters_trigger_on_increase_only_after_the_baseline() {
        let mut s = State::new();
        s.apply(
            Config {
                invalidate_sessions: 5,
                drop_login: 5,
                ..Config::default()
            },
            true,
        );
        assert_eq!(s.generation, 0);
        assert!(!s.login_required);
        s.apply(
            Config {
                invalidate_sessions: 6,
                drop_login: 5,
                ..Config::default()
            },
            false,
        );
        assert_eq!(s.generation, 1);
        assert!(!s.login_required);
        s.apply(
            Config {
                invalidate_sessions: 6,
                drop_login: 6,
                ..Config::default()
            },
            false,
        );
        assert_eq!(s.generation, 1);
        assert!(s.login_required);
    }

    #[test]
    fn device_error_rate_is_roughly_right() {
        let mut s = State::new();
        s.apply(
            Config {
                device_error_rate: 0.25,
                seed: Some(1),
                ..Config::default()
            },
            true,
        );
        let hits = (0..100_000).filter(|_| s.roll_device_error()).count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
    }
}
