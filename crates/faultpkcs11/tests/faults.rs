//! End-to-end tests of libfaultpkcs11.so over SoftHSM2, driven through cryptoki 0.12.
//!
//! Each test sets process-wide state (SOFTHSM2_CONF, FAULTPKCS11_CONTROL, one C_Initialize), so
//! they need one process per test: run them with `cargo nextest run -p faultpkcs11`. The module
//! must be built first (`cargo build -p faultpkcs11`; `cargo nextest run -p faultpkcs11` builds
//! it, since it builds the package's lib targets).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use faultpkcs11::Control;

const LABEL: &str = "faultpkcs11-test";
const SO_PIN: &str = "so-pin-12345678";
const USER_PIN: &str = "user-pin-12345678";
const KEY_LABEL: &[u8] = b"master-1";
const PLAINTEXT: &[u8] = b"a 32-byte data key, more or less";

/// Sets an environment variable of this test process.
#[allow(unsafe_code)]
fn set_env(key: &str, value: &Path) {
    // SAFETY: called at the start of a test, before this process loads any PKCS#11 module or
    // starts threads of its own; nextest runs every test in its own process, so no other test
    // thread reads or writes the environment concurrently.
    unsafe { std::env::set_var(key, value) }
}

fn pin(s: &str) -> AuthPin {
    AuthPin::new(String::from(s).into_boxed_str())
}

fn rv<T: std::fmt::Debug>(result: cryptoki::error::Result<T>) -> RvError {
    match result {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

struct Fixture {
    // Field order is drop order: the session closes before the context goes.
    session: Session,
    key: ObjectHandle,
    slot: Slot,
    pkcs11: Pkcs11,
    control: Control,
    _dir: tempfile::TempDir,
}

/// A fresh SoftHSM2 token initialised through the shim, a user-logged-in RW session on it and
/// an AES-256 token key.
fn setup() -> Fixture {
    static ONCE: AtomicBool = AtomicBool::new(false);
    assert!(
        !ONCE.swap(true, Ordering::SeqCst),
        "one fixture per process: run these tests with `cargo nextest run -p faultpkcs11`"
    );

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        ),
    )
    .unwrap();
    let control = Control::new(dir.path().join("faults"));
    control.clear().unwrap();
    set_env("SOFTHSM2_CONF", &conf);
    set_env(faultpkcs11::ENV_CONTROL, control.path());

    let lib = faultpkcs11::library_path()
        .expect("libfaultpkcs11.so not found: run `cargo build -p faultpkcs11` first");
    let pkcs11 = Pkcs11::new(&lib).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();

    let free = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| !pkcs11.get_token_info(s).unwrap().token_initialized())
        .expect("a free slot");
    pkcs11.init_token(free, &pin(SO_PIN), LABEL).unwrap();
    let slot = find_slot(&pkcs11).expect("the new token");

    let session = pkcs11.open_rw_session(slot).unwrap();
    session.login(UserType::So, Some(&pin(SO_PIN))).unwrap();
    session.init_pin(&pin(USER_PIN)).unwrap();
    session.logout().unwrap();
    session.login(UserType::User, Some(&pin(USER_PIN))).unwrap();

    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Label(KEY_LABEL.to_vec()),
    ];
    let key = session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .unwrap();
    Fixture {
        session,
        key,
        slot,
        pkcs11,
        control,
        _dir: dir,
    }
}

/// The slot holding our token, among the slots the module says have a token.
fn find_slot(pkcs11: &Pkcs11) -> Option<Slot> {
    pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| pkcs11.get_token_info(s).is_ok_and(|t| t.label() == LABEL))
}

fn encrypt(session: &Session, key: ObjectHandle) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = [7u8; 12];
    let params = GcmParams::new(&mut iv, b"aad", 128.into())?;
    session.encrypt(&Mechanism::AesGcm(params), key, PLAINTEXT)
}

fn decrypt(session: &Session, key: ObjectHandle, ct: &[u8]) -> cryptoki::error::Result<Vec<u8>> {
    let mut iv = [7u8; 12];
    let params = GcmParams::new(&mut iv, b"aad", 128.into())?;
    session.decrypt(&Mechanism::AesGcm(params), key, ct)
}

fn user_login(session: &Session) {
    match session.login(UserType::User, Some(&pin(USER_PIN))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
}

fn find_key(session: &Session) -> cryptoki::error::Result<Vec<ObjectHandle>> {
    session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(KEY_LABEL.to_vec()),
    ])
}

/// The module's count of injected faults, read through its exported symbol.
fn faults_injected() -> u64 {
    let path = faultpkcs11::library_path().unwrap();
    // SAFETY: this is the library cryptoki already loaded in this process (dlopen returns the
    // same instance); its initialisers have run. `faultpkcs11_faults_injected` is defined by
    // this crate as `extern "C" fn() -> u64`, and we call it while `lib` is alive.
    unsafe {
        let lib = libloading::Library::new(path).unwrap();
        let f = lib
            .get::<unsafe extern "C" fn() -> u64>(b"faultpkcs11_faults_injected\0")
            .unwrap();
        f()
    }
}

#[test]
fn forwards_gcm_without_faults() {
    let fx = setup();
    let ct = encrypt(&fx.session, fx.key).unwrap();
    assert_eq!(ct.len(), PLAINTEXT.len() + 16);
    assert_eq!(decrypt(&fx.session, fx.key, &ct).unwrap(), PLAINTEXT);
    assert_eq!(find_key(&fx.session).unwrap(), vec![fx.key]);
    // Same IV, key and AAD: GCM is deterministic.
    let other = fx.pkcs11.open_ro_session(fx.slot).unwrap();
    assert_eq!(encrypt(&other, fx.key).unwrap(), ct);
    let info = fx.pkcs11.get_library_info().unwrap();
    assert_eq!(info.manufacturer_id(), "SoftHSM");
    assert_eq!(faults_injected(), 0);
}

#[test]
fn token_goes_away_and_comes_back() {
    let fx = setup();
    encrypt(&fx.session, fx.key).unwrap();

    fx.control.token_present(false).unwrap();
    assert_eq!(rv(encrypt(&fx.session, fx.key)), RvError::DeviceRemoved);
    assert_eq!(
        rv(fx.session.generate_random_vec(16)),
        RvError::DeviceRemoved
    );
    assert_eq!(rv(fx.session.get_session_info()), RvError::DeviceRemoved);
    assert!(fx.pkcs11.get_slots_with_token().unwrap().is_empty());
    assert_eq!(
        rv(fx.pkcs11.get_token_info(fx.slot)),
        RvError::TokenNotPresent
    );
    assert_eq!(
        rv(fx.pkcs11.open_rw_session(fx.slot)),
        RvError::TokenNotPresent
    );
    // The slot itself is still there, empty.
    assert!(fx.pkcs11.get_all_slots().unwrap().contains(&fx.slot));
    assert!(!fx.pkcs11.get_slot_info(fx.slot).unwrap().token_present());

    fx.control.token_present(true).unwrap();
    assert_eq!(find_slot(&fx.pkcs11), Some(fx.slot));
    assert!(fx.pkcs11.get_slot_info(fx.slot).unwrap().token_present());
    // Sessions from before are dead.
    assert_eq!(
        rv(encrypt(&fx.session, fx.key)),
        RvError::SessionHandleInvalid
    );
    assert_eq!(
        rv(fx.session.login(UserType::User, Some(&pin(USER_PIN)))),
        RvError::SessionHandleInvalid
    );
    // A new session works, but only after logging in again.
    let fresh = fx.pkcs11.open_rw_session(fx.slot).unwrap();
    assert_eq!(rv(encrypt(&fresh, fx.key)), RvError::UserNotLoggedIn);
    assert_eq!(rv(find_key(&fresh)), RvError::UserNotLoggedIn);
    assert_eq!(
        fresh.get_session_info().unwrap().session_state(),
        SessionState::RwPublic
    );
    // SoftHSM2 never logged out underneath (the old session is still open in it).
    assert_eq!(
        rv(fresh.login(UserType::User, Some(&pin(USER_PIN)))),
        RvError::UserAlreadyLoggedIn
    );
    let ct = encrypt(&fresh, fx.key).unwrap();
    assert_eq!(decrypt(&fresh, fx.key, &ct).unwrap(), PLAINTEXT);
    assert_eq!(find_key(&fresh).unwrap(), vec![fx.key]);
    assert_eq!(
        fresh.get_session_info().unwrap().session_state(),
        SessionState::RwUser
    );
    // Closing the dead session still answers its fault (the real one is closed regardless).
    assert_eq!(rv(fx.session.close()), RvError::SessionHandleInvalid);
    encrypt(&fresh, fx.key).unwrap();
}

#[test]
fn invalidate_sessions_kills_open_sessions_only() {
    let fx = setup();
    let second = fx.pkcs11.open_ro_session(fx.slot).unwrap();
    encrypt(&second, fx.key).unwrap();

    fx.control.invalidate_sessions().unwrap();
    assert_eq!(
        rv(encrypt(&fx.session, fx.key)),
        RvError::SessionHandleInvalid
    );
    assert_eq!(
        rv(second.generate_random_vec(8)),
        RvError::SessionHandleInvalid
    );
    assert_eq!(rv(second.get_session_info()), RvError::SessionHandleInvalid);

    // New sessions work, and the login survived (only the sessions were lost).
    let fresh = fx.pkcs11.open_rw_session(fx.slot).unwrap();
    encrypt(&fresh, fx.key).unwrap();

    // Rewriting the file without an increase changes nothing.
    fx.control.latency(Duration::ZERO).unwrap();
    encrypt(&fresh, fx.key).unwrap();

    fx.control.invalidate_sessions().unwrap();
    assert_eq!(rv(encrypt(&fresh, fx.key)), RvError::SessionHandleInvalid);
    let fresher = fx.pkcs11.open_rw_session(fx.slot).unwrap();
    encrypt(&fresher, fx.key).unwrap();
}

#[test]
fn drop_login_until_login_again() {
    let fx = setup();
    fx.control.drop_login().unwrap();
    assert_eq!(rv(encrypt(&fx.session, fx.key)), RvError::UserNotLoggedIn);
    assert_eq!(rv(find_key(&fx.session)), RvError::UserNotLoggedIn);
    assert_eq!(
        rv(fx
            .session
            .get_attributes(fx.key, &[cryptoki::object::AttributeType::Label])),
        RvError::UserNotLoggedIn
    );
    assert_eq!(
        fx.session.get_session_info().unwrap().session_state(),
        SessionState::RwPublic
    );
    // Not a crypto call: still fine.
    assert_eq!(fx.session.generate_random_vec(16).unwrap().len(), 16);
    // Other sessions too: login is per process.
    let other = fx.pkcs11.open_ro_session(fx.slot).unwrap();
    assert_eq!(rv(encrypt(&other, fx.key)), RvError::UserNotLoggedIn);

    // The real module is still logged in, so it answers CKR_USER_ALREADY_LOGGED_IN: passed
    // through, and the login counts as restored.
    assert_eq!(
        rv(fx.session.login(UserType::User, Some(&pin(USER_PIN)))),
        RvError::UserAlreadyLoggedIn
    );
    encrypt(&fx.session, fx.key).unwrap();
    encrypt(&other, fx.key).unwrap();
    assert_eq!(
        fx.session.get_session_info().unwrap().session_state(),
        SessionState::RwUser
    );

    // A real logout + login works too.
    fx.control.drop_login().unwrap();
    assert_eq!(rv(encrypt(&fx.session, fx.key)), RvError::UserNotLoggedIn);
    fx.session.logout().unwrap();
    fx.session
        .login(UserType::User, Some(&pin(USER_PIN)))
        .unwrap();
    // SoftHSM2 drops the handles of private objects at C_Logout: find the key again.
    assert_eq!(
        rv(encrypt(&fx.session, fx.key)),
        RvError::ObjectHandleInvalid
    );
    let key = find_key(&fx.session).unwrap();
    assert_eq!(key.len(), 1);
    encrypt(&fx.session, key[0]).unwrap();
}

#[test]
fn device_errors_at_rate_one_and_none_at_zero() {
    let fx = setup();
    let ct = encrypt(&fx.session, fx.key).unwrap();
    fx.control.device_error_rate(1.0).unwrap();
    for _ in 0..3 {
        match encrypt(&fx.session, fx.key) {
            Err(Error::Pkcs11(RvError::DeviceError, Function::Encrypt)) => {}
            other => panic!("expected CKR_DEVICE_ERROR from C_Encrypt, got {other:?}"),
        }
        match decrypt(&fx.session, fx.key, &ct) {
            Err(Error::Pkcs11(RvError::DeviceError, Function::Decrypt)) => {}
            other => panic!("expected CKR_DEVICE_ERROR from C_Decrypt, got {other:?}"),
        }
    }
    // Not a crypto call of the list: unaffected.
    fx.session.generate_random_vec(8).unwrap();
    assert!(faults_injected() >= 6);

    // The failed operations were ended in the real module too: the same session works.
    fx.control.device_error_rate(0.0).unwrap();
    assert_eq!(
        decrypt(&fx.session, fx.key, &encrypt(&fx.session, fx.key).unwrap()).unwrap(),
        PLAINTEXT
    );

    // In between: some of each, reproducibly with a seed.
    fx.control.seed(42).unwrap();
    fx.control.device_error_rate(0.5).unwrap();
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..200 {
        match encrypt(&fx.session, fx.key) {
            Ok(_) => ok += 1,
            Err(Error::Pkcs11(RvError::DeviceError, _)) => failed += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
}

#[test]
fn softhsm_keeps_an_abandoned_operation_active() {
    // Why the module ends the real operation when it makes up a failure: SoftHSM2 keeps an
    // operation it never finished, and refuses the next init on that session.
    let fx = setup();
    let mut iv = [7u8; 12];
    let params = GcmParams::new(&mut iv, b"aad", 128.into()).unwrap();
    fx.session
        .encrypt_init(&Mechanism::AesGcm(params), fx.key)
        .unwrap();
    assert_eq!(rv(encrypt(&fx.session, fx.key)), RvError::OperationActive);
}

#[test]
fn max_sessions_counts_open_sessions() {
    let fx = setup();
    fx.control.max_sessions(Some(2)).unwrap();
    // The fixture's session is one.
    let second = fx.pkcs11.open_ro_session(fx.slot).unwrap();
    assert_eq!(
        rv(fx.pkcs11.open_ro_session(fx.slot)),
        RvError::SessionCount
    );
    second.close().unwrap();
    let third = fx.pkcs11.open_rw_session(fx.slot).unwrap();
    encrypt(&third, fx.key).unwrap();
    assert_eq!(
        rv(fx.pkcs11.open_rw_session(fx.slot)),
        RvError::SessionCount
    );

    // Sessions killed by a fault no longer count.
    fx.control.invalidate_sessions().unwrap();
    let a = fx.pkcs11.open_rw_session(fx.slot).unwrap();
    let _b = fx.pkcs11.open_rw_session(fx.slot).unwrap();
    assert_eq!(
        rv(fx.pkcs11.open_rw_session(fx.slot)),
        RvError::SessionCount
    );
    drop(a);
    fx.pkcs11.open_rw_session(fx.slot).unwrap();

    fx.control.max_sessions(None).unwrap();
    let many: Vec<_> = (0..5)
        .map(|_| fx.pkcs11.open_ro_session(fx.slot).unwrap())
        .collect();
    assert_eq!(many.len(), 5);
}

#[test]
fn latency_is_added_before_crypto_calls() {
    let fx = setup();
    let latency = Duration::from_millis(60);
    fx.control.latency(latency).unwrap();

    let t = Instant::now();
    fx.session.generate_random_vec(16).unwrap();
    assert!(t.elapsed() >= latency, "{:?}", t.elapsed());

    // cryptoki's encrypt makes two C_Encrypt calls (length query, then the real one).
    let t = Instant::now();
    let ct = encrypt(&fx.session, fx.key).unwrap();
    assert!(t.elapsed() >= 2 * latency, "{:?}", t.elapsed());
    let t = Instant::now();
    decrypt(&fx.session, fx.key, &ct).unwrap();
    assert!(t.elapsed() >= 2 * latency, "{:?}", t.elapsed());

    fx.control.latency(Duration::ZERO).unwrap();
    encrypt(&fx.session, fx.key).unwrap();
}

#[test]
fn rapid_rewrites_of_the_control_file_are_all_seen() {
    // Writes closer together than the file system's timestamp tick, with calls in between: the
    // module must not mistake a new version for the one it has cached.
    let fx = setup();
    let mut session = fx.pkcs11.open_rw_session(fx.slot).unwrap();
    for _ in 0..50 {
        fx.control.invalidate_sessions().unwrap();
        assert_eq!(rv(encrypt(&session, fx.key)), RvError::SessionHandleInvalid);
        session = fx.pkcs11.open_rw_session(fx.slot).unwrap();
        encrypt(&session, fx.key).unwrap();
        fx.control.drop_login().unwrap();
        assert_eq!(rv(encrypt(&session, fx.key)), RvError::UserNotLoggedIn);
        user_login(&session);
        encrypt(&session, fx.key).unwrap();
    }
}

#[test]
fn close_all_sessions_is_tracked() {
    let fx = setup();
    fx.control.max_sessions(Some(2)).unwrap();
    let second = fx.pkcs11.open_ro_session(fx.slot).unwrap();
    assert_eq!(
        rv(fx.pkcs11.open_ro_session(fx.slot)),
        RvError::SessionCount
    );
    close_all_sessions(fx.slot);
    // Both handles are gone in the real module; neither counts any more.
    let _a = fx.pkcs11.open_ro_session(fx.slot).unwrap();
    let _b = fx.pkcs11.open_ro_session(fx.slot).unwrap();
    // Its handle was closed underneath it: dropping it answers CKR_SESSION_HANDLE_INVALID,
    // which cryptoki only logs.
    drop(second);
}

/// C_CloseAllSessions through the module's own function list (cryptoki 0.12 has no wrapper).
fn close_all_sessions(slot: Slot) {
    use cryptoki_sys::{CK_FUNCTION_LIST, CKR_OK};
    let path = faultpkcs11::library_path().unwrap();
    // SAFETY: the library is the one cryptoki loaded and initialised in this process (dlopen
    // returns the same instance). C_GetFunctionList has the PKCS#11 signature we declare and
    // stores a pointer to the module's static list, which we only read while `lib` is alive;
    // C_CloseAllSessions takes a slot id.
    unsafe {
        let lib = libloading::Library::new(path).unwrap();
        let get = lib
            .get::<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> u64>(b"C_GetFunctionList\0")
            .unwrap();
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        assert_eq!(get(&mut list), CKR_OK);
        let close_all = (*list).C_CloseAllSessions.unwrap();
        assert_eq!(close_all(slot.id()), CKR_OK);
    }
}
