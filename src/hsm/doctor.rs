//! `hsmseal doctor`: what the module and token are, whether they support
//! what hsmseal needs, and whether each key is usable.
//!
//! The report collects problems instead of failing at the first one, so a
//! user sees everything that is wrong in one run. It contains no secret: the
//! PIN is never read here and keys are described only by their attributes.

use super::errors::token_error;
use super::kwk::KeyInfo;
use super::Hsm;
use crate::error::Result;
use cryptoki::mechanism::MechanismType;
use cryptoki::session::SessionState;
use serde::Serialize;
use std::fmt;

/// Everything `hsmseal doctor` prints (human `Display`, or JSON via serde).
#[derive(Serialize, Clone, Debug)]
pub struct DoctorReport {
    pub module: String,
    pub library: LibraryReport,
    pub token: TokenReport,
    pub mechanisms: Vec<MechanismReport>,
    /// The hsmseal keys on the token; `None` when not logged in (the keys
    /// are private objects, invisible before login).
    pub keys: Option<Vec<KeyInfo>>,
    /// The KDKs and blind-index keys, checked; `None` when not logged in.
    pub hmac_keys: Option<Vec<super::hmac_keys::HmacKeyInfo>>,
    /// Everything that would stop hsmseal from working, one line each.
    pub problems: Vec<String>,
}

#[derive(Serialize, Clone, Debug)]
pub struct LibraryReport {
    pub manufacturer: String,
    pub description: String,
    pub version: String,
    pub cryptoki_version: String,
}

#[derive(Serialize, Clone, Debug)]
pub struct TokenReport {
    pub label: String,
    pub slot: u64,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub hardware_version: String,
    pub firmware_version: String,
    pub logged_in: bool,
    pub user_pin_initialized: bool,
    pub user_pin_count_low: bool,
    pub user_pin_final_try: bool,
    pub user_pin_locked: bool,
    pub write_protected: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct MechanismReport {
    /// `CKM_AES_GCM`, ...
    pub name: String,
    /// What hsmseal uses it for.
    pub used_for: String,
    pub supported: bool,
    pub min_key_size: Option<u64>,
    pub max_key_size: Option<u64>,
    /// Missing capabilities; empty = fine.
    pub problems: Vec<String>,
}

impl DoctorReport {
    /// True when hsmseal can work with this module, token and its keys.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The mechanisms hsmseal needs: (mechanism, used for, needs encrypt+decrypt,
/// needs generate).
fn needed() -> [(MechanismType, &'static str, bool, bool); 2] {
    [
        (
            MechanismType::AES_GCM,
            "wrapping and unwrapping data keys",
            true,
            false,
        ),
        (MechanismType::AES_KEY_GEN, "creating keys", false, true),
    ]
}

impl Hsm {
    /// Module, token, mechanism and key report for `hsmseal doctor`.
    pub fn doctor(&self) -> Result<DoctorReport> {
        let t = &self.token_label;
        let lib = self
            .ctx
            .get_library_info()
            .map_err(|e| token_error(e, t, "reading module information"))?;
        let info = self.token_info()?;
        let logged_in = {
            let admin = self.admin(super::lock::Mode::Shared)?;
            matches!(
                admin.get_session_info().map(|i| i.session_state()),
                Ok(SessionState::RoUser | SessionState::RwUser)
            )
        };
        let mut problems = Vec::new();
        if info.user_pin_locked() {
            problems.push(format!("the user PIN of token {t:?} is locked"));
        } else if !info.user_pin_initialized() {
            problems.push(format!("token {t:?} has no user PIN set"));
        }

        let available = self
            .ctx
            .get_mechanism_list(self.slot)
            .map_err(|e| token_error(e, t, "listing mechanisms"))?;
        let mut mechanisms = Vec::new();
        for (mech, used_for, crypt, generate) in needed() {
            let mut r = MechanismReport {
                name: mech.to_string(),
                used_for: used_for.to_string(),
                supported: available.contains(&mech),
                min_key_size: None,
                max_key_size: None,
                problems: Vec::new(),
            };
            if r.supported {
                let mi = self
                    .ctx
                    .get_mechanism_info(self.slot, mech)
                    .map_err(|e| token_error(e, t, &format!("reading {mech} information")))?;
                let (min, max) = (mi.min_key_size() as u64, mi.max_key_size() as u64);
                r.min_key_size = Some(min);
                r.max_key_size = Some(max);
                if crypt && !mi.encrypt() {
                    r.problems.push("no encrypt".into());
                }
                if crypt && !mi.decrypt() {
                    r.problems.push("no decrypt".into());
                }
                if generate && !mi.generate() {
                    r.problems.push("no key generation".into());
                }
                // PKCS#11 gives AES key sizes in bytes; some modules use bits.
                let fits = |n: u64| min <= n && n <= max;
                if !fits(32) && !fits(256) {
                    r.problems
                        .push(format!("key sizes {min}-{max} do not include AES-256"));
                }
            } else {
                r.problems.push("not supported by the token".into());
            }
            for p in &r.problems {
                problems.push(format!("{}: {p} (needed for {used_for})", r.name));
            }
            mechanisms.push(r);
        }

        let keys = if logged_in {
            match self.list_keys() {
                Ok(keys) => {
                    for k in keys.iter().filter(|k| !k.is_ok()) {
                        problems.push(if super::kwk::only_duplicated(&k.problems) {
                            format!("key {}: {}", k.key_ref(), k.problems.join("; "))
                        } else {
                            super::kwk::refusal(&k.key_ref(), &k.problems)
                        });
                    }
                    Some(keys)
                }
                Err(e) => {
                    problems.push(format!("listing keys failed: {e}"));
                    None
                }
            }
        } else {
            None
        };
        let hmac_keys = match &keys {
            Some(k) => match self.hmac_keys(k) {
                Ok(h) => {
                    // Orphans (left by an interrupted destroy) are listed
                    // but harmless: nothing uses them.
                    for o in &h {
                        let real: Vec<&String> = o
                            .problems
                            .iter()
                            .filter(|p| !p.starts_with("orphan:"))
                            .collect();
                        if !real.is_empty() {
                            problems.push(format!(
                                "{} is refused: {}",
                                o.label,
                                real.iter()
                                    .map(|p| p.as_str())
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            ));
                        }
                    }
                    Some(h)
                }
                Err(e) => {
                    problems.push(format!("listing HMAC keys failed: {e}"));
                    None
                }
            },
            None => None,
        };

        Ok(DoctorReport {
            module: self.module.display().to_string(),
            library: LibraryReport {
                manufacturer: lib.manufacturer_id().trim().to_string(),
                description: lib.library_description().trim().to_string(),
                version: lib.library_version().to_string(),
                cryptoki_version: lib.cryptoki_version().to_string(),
            },
            token: TokenReport {
                label: info.label().trim().to_string(),
                slot: self.slot.id(),
                manufacturer: info.manufacturer_id().trim().to_string(),
                model: info.model().trim().to_string(),
                serial: info.serial_number().trim().to_string(),
                hardware_version: info.hardware_version().to_string(),
                firmware_version: info.firmware_version().to_string(),
                logged_in,
                user_pin_initialized: info.user_pin_initialized(),
                user_pin_count_low: info.user_pin_count_low(),
                user_pin_final_try: info.user_pin_final_try(),
                user_pin_locked: info.user_pin_locked(),
                write_protected: info.write_protected(),
            },
            mechanisms,
            keys,
            hmac_keys,
            problems,
        })
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.library;
        let t = &self.token;
        writeln!(f, "module:  {}", self.module)?;
        writeln!(
            f,
            "         {} {} {} (Cryptoki {})",
            l.manufacturer, l.description, l.version, l.cryptoki_version
        )?;
        writeln!(f, "token:   {:?} in slot {}", t.label, t.slot)?;
        writeln!(
            f,
            "         {} {}, serial {}, firmware {}",
            t.manufacturer, t.model, t.serial, t.firmware_version
        )?;
        let pin = if t.user_pin_locked {
            "user PIN LOCKED"
        } else if !t.user_pin_initialized {
            "no user PIN set"
        } else if t.user_pin_final_try {
            "user PIN: one try left"
        } else if t.user_pin_count_low {
            "user PIN: wrong tries recorded"
        } else {
            "user PIN ok"
        };
        let login = if t.logged_in {
            "logged in"
        } else {
            "not logged in"
        };
        writeln!(f, "         {login}; {pin}")?;
        writeln!(f, "mechanisms:")?;
        for m in &self.mechanisms {
            let sizes = match (m.min_key_size, m.max_key_size) {
                (Some(a), Some(b)) => format!(", key sizes {a}-{b}"),
                _ => String::new(),
            };
            let status = if m.problems.is_empty() {
                "ok".to_string()
            } else {
                m.problems.join(", ")
            };
            writeln!(f, "  {:<16} {status}{sizes} (for {})", m.name, m.used_for)?;
        }
        match &self.keys {
            None => writeln!(f, "keys:    not listed (log in to see them)")?,
            Some(keys) if keys.is_empty() => writeln!(
                f,
                "keys:    none (create one with `hsmseal key create NAME`)"
            )?,
            Some(keys) => {
                writeln!(f, "keys:")?;
                for k in keys {
                    let name = format!("{} v{}", k.name, k.version);
                    if k.state == super::kwk::KeyState::Destroyed {
                        writeln!(f, "  {name:<24} {:<12}", k.state.to_string())?;
                        continue;
                    }
                    let created = k.created.as_deref().unwrap_or("unknown");
                    let status = format!(
                        "{}{}",
                        super::kwk::status(&k.problems),
                        super::kwk::provenance_note(k)
                    );
                    writeln!(
                        f,
                        "  {name:<24} {:<12} created {created:<20}  {status}",
                        k.state.to_string()
                    )?;
                }
            }
        }
        if let Some(h) = self.hmac_keys.as_ref().filter(|h| !h.is_empty()) {
            writeln!(f, "hmac keys:")?;
            for o in h {
                writeln!(f, "  {}", hmac_key_line(o))?;
            }
        }
        if self.ok() {
            write!(f, "result:  ok")
        } else {
            writeln!(f, "result:  {} problem(s)", self.problems.len())?;
            for (i, p) in self.problems.iter().enumerate() {
                if i > 0 {
                    writeln!(f)?;
                }
                write!(f, "  - {p}")?;
            }
            Ok(())
        }
    }
}

/// One KDK or blind-index key for `doctor` and `key list`: label, what it
/// is, creation time, status.
pub fn hmac_key_line(o: &super::hmac_keys::HmacKeyInfo) -> String {
    let what = match o.version {
        Some(v) => format!("key-derivation key of {} v{v}", o.key),
        None => format!("blind-index key of {}", o.key),
    };
    let status = if o.problems.is_empty() {
        "ok".to_string()
    } else {
        o.problems.join("; ")
    };
    format!(
        "{:<32} {what:<40} created {:<20}  {status}",
        o.label,
        o.created.as_deref().unwrap_or("unknown")
    )
}
