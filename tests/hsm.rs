//! In-process tests of `hsmseal::hsm::Hsm` against a real SoftHSM2 token.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once per process (at `C_Initialize`), so
//! every test in this binary shares ONE token, created on first use, and
//! uses its own key names. Tests that need a login state of their own (wrong
//! PIN, not logged in) live in `tests/hsm_login.rs`, a separate process.

mod support;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use hsmseal::backend::{KeyBackend, KeyRef, WrappedKey};
use hsmseal::error::ErrorKind;
use hsmseal::hsm::kwk::{kwk_template, today_utc};
use hsmseal::hsm::{Hsm, KeyState};
use hsmseal::secret::{Pin, SecretKey};
use hsmseal::time::{now_unix, parse_rfc3339};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use support::TestToken;

/// The token every test in this binary shares.
fn token() -> &'static TestToken {
    static TOKEN: OnceLock<TestToken> = OnceLock::new();
    TOKEN.get_or_init(|| {
        // A static is never dropped: keep its directory under target/tmp.
        let t = TestToken::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")));
        // Before any Hsm::open in this process: SoftHSM2 reads it once.
        std::env::set_var("SOFTHSM2_CONF", &t.conf);
        t
    })
}

/// Tests here run one at a time. They share one token, and several create
/// and destroy objects through their own cryptoki sessions; SoftHSM2's file
/// object store misreads objects another session of the process is creating
/// (see `MANAGEMENT` in src/hsm/mod.rs), which hsmseal guards against but
/// these raw sessions cannot. Each test's own threads still run in parallel.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh `Hsm` (own session pool and call counter), logged in.
fn hsm() -> Hsm {
    let t = token();
    let h = Hsm::open(&t.module, &t.label).expect("open token");
    h.login(&Pin::new(t.pin.clone())).expect("login");
    h
}

fn kref(name: &str, version: u32) -> KeyRef {
    KeyRef {
        name: name.to_string(),
        version,
    }
}

/// A logged-in session of the test's own cryptoki context on the shared
/// token, to create and inspect objects behind hsmseal's back. (Same module
/// file, so the same library state: C_Initialize reports it already done.)
fn raw_session() -> Session {
    let t = token();
    let ctx = Pkcs11::new(&t.module).expect("load module");
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim() == t.label)
        .expect("test token slot");
    let s = ctx.open_rw_session(slot).unwrap();
    match s.login(UserType::User, Some(&AuthPin::from(t.pin.as_str()))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    s
}

fn find_by_label(s: &Session, label: &str) -> ObjectHandle {
    let found = s
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(found.len(), 1, "objects labelled {label}");
    found[0]
}

fn today() -> String {
    hsmseal::hsm::kwk::date_string(&today_utc()).unwrap()
}

#[test]
fn created_key_has_exactly_the_required_attributes() {
    let _serial = serial();
    let h = hsm();
    let info = h.create_key("t-create").unwrap();
    assert_eq!((info.name.as_str(), info.version), ("t-create", 1));
    assert_eq!(info.label, "hsmseal:t-create:v1");
    assert!(info.problems.is_empty(), "{:?}", info.problems);

    // Read the object back with cryptoki directly, against literal values.
    let s = raw_session();
    let obj = find_by_label(&s, "hsmseal:t-create:v1");
    let attrs = s
        .get_attributes(
            obj,
            &[
                AttributeType::Class,
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Sign,
                AttributeType::Verify,
                AttributeType::Derive,
                AttributeType::AllowedMechanisms,
                AttributeType::Id,
                // Sensitive: the token must not return it at all.
                AttributeType::Value,
            ],
        )
        .unwrap();
    let expected = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::AlwaysSensitive(true),
        Attribute::Extractable(false),
        Attribute::NeverExtractable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
    ];
    for e in &expected {
        assert!(attrs.contains(e), "missing {e:?} in {attrs:?}");
    }
    // CKA_ID: the label, then the creation time, which hsmseal reports.
    let id = attrs
        .iter()
        .find_map(|a| match a {
            Attribute::Id(id) => Some(String::from_utf8(id.clone()).unwrap()),
            _ => None,
        })
        .unwrap();
    let time = id.strip_prefix("hsmseal:t-create:v1@").expect(&id);
    let created = parse_rfc3339(time).expect(time);
    assert!(created.abs_diff(now_unix()) < 120, "{id}");
    assert_eq!(info.created.as_deref(), Some(time));
    assert_eq!(info.created_not_after, Some(created));
    assert_eq!(info.state, KeyState::Active);
    // CKA_START_DATE is set to today. SoftHSM2 (2.6.1) stores it but fails
    // C_GetAttributeValue with CKR_GENERAL_ERROR when reading it from a
    // private object (SoftHSMv2 issues #655, #804), which is why the time
    // is in CKA_ID too. Accept exactly that, or today's date from a fixed one.
    match s.get_attributes(obj, &[AttributeType::StartDate]) {
        Ok(a) => {
            let date = a.iter().find_map(|a| match a {
                Attribute::StartDate(d) => hsmseal::hsm::kwk::date_string(d),
                _ => None,
            });
            assert_eq!(date.as_deref(), Some(today().as_str()));
        }
        // hsmseal got the time from CKA_ID anyway (checked above).
        Err(CkError::Pkcs11(RvError::GeneralError, _)) => {}
        Err(e) => panic!("reading CKA_START_DATE: {e}"),
    }
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "CKA_VALUE was readable"
    );

    // The token enforces the attributes: the key cannot encrypt with ECB
    // (CKA_ALLOWED_MECHANISMS) nor wrap another key (CKA_WRAP false).
    let ecb = s.encrypt(&Mechanism::AesEcb, obj, &[0u8; 16]);
    assert!(ecb.is_err(), "CKM_AES_ECB was allowed");
    let other = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32u64.into()),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    assert!(
        s.wrap_key(&Mechanism::AesKeyWrapPad, obj, other).is_err(),
        "C_WrapKey was allowed"
    );

    // list and versions show it, with no problems.
    let listed: Vec<_> = h
        .list_keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.name == "t-create")
        .collect();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].problems.is_empty());
    assert_eq!(
        listed[0].attributes.as_ref().unwrap().allowed_mechanisms,
        Some(vec!["CKM_AES_GCM".to_string()])
    );
    let versions = h.key_versions("t-create").unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].version, 1);
    assert!(versions[0].problems.is_empty());
}

#[test]
fn create_twice_is_refused_and_rotation_adds_versions() {
    let _serial = serial();
    let h = hsm();
    h.create_key("t-rotate").unwrap();
    let e = h.create_key("t-rotate").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");

    let v2 = h.create_next_version("t-rotate").unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.label, "hsmseal:t-rotate:v2");
    assert!(v2.problems.is_empty());
    assert_eq!(h.current_version("t-rotate").unwrap(), 2);
    let versions: Vec<u32> = h
        .key_versions("t-rotate")
        .unwrap()
        .iter()
        .map(|k| k.version)
        .collect();
    assert_eq!(versions, [1, 2]);
    // The same template: v2 is as strong as v1, read back directly.
    let s = raw_session();
    let obj = find_by_label(&s, "hsmseal:t-rotate:v2");
    let attrs = s
        .get_attributes(
            obj,
            &[
                AttributeType::Extractable,
                AttributeType::Wrap,
                AttributeType::AllowedMechanisms,
            ],
        )
        .unwrap();
    assert!(attrs.contains(&Attribute::Extractable(false)));
    assert!(attrs.contains(&Attribute::Wrap(false)));
    assert!(attrs.contains(&Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM])));

    let e = h.create_next_version("t-rotate-none").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    let e = h.create_key("bad name").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
}

#[test]
fn wrap_unwrap_round_trip_and_every_tampering_fails_authentication() {
    let _serial = serial();
    let h = hsm();
    h.create_key("t-wrap").unwrap();
    h.create_next_version("t-wrap").unwrap();
    let v1 = kref("t-wrap", 1);
    let v2 = kref("t-wrap", 2);
    let dek = SecretKey::random();
    let aad = b"hsmseal/1 t-wrap v1 ctx";

    assert_eq!(h.calls(), 0);
    let w = h.wrap(&v1, &dek, aad).unwrap();
    assert_eq!(h.calls(), 1);
    let back = h.unwrap(&v1, &w, aad).unwrap();
    assert_eq!(back.expose(), dek.expose());
    assert_eq!(h.calls(), 2);
    // Fresh IV per wrap.
    let w2 = h.wrap(&v1, &dek, aad).unwrap();
    assert_ne!(w.iv, w2.iv);
    assert_ne!(w.ciphertext, w2.ciphertext);

    let integrity = |r: hsmseal::error::Result<SecretKey>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::Integrity, "{what}: {e}");
        assert!(
            e.to_string().contains("authentication failed"),
            "{what}: {e}"
        );
        assert!(e.to_string().contains("t-wrap v"), "{what}: {e}");
    };
    integrity(h.unwrap(&v1, &w, b"hsmseal/1 t-wrap v1 ctY"), "other AAD");
    integrity(h.unwrap(&v1, &w, b""), "empty AAD");
    integrity(h.unwrap(&v2, &w, aad), "other version");
    for (what, i) in [
        ("IV", None),
        ("ciphertext", Some(0)),
        ("ciphertext end", Some(31)),
        ("tag", Some(32)),
        ("tag end", Some(47)),
    ] {
        let mut bad: WrappedKey = w.clone();
        match i {
            None => bad.iv[11] ^= 0x01,
            Some(i) => bad.ciphertext[i] ^= 0x80,
        }
        integrity(h.unwrap(&v1, &bad, aad), what);
    }
    // The sessions that saw failures were discarded; the key still works.
    assert_eq!(h.unwrap(&v1, &w, aad).unwrap().expose(), dek.expose());
    // 3 wraps/unwraps above + 8 failed unwraps + 1 = every call counted.
    assert_eq!(h.calls(), 3 + 8 + 1);

    // A wrap under v2 unwraps under v2 only.
    let w3 = h.wrap(&v2, &dek, aad).unwrap();
    assert_eq!(h.unwrap(&v2, &w3, aad).unwrap().expose(), dek.expose());
    integrity(h.unwrap(&v1, &w3, aad), "v1 for a v2 wrap");
}

#[test]
fn missing_keys_and_versions_are_key_errors() {
    let _serial = serial();
    let h = hsm();
    let e = h.current_version("t-missing").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key);
    assert!(
        e.to_string().contains("\"t-missing\" not found on token"),
        "{e}"
    );
    assert!(e.to_string().contains("hsmseal key list"), "{e}");
    let e = h.key_versions("t-missing").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key);

    h.create_key("t-gap").unwrap();
    let e = h
        .wrap(&kref("t-gap", 3), &SecretKey::random(), b"")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key);
    assert!(
        e.to_string().contains("key t-gap v3 not found on token")
            && e.to_string()
                .contains("the newest version is v1; v3 was never created"),
        "{e}"
    );
    let fake = WrappedKey {
        iv: [0; 12],
        ciphertext: [0; 48],
    };
    let e = h.unwrap(&kref("t-missing", 1), &fake, b"").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
}

#[test]
fn a_destroyed_key_is_not_used_from_the_cache() {
    let _serial = serial();
    let h = hsm();
    h.create_key("t-destroyed").unwrap();
    let k = kref("t-destroyed", 1);
    let w = h.wrap(&k, &SecretKey::random(), b"a").unwrap();
    let s = raw_session();
    s.destroy_object(find_by_label(&s, "hsmseal:t-destroyed:v1"))
        .unwrap();
    let e = h.unwrap(&k, &w, b"a").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    assert!(e.to_string().contains("not found"), "{e}");
}

/// Generates `hsmseal:{name}:v1` outside hsmseal: hsmseal's own template,
/// changed by `weaken`.
fn weak_key(name: &str, weaken: impl FnOnce(&mut Vec<Attribute>)) {
    let mut t = kwk_template(name, 1, now_unix());
    weaken(&mut t);
    let s = raw_session();
    s.generate_key(&Mechanism::AesKeyGen, &t)
        .unwrap_or_else(|e| panic!("generating weak key {name}: {e}"));
}

fn set(t: &mut Vec<Attribute>, a: Attribute) {
    t.retain(|x| x.attribute_type() != a.attribute_type());
    t.push(a);
}

#[test]
fn weaker_keys_are_refused_for_wrap_and_unwrap_naming_the_attribute() {
    let _serial = serial();
    weak_key("weak-extractable", |t| set(t, Attribute::Extractable(true)));
    weak_key("weak-wrap-decrypt", |t| set(t, Attribute::Wrap(true)));
    weak_key("weak-no-allowed", |t| {
        t.retain(|a| a.attribute_type() != AttributeType::AllowedMechanisms)
    });
    weak_key("weak-ecb-allowed", |t| {
        set(
            t,
            Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM, MechanismType::AES_ECB]),
        )
    });
    // FORMAT.md section 1: CKA_SIGN and CKA_VERIFY false (issue 9, item 8).
    weak_key("weak-sign", |t| set(t, Attribute::Sign(true)));
    weak_key("weak-verify", |t| set(t, Attribute::Verify(true)));
    let h = hsm();
    let fake = WrappedKey {
        iv: [1; 12],
        ciphertext: [2; 48],
    };
    for (name, needle) in [
        (
            "weak-extractable",
            "CKA_EXTRACTABLE is true (the key could leave the HSM)",
        ),
        (
            "weak-wrap-decrypt",
            "CKA_WRAP and CKA_DECRYPT are both true",
        ),
        ("weak-no-allowed", "CKA_ALLOWED_MECHANISMS is"),
        (
            "weak-ecb-allowed",
            "CKA_ALLOWED_MECHANISMS allows CKM_AES_ECB",
        ),
        ("weak-sign", "CKA_SIGN is true"),
        ("weak-verify", "CKA_VERIFY is true"),
    ] {
        let k = kref(name, 1);
        let before = h.calls();
        for (op, e) in [
            ("wrap", h.wrap(&k, &SecretKey::random(), b"x").unwrap_err()),
            ("unwrap", h.unwrap(&k, &fake, b"x").unwrap_err()),
            ("current_version", h.current_version(name).unwrap_err()),
        ] {
            let m = e.to_string();
            assert_eq!(e.kind(), ErrorKind::Key, "{name} {op}: {m}");
            assert!(
                m.starts_with(&format!("key {name} v1 is refused: ")),
                "{name} {op}: {m}"
            );
            assert!(m.contains(needle), "{name} {op}: {m}");
            assert!(m.contains("hsmseal key create"), "{name} {op}: {m}");
            assert!(!m.contains('\n'));
        }
        // Refused before any encryption call reached the token.
        assert_eq!(h.calls(), before, "{name}");
        let listed = h.key_versions(name).unwrap();
        assert!(
            listed[0]
                .problems
                .iter()
                .any(|p| p.contains(needle.split(" (").next().unwrap())),
            "{name}: {:?}",
            listed[0].problems
        );
    }
    // Control for the enforcement check in the creation test: without
    // CKA_ALLOWED_MECHANISMS the token does let the key encrypt with ECB.
    let s = raw_session();
    let obj = find_by_label(&s, "hsmseal:weak-no-allowed:v1");
    assert!(s.encrypt(&Mechanism::AesEcb, obj, &[0u8; 16]).is_ok());

    // The extractable one is also named as having maybe left the HSM.
    let info = &h.key_versions("weak-extractable").unwrap()[0];
    assert!(
        info.problems
            .iter()
            .any(|p| p.contains("CKA_NEVER_EXTRACTABLE is false")),
        "{:?}",
        info.problems
    );
    // doctor reports them.
    let report = h.doctor().unwrap();
    assert!(!report.ok());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("weak-wrap-decrypt v1 is refused")),
        "{report}"
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("weak-sign v1 is refused: CKA_SIGN is true")),
        "{report}"
    );
    // The token really would let such a key compute a MAC if its mechanisms
    // allowed one: the refusal is about the attribute, as for the others.
    let info = &h.key_versions("weak-verify").unwrap()[0];
    assert_eq!(info.attributes.as_ref().unwrap().verify, Some(true));
}

/// A version that two objects carry (made by an older hsmseal or another
/// client; issue 9, item 2): data under either object still unwraps, a
/// wrong tag is still an integrity error, nothing new is wrapped under it,
/// `key list` and `doctor` name it, and `key rotate` gives a unique current
/// version again.
#[test]
fn a_duplicated_version_unwraps_with_either_object_and_wraps_nothing() {
    let _serial = serial();
    let h = hsm();
    h.create_key("t-dup").unwrap();
    let k = kref("t-dup", 1);
    let dek = SecretKey::random();
    let before = h.wrap(&k, &dek, b"dup aad").unwrap();
    // Another client makes a second object with the same label (and
    // hsmseal's template), then wraps a key under that one.
    let s = raw_session();
    let second = s
        .generate_key(&Mechanism::AesKeyGen, &kwk_template("t-dup", 1, now_unix()))
        .unwrap();
    let dek2 = SecretKey::random();
    let mut iv = [9u8; 12];
    let params =
        cryptoki::mechanism::aead::GcmParams::new(&mut iv, b"dup aad", 128.into()).unwrap();
    let ct = s
        .encrypt(&Mechanism::AesGcm(params), second, dek2.expose())
        .unwrap();
    let by_other = WrappedKey {
        iv: [9u8; 12],
        ciphertext: ct.try_into().unwrap(),
    };

    let h = hsm(); // nothing cached
    assert_eq!(
        h.unwrap(&k, &before, b"dup aad").unwrap().expose(),
        dek.expose()
    );
    assert_eq!(
        h.unwrap(&k, &by_other, b"dup aad").unwrap().expose(),
        dek2.expose()
    );
    let e = h.unwrap(&k, &before, b"other aad").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
    let calls = h.calls();
    let e = h.wrap(&k, &SecretKey::random(), b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    let m = e.to_string();
    assert!(m.contains("2 objects on token"), "{m}");
    assert!(m.contains("hsmseal:t-dup:v1"), "{m}");
    assert!(m.contains("`hsmseal key rotate t-dup`"), "{m}");
    assert!(!m.contains('\n'));
    assert_eq!(
        h.calls(),
        calls,
        "refused before any call reached the token"
    );

    let listed = h.key_versions("t-dup").unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|i| i
            .problems
            .iter()
            .any(|p| p.contains("2 objects carry the label"))),
        "{listed:?}"
    );
    assert!(h
        .doctor()
        .unwrap()
        .problems
        .iter()
        .any(|p| p.starts_with("key t-dup v1: 2 objects carry the label")));

    // The fix the message names: a new unique version, which wraps.
    let v2 = h.create_next_version("t-dup").unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(h.current_version("t-dup").unwrap(), 2);
    let w = h.wrap(&kref("t-dup", 2), &dek, b"dup aad").unwrap();
    assert_eq!(
        h.unwrap(&kref("t-dup", 2), &w, b"dup aad")
            .unwrap()
            .expose(),
        dek.expose()
    );
    // v1 keeps decrypting what was wrapped under it.
    assert_eq!(
        h.unwrap(&k, &by_other, b"dup aad").unwrap().expose(),
        dek2.expose()
    );
}

#[test]
fn the_token_lock_excludes_threads_and_lives_in_the_token_directory() {
    use hsmseal::hsm::lock::Mode;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let _serial = serial();
    let t = token();
    let _ = hsm();
    let path = hsmseal::hsm::token_lock_path(&t.module).unwrap();
    assert_eq!(
        path,
        std::fs::canonicalize(t.dir.path().join("tokens"))
            .unwrap()
            .join(".hsmseal.lock")
    );
    let m = std::fs::symlink_metadata(&path).unwrap();
    assert!(m.file_type().is_file());
    // Threads of one process share the lock file's open description, which
    // `flock` cannot tell apart: hsmseal's in-process lock must keep them
    // out of each other's way, in either mode.
    let inside = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for i in 0..4 {
            let (inside, rounds) = (&inside, &rounds);
            let t = &t;
            s.spawn(move || {
                for j in 0..100 {
                    let mode = if (i + j) % 2 == 0 {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    };
                    let guard = hsmseal::hsm::lock_token(&t.module, mode).unwrap();
                    assert_eq!(guard.mode(), mode);
                    assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                    std::thread::yield_now();
                    inside.store(false, Ordering::SeqCst);
                    rounds.fetch_add(1, Ordering::Relaxed);
                    drop(guard);
                }
            });
        }
    });
    assert_eq!(rounds.load(Ordering::Relaxed), 400);
    // And hsmseal's own calls still work afterwards (nothing left held).
    let h = hsm();
    h.create_key("t-lock").unwrap();
    assert_eq!(h.current_version("t-lock").unwrap(), 1);
}

#[test]
fn wrong_token_label_and_bad_module_are_token_errors() {
    let _serial = serial();
    let t = token();
    let _ = hsm(); // the shared token exists
    let e = Hsm::open(&t.module, "no-such-token").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Token, "{e}");
    let m = e.to_string();
    assert!(m.contains("no token labelled \"no-such-token\""), "{m}");
    assert!(
        m.contains(&format!("{:?}", t.label)),
        "lists the labels found: {m}"
    );
    assert!(m.contains("HSMSEAL_TOKEN"), "{m}");

    let e = Hsm::open(Path::new("/nonexistent/libpkcs11.so"), &t.label).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Token, "{e}");
    let m = e.to_string();
    assert!(
        m.starts_with("cannot load PKCS#11 module /nonexistent/libpkcs11.so: "),
        "{m}"
    );
    assert!(m.contains("set --module or HSMSEAL_PKCS11_MODULE"), "{m}");

    // A file that exists but is not a shared library.
    let e = Hsm::open(&t.conf, &t.label).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Token, "{e}");
    assert!(e.to_string().contains("cannot load PKCS#11 module"), "{e}");
}

#[test]
fn init_token_makes_a_usable_token_in_a_free_slot() {
    let _serial = serial();
    let t = token();
    let _ = hsm(); // SOFTHSM2_CONF set, module initialised
    let label = format!("hsmseal-init-{}", std::process::id());
    let so = Pin::new("init-so-9876".into());
    let user = Pin::new("init-user-5432".into());
    Hsm::init_token(&t.module, &label, &so, &user).unwrap();
    let e = Hsm::init_token(&t.module, &label, &so, &user).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Token, "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");

    let h = Hsm::open(&t.module, &label).unwrap();
    h.login(&user).unwrap();
    h.create_key("t-init").unwrap();
    let k = kref("t-init", 1);
    let dek = SecretKey::random();
    let w = h.wrap(&k, &dek, b"i").unwrap();
    assert_eq!(h.unwrap(&k, &w, b"i").unwrap().expose(), dek.expose());
    // The key is on the new token only.
    assert!(hsm().key_versions("t-init").is_err());
}

#[test]
fn concurrent_wraps_and_unwraps_from_four_threads() {
    let _serial = serial();
    let h = hsm();
    h.create_key("t-conc").unwrap();
    let k = kref("t-conc", 1);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (h, k) = (&h, &k);
            s.spawn(move || {
                for i in 0..200 {
                    let aad = format!("thread {t} item {i}");
                    let dek = SecretKey::random();
                    let w = h.wrap(k, &dek, aad.as_bytes()).unwrap();
                    let back = h.unwrap(k, &w, aad.as_bytes()).unwrap();
                    assert_eq!(back.expose(), dek.expose());
                }
            });
        }
    });
    assert_eq!(h.calls(), 4 * 200 * 2);
}

#[test]
fn two_hsm_instances_in_one_process_manage_keys_concurrently() {
    let _serial = serial();
    // Without hsmseal's process-wide management lock, SoftHSM2 fails some of
    // these (CKR_ATTRIBUTE_VALUE_INVALID reading labels of objects the other
    // session is creating).
    let (a, b) = (hsm(), hsm());
    std::thread::scope(|s| {
        for (h, prefix) in [(&a, "t-two-a"), (&b, "t-two-b")] {
            s.spawn(move || {
                for i in 0..40 {
                    let name = format!("{prefix}{i}");
                    h.create_key(&name).unwrap();
                    assert_eq!(h.key_versions(&name).unwrap().len(), 1);
                }
            });
        }
    });
    assert_eq!(a.current_version("t-two-b39").unwrap(), 1);
}

#[test]
fn doctor_reports_module_token_mechanisms_and_keys() {
    let _serial = serial();
    let t = token();
    let h = hsm();
    h.create_key("t-doctor").unwrap();
    let r = h.doctor().unwrap();
    assert_eq!(r.token.label, t.label);
    assert!(r.token.logged_in);
    assert!(!r.token.user_pin_locked);
    assert!(
        r.library.manufacturer.contains("SoftHSM"),
        "{}",
        r.library.manufacturer
    );
    for m in &r.mechanisms {
        assert!(m.supported && m.problems.is_empty(), "{m:?}");
    }
    let names: Vec<&str> = r.mechanisms.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["CKM_AES_GCM", "CKM_AES_KEY_GEN"]);
    let keys = r.keys.as_ref().expect("keys listed when logged in");
    assert!(keys
        .iter()
        .any(|k| k.name == "t-doctor" && k.problems.is_empty()));
    let text = r.to_string();
    assert!(
        text.contains("CKM_AES_GCM") && text.contains("t-doctor v1"),
        "{text}"
    );
    let json = serde_json::to_string(&r).unwrap();
    assert!(
        json.contains("\"allowed_mechanisms\":[\"CKM_AES_GCM\"]"),
        "{json}"
    );
    for secret in [&t.pin, &t.so_pin] {
        assert!(!text.contains(secret.as_str()) && !json.contains(secret.as_str()));
    }
    assert!(!format!("{h:?}").contains(t.pin.as_str()));
}

/// Process CPU time (user + system) in seconds, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" that ends the command name; utime and stime are
    // fields 14 and 15 of the whole line, in clock ticks (100 per second).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Wraps (or unwraps) per second with 1, 2 and 4 threads, and how many
/// cores' worth of CPU the process used meanwhile.
/// `cargo test --test hsm -- --ignored --nocapture measure`
#[test]
#[ignore = "measurement, not a test"]
fn measure_wraps_per_second() {
    let _serial = serial();
    let h = hsm();
    let _ = h.create_key("t-measure");
    let k = kref("t-measure", 1);
    let dek = SecretKey::random();
    let w = h.wrap(&k, &dek, b"measure aad").unwrap();
    let per_thread = 20_000;
    for threads in [1usize, 2, 4] {
        for op in ["wrap", "unwrap"] {
            let (start, cpu) = (std::time::Instant::now(), cpu_seconds());
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..per_thread {
                            if op == "wrap" {
                                h.wrap(&k, &dek, b"measure aad").unwrap();
                            } else {
                                h.unwrap(&k, &w, b"measure aad").unwrap();
                            }
                        }
                    });
                }
            });
            let secs = start.elapsed().as_secs_f64();
            let cores = (cpu_seconds() - cpu) / secs;
            let rate = (threads * per_thread) as f64 / secs;
            println!("{op}: {threads} thread(s): {rate:.0}/s, {cores:.2} cores busy");
        }
    }
    // Same, but each thread with its own key: SoftHSM2 serialises work on
    // one object (it re-checks the object's file on every operation).
    let _ = h.create_key("t-measure-2");
    let k2 = kref("t-measure-2", 1);
    let (start, cpu) = (std::time::Instant::now(), cpu_seconds());
    std::thread::scope(|s| {
        for key in [&k, &k2] {
            let (h, dek) = (&h, &dek);
            s.spawn(move || {
                for _ in 0..per_thread {
                    h.wrap(key, dek, b"measure aad").unwrap();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let cores = (cpu_seconds() - cpu) / secs;
    let rate = (2 * per_thread) as f64 / secs;
    println!("wrap: 2 thread(s), a key each: {rate:.0}/s, {cores:.2} cores busy");
}

fn states(h: &Hsm, name: &str) -> Vec<(u32, KeyState)> {
    h.key_versions(name)
        .unwrap()
        .iter()
        .map(|k| (k.version, k.state))
        .collect()
}

#[test]
fn a_disabled_version_is_refused_by_the_hsm_itself_and_skipped_as_current() {
    let _serial = serial();
    let h = hsm();
    h.create_key("t-disable").unwrap();
    h.create_next_version("t-disable").unwrap();
    let (v1, v2) = (kref("t-disable", 1), kref("t-disable", 2));
    let dek = SecretKey::random();
    let w1 = h.wrap(&v1, &dek, b"a").unwrap();
    let w2 = h.wrap(&v2, &dek, b"a").unwrap();
    // Another Hsm in the process has v1 verified and cached.
    let other = hsm();
    other.unwrap(&v1, &w1, b"a").unwrap();

    let c = h.disable_version(&v1).unwrap();
    assert!(c.changed);
    assert_eq!(
        (c.previous_state, c.state),
        (KeyState::DecryptOnly, KeyState::Disabled)
    );
    assert_eq!(c.current_version, Some(2));
    assert_eq!(
        states(&h, "t-disable"),
        [(1, KeyState::Disabled), (2, KeyState::Active)]
    );
    // Disabled is its own state, not a weakness.
    assert!(h.key_versions("t-disable").unwrap()[0].problems.is_empty());

    // The token refuses it whoever asks.
    let s = raw_session();
    let obj = find_by_label(&s, "hsmseal:t-disable:v1");
    assert!(matches!(
        s.get_attributes(obj, &[AttributeType::Encrypt, AttributeType::Decrypt])
            .unwrap()[..],
        [Attribute::Encrypt(false), Attribute::Decrypt(false)]
    ));
    let mut iv = [0u8; 12];
    let gcm = Mechanism::AesGcm(
        cryptoki::mechanism::aead::GcmParams::new(&mut iv, b"", 128u64.into()).unwrap(),
    );
    assert!(matches!(
        s.encrypt(&gcm, obj, &[0u8; 32]),
        Err(CkError::Pkcs11(RvError::KeyFunctionNotPermitted, _))
    ));

    // hsmseal names it, in this Hsm and in the one whose cache had it.
    for (who, hh) in [("same", &h), ("other", &other)] {
        let e = hh.unwrap(&v1, &w1, b"a").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Key, "{who}: {e}");
        assert!(
            e.to_string()
                .starts_with("key t-disable v1 is disabled (`hsmseal key disable`);"),
            "{who}: {e}"
        );
        let e = hh.wrap(&v1, &dek, b"a").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Key, "{who}: {e}");
        assert_eq!(hh.unwrap(&v2, &w2, b"a").unwrap().expose(), dek.expose());
    }
    // Idempotent.
    assert!(!h.disable_version(&v1).unwrap().changed);

    // Disabling the newest makes the highest enabled one current; disabling
    // every version leaves none, with a clear error.
    h.disable_version(&v2).unwrap();
    let e = h.current_version("t-disable").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    assert!(e.to_string().contains("no enabled version"), "{e}");
    let c = h.enable_version(&v1).unwrap();
    assert_eq!((c.state, c.current_version), (KeyState::Active, Some(1)));
    assert_eq!(h.current_version("t-disable").unwrap(), 1);
    assert_eq!(
        states(&h, "t-disable"),
        [(1, KeyState::Active), (2, KeyState::Disabled)]
    );
    h.enable_version(&v2).unwrap();
    assert_eq!(h.current_version("t-disable").unwrap(), 2);
    assert_eq!(h.unwrap(&v1, &w1, b"a").unwrap().expose(), dek.expose());
    assert_eq!(other.unwrap(&v1, &w1, b"a").unwrap().expose(), dek.expose());

    // Only one of the two flags off is not "disabled": that key is weak.
    s.update_attributes(obj, &[Attribute::Decrypt(false)])
        .unwrap();
    let e = h.unwrap(&v1, &w1, b"a").unwrap_err();
    assert!(
        e.to_string().contains("is refused: CKA_DECRYPT is false"),
        "{e}"
    );
}

#[test]
fn destroyed_versions_stay_listed_and_their_numbers_are_never_reused() {
    let _serial = serial();
    let h = hsm();
    h.create_key("t-destroy").unwrap();
    h.create_next_version("t-destroy").unwrap();
    h.create_next_version("t-destroy").unwrap();
    let dek = SecretKey::random();
    let w1 = h.wrap(&kref("t-destroy", 1), &dek, b"a").unwrap();

    // The current version needs force; nothing changes without it.
    let e = h.destroy_version(&kref("t-destroy", 3), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert!(e.to_string().contains("current version"), "{e}");
    assert_eq!(h.key_versions("t-destroy").unwrap().len(), 3);

    let c = h.destroy_version(&kref("t-destroy", 1), false).unwrap();
    assert!(c.changed);
    assert_eq!(c.state, KeyState::Destroyed);
    let e = h.unwrap(&kref("t-destroy", 1), &w1, b"a").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    assert!(
        e.to_string()
            .contains("key t-destroy v1 not found on token")
            && e.to_string().contains("destroyed"),
        "{e}"
    );
    assert!(
        !h.destroy_version(&kref("t-destroy", 1), false)
            .unwrap()
            .changed
    );

    // Destroying the newest (with force) leaves a high-water record, so the
    // next version is 4, not 3 again.
    let c = h.destroy_version(&kref("t-destroy", 3), true).unwrap();
    assert_eq!(
        (c.previous_state, c.current_version),
        (KeyState::Active, Some(2))
    );
    assert_eq!(
        states(&h, "t-destroy"),
        [
            (1, KeyState::Destroyed),
            (2, KeyState::Active),
            (3, KeyState::Destroyed)
        ]
    );
    let s = raw_session();
    let record = find_by_label(&s, "hsmseal:t-destroy:high-water");
    assert!(s
        .get_attributes(record, &[AttributeType::Value])
        .unwrap()
        .contains(&Attribute::Value(b"3".to_vec())));
    assert_eq!(h.create_next_version("t-destroy").unwrap().version, 4);
    let e = h
        .wrap(&kref("t-destroy", 5), &dek, b"a")
        .unwrap_err()
        .to_string();
    assert!(e.contains("never created"), "{e}");

    // Everything gone: the name is remembered, create refuses, rotate goes on.
    h.destroy_version(&kref("t-destroy", 2), false).unwrap();
    h.destroy_version(&kref("t-destroy", 4), true).unwrap();
    assert!(states(&h, "t-destroy")
        .iter()
        .all(|(_, s)| *s == KeyState::Destroyed));
    let e = h.current_version("t-destroy").unwrap_err();
    assert!(e.to_string().contains("no versions left"), "{e}");
    let e = h.create_key("t-destroy").unwrap_err();
    assert!(e.to_string().contains("never reused"), "{e}");
    // One record remains (superseded ones are removed).
    let records = s
        .find_objects(&[Attribute::Label(b"hsmseal:t-destroy:high-water".to_vec())])
        .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(h.create_next_version("t-destroy").unwrap().version, 5);
}

#[test]
fn keys_without_a_time_in_their_id_fall_back_and_are_never_purged() {
    let _serial = serial();
    // Made the way hsmseal did before CKA_ID carried the time.
    let mut t = kwk_template("t-old", 1, now_unix());
    set(&mut t, Attribute::Id(b"hsmseal:t-old:v1".to_vec()));
    raw_session()
        .generate_key(&Mechanism::AesKeyGen, &t)
        .unwrap();
    let h = hsm();
    h.create_next_version("t-old").unwrap();
    let old = &h.key_versions("t-old").unwrap()[0];
    // SoftHSM2 cannot return CKA_START_DATE of a private key: unknown.
    // A token that can gives the day.
    match &old.created {
        None => assert_eq!(old.created_not_after, None),
        Some(d) => assert_eq!(d, &today()),
    }
    let r = h
        .purge(
            "t-old",
            0,
            now_unix() + 86_400 * 2,
            false,
            &Default::default(),
        )
        .unwrap();
    if old.created.is_none() {
        assert!(r.destroyed.is_empty(), "{r:?}");
        assert!(r.spared[0].reason.contains("unknown"), "{r:?}");
    }
}

/// An EC-P256 v1 key made the way `key create --type ec-p256` did before
/// EC keys joined the public-key lifecycle (same labels and attributes,
/// no `CKA_ID`) is a full member of it: listed as ec-p256 and current,
/// exported, rotated to a v2 with the creation time in its `CKA_ID`,
/// refused as an aes name, and never purged (its creation time is
/// unknown).
#[test]
fn an_ec_v1_key_made_before_ec_rotation_joins_the_lifecycle() {
    use hsmseal::hsm::ecdh::P256_PARAMS;
    let _serial = serial();
    let label = b"hsmseal-ec:ec-old:v1".to_vec();
    raw_session()
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(false),
                Attribute::Encrypt(false),
                Attribute::Wrap(false),
                Attribute::Derive(false),
                Attribute::Label(label.clone()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(true),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Sign(false),
                Attribute::AllowedMechanisms(vec![MechanismType::ECDH1_DERIVE]),
                Attribute::Label(label),
            ],
        )
        .unwrap();
    let h = hsm();
    let v = h.key_versions("ec-old").unwrap();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(
        (v[0].key_type.as_str(), v[0].state, v[0].created.as_deref()),
        ("ec-p256", KeyState::Active, None)
    );
    assert!(v[0].problems.is_empty(), "{:?}", v[0].problems);
    let r1 = h.export_recipient("ec-old", None).unwrap();
    assert_eq!(r1.key_ref(), kref("ec-old", 1));
    let e = h.create_key("ec-old").unwrap_err();
    assert!(e.to_string().contains("is an ec-p256 key"), "{e}");
    let v2 = h.create_next_version("ec-old").unwrap();
    assert_eq!((v2.version, v2.state), (2, KeyState::Active));
    assert!(v2.created.is_some(), "{v2:?}");
    let r2 = h.export_recipient("ec-old", None).unwrap();
    assert_eq!(r2.key_ref(), kref("ec-old", 2));
    assert_ne!(r1.fingerprint(), r2.fingerprint());
    let r = h
        .purge("ec-old", 0, now_unix() + 86_400, false, &Default::default())
        .unwrap();
    assert!(r.destroyed.is_empty(), "{r:?}");
    assert!(r.spared[0].reason.contains("unknown"), "{r:?}");
}

/// Token v2: every version made by create/rotate has a sign-only HMAC KDK
/// beside it; hsmseal derives v2 batch keys with it, refuses it when the
/// version is disabled or the KDK weak, writes v1 tokens under a version
/// without one, and destroys it with its version (crypto-shredding).
#[test]
fn each_version_has_a_sign_only_kdk_that_dies_with_it() {
    use hsmseal::columns::token::{binding, binding_prefix, BatchCache, ColumnId, Opener, Sealer};
    use hsmseal::hsm::kdk::{kdk_problems, kdk_template};
    use hsmseal::hsm::KeyAttributes;
    let _serial = serial();
    let h = hsm();
    h.create_key("t-kdk").unwrap();
    let v1 = kref("t-kdk", 1);
    let s = raw_session();
    let kdk = find_by_label(&s, "hsmseal-kdk:t-kdk:v1");
    let attrs = s
        .get_attributes(
            kdk,
            &[
                AttributeType::Class,
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Sign,
                AttributeType::Verify,
                AttributeType::Derive,
                AttributeType::AllowedMechanisms,
            ],
        )
        .unwrap();
    let a = KeyAttributes::from_attributes(&attrs);
    assert_eq!(kdk_problems(&a), Vec::<String>::new());
    assert_eq!(
        (a.sign, a.verify, a.decrypt),
        (Some(true), Some(false), Some(false))
    );
    // The KDK is not a KWK: the key list shows one version.
    assert_eq!(h.key_versions("t-kdk").unwrap().len(), 1);

    let mut aad = Vec::new();
    binding(
        &mut aad,
        &binding_prefix("ctx", &ColumnId::Name("c".into())),
        Some(b"1"),
    );
    let seal = |h: &Hsm, k: &KeyRef| {
        let mut t = Vec::new();
        Sealer::new(h, k, 10)
            .unwrap()
            .seal(&aad, 0, b"v", &mut t)
            .unwrap();
        t
    };
    let open = |h: &Hsm, t: &[u8]| {
        let cache = BatchCache::new();
        Opener::new(h, &cache)
            .open(&aad, t)
            .map(|(_, v)| v.to_vec())
    };
    let t1 = seal(&h, &v1);
    assert!(t1.starts_with(b"hsc2."));
    assert_eq!(open(&h, &t1).unwrap(), b"v");
    let d1 = h.derive(&v1, b"x").unwrap().unwrap();
    assert_eq!(h.derive(&v1, b"x").unwrap().unwrap().expose(), d1.expose());

    h.create_next_version("t-kdk").unwrap();
    let v2 = kref("t-kdk", 2);
    assert_ne!(h.derive(&v2, b"x").unwrap().unwrap().expose(), d1.expose());

    // Disabled: nothing derives, the token does not open.
    h.disable_version(&v1).unwrap();
    let e = open(&hsm(), &t1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    h.enable_version(&v1).unwrap();
    assert_eq!(open(&hsm(), &t1).unwrap(), b"v");

    // Destroyed with its version: the KDK object is gone too.
    h.destroy_version(&v1, false).unwrap();
    let left = s
        .find_objects(&[Attribute::Label(b"hsmseal-kdk:t-kdk:v1".to_vec())])
        .unwrap();
    assert!(left.is_empty(), "KDK left after destroy");
    let e = open(&hsm(), &t1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");

    // A version without KDK (as made before token v2) seals v1 tokens;
    // its v2 tokens no longer open.
    let t2 = seal(&h, &v2);
    s.destroy_object(find_by_label(&s, "hsmseal-kdk:t-kdk:v2"))
        .unwrap();
    let h2 = hsm();
    let old = seal(&h2, &v2);
    assert!(
        old.starts_with(b"hsc1."),
        "{}",
        String::from_utf8_lossy(&old)
    );
    assert_eq!(open(&h2, &old).unwrap(), b"v");
    assert_eq!(open(&h2, &t2).unwrap_err().kind(), ErrorKind::Key);

    // A weaker KDK (able to verify) is refused, naming the attribute.
    let mut t = kdk_template("t-kdk", 2, now_unix());
    set(&mut t, Attribute::Verify(true));
    s.generate_key(&Mechanism::GenericSecretKeyGen, &t).unwrap();
    let e = hsm().derive(&v2, b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    assert!(e.to_string().contains("CKA_VERIFY is true"), "{e}");
}

/// `CKA_SIGN` of the object labelled `label`.
fn sign_of(s: &Session, label: &str) -> Option<bool> {
    let h = find_by_label(s, label);
    s.get_attributes(h, &[AttributeType::Sign])
        .unwrap()
        .into_iter()
        .find_map(|a| match a {
            Attribute::Sign(v) => Some(v),
            _ => None,
        })
}

#[test]
fn disabling_a_version_clears_its_kdks_sign_and_enabling_restores_it() {
    let _serial = serial();
    let h = hsm();
    h.create_key("t-kdk-off").unwrap();
    let v1 = kref("t-kdk-off", 1);
    let s = raw_session();
    let label = "hsmseal-kdk:t-kdk-off:v1";
    assert_eq!(sign_of(&s, label), Some(true));
    h.disable_version(&v1).unwrap();
    assert_eq!(sign_of(&s, label), Some(false));
    // The token itself refuses to sign with it now, whoever asks.
    let kdk = find_by_label(&s, label);
    let e = s.sign(&Mechanism::Sha256Hmac, kdk, b"x").unwrap_err();
    assert!(
        matches!(e, CkError::Pkcs11(RvError::KeyFunctionNotPermitted, _)),
        "{e}"
    );
    assert_eq!(hsm().derive(&v1, b"x").unwrap_err().kind(), ErrorKind::Key);
    // Idempotent; and enable restores both.
    assert!(!h.disable_version(&v1).unwrap().changed);
    h.enable_version(&v1).unwrap();
    assert_eq!(sign_of(&s, label), Some(true));
    assert!(hsm().derive(&v1, b"x").unwrap().is_some());
    // A disable interrupted after the KWK (KDK still signing) is finished
    // by running it again.
    h.disable_version(&v1).unwrap();
    let kdk = find_by_label(&s, label);
    s.update_attributes(kdk, &[Attribute::Sign(true)]).unwrap();
    assert!(h.disable_version(&v1).unwrap().changed);
    assert_eq!(sign_of(&s, label), Some(false));
}

#[test]
fn blind_index_key_is_one_per_name_survives_rotation_and_dies_with_the_key() {
    use hsmseal::columns::blind_index::{column_id, BlindIndexer, Normalize};
    use hsmseal::columns::token::ColumnId;
    use hsmseal::hsm::bidx_key::{bidx_key_problems, bidx_key_template};
    use hsmseal::hsm::KeyAttributes;
    let _serial = serial();
    let h = hsm();
    h.create_key("t-bidx").unwrap();
    let col = column_id(&ColumnId::Name("email".into()));
    let index = |h: &Hsm, v: &[u8]| -> hsmseal::error::Result<String> {
        let i = BlindIndexer::new(h, "t-bidx", "app.users", &col, 64, Normalize::None)?;
        let mut out = Vec::new();
        i.index(v, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    };
    let s = raw_session();
    let label = "hsmseal-bidx:t-bidx";
    assert!(s
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
        .is_empty());
    // First use makes the object, with the checked attributes.
    let a = index(&h, b"alice@x.org").unwrap();
    let obj = find_by_label(&s, label);
    let attrs = s
        .get_attributes(obj, hsmseal::hsm::kwk::CHECKED_ATTRIBUTES)
        .unwrap();
    let attrs = KeyAttributes::from_attributes(&attrs);
    assert_eq!(bidx_key_problems(&attrs), Vec::<String>::new());
    assert_eq!(
        (attrs.sign, attrs.verify, attrs.extractable),
        (Some(true), Some(false), Some(false))
    );
    // Another process (a fresh Hsm) finds the same key: same values.
    assert_eq!(index(&hsm(), b"alice@x.org").unwrap(), a);
    assert_ne!(index(&h, b"bob@x.org").unwrap(), a);
    // Rotation and purge of old versions keep it; values unchanged.
    h.create_next_version("t-bidx").unwrap();
    assert_eq!(index(&hsm(), b"alice@x.org").unwrap(), a);
    h.destroy_version(&kref("t-bidx", 1), false).unwrap();
    assert_eq!(index(&hsm(), b"alice@x.org").unwrap(), a);
    // Every version disabled: no index.
    h.disable_version(&kref("t-bidx", 2)).unwrap();
    assert_eq!(index(&hsm(), b"x").unwrap_err().kind(), ErrorKind::Key);
    h.enable_version(&kref("t-bidx", 2)).unwrap();
    // A weaker object (extractable) is refused, naming the attribute.
    s.destroy_object(obj).unwrap();
    let mut t = bidx_key_template("t-bidx", now_unix());
    set(&mut t, Attribute::Extractable(true));
    let weak = s.generate_key(&Mechanism::GenericSecretKeyGen, &t).unwrap();
    let e = index(&hsm(), b"alice@x.org").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key, "{e}");
    assert!(e.to_string().contains("CKA_EXTRACTABLE is true"), "{e}");
    s.destroy_object(weak).unwrap();
    // Gone (here: destroyed behind hsmseal's back): a new one is made, and
    // old index values no longer match: the key is what makes them.
    let b = index(&hsm(), b"alice@x.org").unwrap();
    assert_ne!(b, a);
    // Destroying the key's last version destroys its index key.
    h.destroy_version(&kref("t-bidx", 2), true).unwrap();
    assert!(s
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap()
        .is_empty());
    assert_eq!(
        index(&hsm(), b"alice@x.org").unwrap_err().kind(),
        ErrorKind::Key
    );
}
