//! Login behaviour, in its own process with its own token: PKCS#11 login
//! state is shared by the whole process, so these cannot run next to the
//! tests in `tests/hsm.rs` (which stay logged in). One test, in order.

mod support;

use hsmseal::backend::{KeyBackend, KeyRef};
use hsmseal::error::ErrorKind;
use hsmseal::hsm::Hsm;
use hsmseal::secret::{Pin, SecretKey};
use support::TestToken;

#[test]
fn not_logged_in_then_wrong_pin_once_then_right_pin() {
    let t = TestToken::new();
    std::env::set_var("SOFTHSM2_CONF", &t.conf);
    let h = Hsm::open(&t.module, &t.label).unwrap();

    // Before login the keys are invisible: say so instead of "no keys".
    let e = h.list_keys().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Pin, "{e}");
    assert!(e.to_string().contains("not logged in"), "{e}");

    let wrong = "not-the-pin-0000";
    let e = h.login(&Pin::new(wrong.into())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Pin, "{e}");
    let m = e.to_string();
    assert!(
        m.starts_with(&format!(
            "wrong PIN for token {:?} (not retried, to avoid locking the token)",
            t.label
        )),
        "{m}"
    );
    assert!(!m.contains(wrong) && !m.contains(&t.pin), "{m}");
    assert!(!format!("{e:?}").contains(wrong));

    // Not locked by the one try, and a correct login works.
    let report = h.doctor().unwrap();
    assert!(!report.token.user_pin_locked, "{report}");
    assert!(!report.token.logged_in);
    assert!(report.keys.is_none());
    // The token recorded the failed try (SoftHSM2 never locks, real HSMs
    // do after a few: hence one try only).
    assert!(report.token.user_pin_count_low, "{report}");
    assert!(!report.token.user_pin_final_try, "{report}");
    h.login(&Pin::new(t.pin.clone())).unwrap();
    // A second login is not an error (already logged in).
    h.login(&Pin::new(t.pin.clone())).unwrap();
    let report = h.doctor().unwrap();
    assert!(report.token.logged_in);
    assert!(
        !report.token.user_pin_count_low,
        "reset by the good login: {report}"
    );

    h.create_key("login").unwrap();
    let k = KeyRef {
        name: "login".into(),
        version: 1,
    };
    let dek = SecretKey::random();
    let w = h.wrap(&k, &dek, b"").unwrap();
    assert_eq!(h.unwrap(&k, &w, b"").unwrap().expose(), dek.expose());

    // A second Hsm on the same token shares the login (PKCS#11 keeps it per
    // process) and works while the first is alive.
    let h2 = Hsm::open(&t.module, &t.label).unwrap();
    assert_eq!(h2.unwrap(&k, &w, b"").unwrap().expose(), dek.expose());

    // SoftHSM2 read SOFTHSM2_CONF once; pointing it elsewhere now must not
    // silently keep using (or initialising tokens in) the old directory.
    let other = TestToken::new();
    std::env::set_var("SOFTHSM2_CONF", &other.conf);
    for e in [
        Hsm::open(&other.module, &other.label).unwrap_err(),
        Hsm::init_token(
            &other.module,
            "x",
            &Pin::new("so-pin-5678".into()),
            &Pin::new("user-pin-1234".into()),
        )
        .unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::Token, "{e}");
        assert!(e.to_string().contains("SOFTHSM2_CONF changed"), "{e}");
    }
    std::env::set_var("SOFTHSM2_CONF", &t.conf);
}
