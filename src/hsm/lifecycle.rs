//! Key versions and their lifecycle on the token: create, rotate, list with
//! states, disable/enable, destroy and purge (docs/FORMAT.md section 1).
//!
//! How each state is represented, so that any PKCS#11 client sees the same
//! thing and the HSM itself enforces it where it can:
//! - **active / decrypt-only**: a key object labelled `hsmseal:{name}:v{n}`
//!   with `CKA_ENCRYPT` and `CKA_DECRYPT` true. The *current* (active)
//!   version is the highest one that is not disabled; the others decrypt
//!   only because hsmseal wraps new keys under the current one.
//! - **disabled**: the same object with `CKA_ENCRYPT` and `CKA_DECRYPT` set to
//!   false (`C_SetAttributeValue`); the token refuses `C_EncryptInit` and
//!   `C_DecryptInit` with it (`CKR_KEY_FUNCTION_NOT_PERMITTED`), whoever asks.
//!   A token that refuses the change makes `key disable` fail: hsmseal keeps
//!   no disabled state of its own that other clients would ignore.
//! - **destroyed**: no object (`C_DestroyObject`). A version number below the
//!   highest ever issued with no object is shown as destroyed, so the
//!   history stays visible.
//!
//! Version numbers are never reused. The next version is one more than the
//! highest ever issued, which is the highest existing object, or, once the
//! newest version has been destroyed, the number kept in a *high-water
//! record*: a `CKO_DATA` object labelled `hsmseal:{name}:high-water` whose
//! `CKA_VALUE` is that version number in ASCII decimal. It is written before
//! the newest version is destroyed (a crash in between leaves a record and a
//! key that agree); a token that cannot store it refuses the destroy. Reuse
//! would not be a security problem (the AAD names the version, so a new key
//! with an old number fails authentication), but old data would then report
//! "authentication failed" instead of "destroyed".
//!
//! PKCS#11 has no transactions; hsmseal makes each change atomic against
//! other hsmseal processes instead: every method that creates, changes or
//! destroys an object holds the exclusive token lock (`super::lock`) from
//! its first scan to its last check, so a version number is issued once
//! (two `key rotate` at once make v3 and v4, never two v3), and a destroy
//! never races a rotate. A client that does not take the lock (another
//! PKCS#11 tool, or an hsmseal without this lock) can still make a second
//! object with a label: creation re-checks the label under the lock and
//! backs out (see `Hsm::ensure_unique`), and a version that already has
//! several objects
//! follows the rule in docs/FORMAT.md section 1 (it decrypts, each object
//! tried in turn; nothing new is wrapped under it; `key list` and `doctor`
//! report it).

use super::errors::{c_function_name, ckr_name, is_gone, rv_of, token_error};
use super::kwk::{self, current_of, state_of, KeyInfo, KeyState, StateChange};
use super::objects::Family;
use super::pubkey::KeyKind;
use super::pubkey_lifecycle::PubFamily;
use super::Hsm;
use super::Verified;
use crate::backend::{validate_key_name, KeyRef};
use crate::error::{Error, Result};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// At most this many destroyed versions are listed per key (the newest
/// ones). Versions are sequential, so real keys never come close; the cap
/// only keeps a stray `hsmseal:x:v4000000000` object from another tool from
/// making `key list` enumerate billions of entries.
const MAX_LISTED_DESTROYED: usize = 4096;

/// One version considered by `key purge`.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct PurgeItem {
    pub version: u32,
    /// Its state before the purge.
    pub state: KeyState,
    pub created: Option<String>,
    pub reason: String,
}

/// What `key purge` destroyed (or, with `dry_run`, would destroy) and spared.
#[derive(Serialize, Clone, Debug)]
pub struct PurgeReport {
    pub key: String,
    pub token: String,
    pub dry_run: bool,
    /// Versions created at or before this moment (RFC 3339) are purged.
    pub cutoff: String,
    /// The current version, which is always spared.
    pub current_version: Option<u32>,
    pub destroyed: Vec<PurgeItem>,
    pub spared: Vec<PurgeItem>,
}

/// What `key rotate --if-older-than` decided ([`Hsm::rotate_if_older`]).
#[derive(Serialize, Clone, Debug)]
pub struct RotateReport {
    pub key: String,
    pub token: String,
    /// Whether a new version was created.
    pub rotated: bool,
    /// Why, in words (names the version and its creation time).
    pub reason: String,
    /// A current version created at or before this moment (RFC 3339) is
    /// rotated.
    pub cutoff: String,
    /// The version new encryptions use now (the new one if rotated).
    pub current_version: u32,
    /// The current version before (`None`: there was no usable one).
    pub previous_version: Option<u32>,
    /// Creation time of the current version.
    pub created: Option<String>,
}

const REASON_OLD: &str = "created at or before the cutoff";
const REASON_CURRENT: &str = "current version (new encryptions use it)";
const REASON_NEW: &str = "created after the cutoff";
const REASON_UNKNOWN: &str =
    "creation time unknown (never purged; `hsmseal key destroy` removes it explicitly)";

/// Which versions a purge with `cutoff` (Unix seconds) destroys: every
/// version that exists, is not the current one and was created at or before
/// the cutoff. A version whose creation time is unknown is spared: retention
/// must never destroy a key it cannot date. A version in `needed` (version
/// -> why, from `key purge --check`) is spared for that reason: data found
/// under it would become unreadable.
pub fn plan_purge(
    versions: &[KeyInfo],
    cutoff: u64,
    needed: &BTreeMap<u32, String>,
) -> (Vec<PurgeItem>, Vec<PurgeItem>) {
    let mut destroy = Vec::new();
    let mut spare = Vec::new();
    for k in versions {
        let item = |reason: &str| PurgeItem {
            version: k.version,
            state: k.state,
            created: k.created.clone(),
            reason: reason.to_string(),
        };
        match (k.state, k.created_not_after) {
            (KeyState::Destroyed, _) => {}
            (KeyState::Active, _) => spare.push(item(REASON_CURRENT)),
            (_, None) => spare.push(item(REASON_UNKNOWN)),
            (_, Some(t)) if t <= cutoff => match needed.get(&k.version) {
                Some(why) => spare.push(item(why)),
                None => destroy.push(item(REASON_OLD)),
            },
            (_, Some(_)) => spare.push(item(REASON_NEW)),
        }
    }
    (destroy, spare)
}

/// The versions of one key name: its AES KWK family or, if the token has
/// none, its public-key KWK family (a name is used by one type only).
enum KeyFamily {
    Aes(Family),
    Pub(PubFamily),
}

impl KeyFamily {
    fn last_issued(&self) -> u32 {
        match self {
            KeyFamily::Aes(f) => f.last_issued(),
            KeyFamily::Pub(f) => f.last_issued(),
        }
    }
}

/// "C_X returned CKR_Y" for a message of our own.
fn returned(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{} returned {}", c_function_name(*f), ckr_name(*rv)),
        other => other.to_string(),
    }
}

impl Hsm {
    /// Creates version 1 of `name`. Fails if the token knows the name (any
    /// version, even destroyed ones: their numbers are never reused). Check
    /// and creation happen under one exclusive token lock, so two hsmseal
    /// processes creating the same name make one key and one error.
    pub fn create_key(&self, name: &str) -> Result<KeyInfo> {
        self.create_key_with(name, false)
    }

    /// [`Self::create_key`]; with `backup`, the KWK and its KDK are
    /// backup-capable (extractable only under a `CKA_TRUSTED` key:
    /// `super::backup`, docs/FORMAT.md section 1).
    pub fn create_key_with(&self, name: &str, backup: bool) -> Result<KeyInfo> {
        validate_key_name(name)?;
        let admin = self.admin_logged_in()?;
        self.refuse_taken_name(&admin, KeyKind::Aes, name)?;
        let (mut info, h) = self.generate(&admin, name, 1, backup)?;
        self.ensure_unique(&admin, &info.key_ref(), h)?;
        info.state = KeyState::Active;
        Ok(info)
    }

    /// Creates version N+1 of `name` with the same template (key rotation),
    /// N being the highest version ever issued (destroyed ones included), and
    /// returns it: it is the current version from now on.
    pub fn create_next_version(&self, name: &str) -> Result<KeyInfo> {
        self.create_next_version_with(name, false)
    }

    /// [`Self::create_next_version`]; the new version is backup-capable if
    /// `backup` or if the newest existing version is (rotation keeps the
    /// property, so a backed-up key stays backed up).
    pub fn create_next_version_with(&self, name: &str, backup: bool) -> Result<KeyInfo> {
        validate_key_name(name)?;
        let admin = self.admin_logged_in()?;
        let family = self.family(&admin, name)?;
        if family.is_empty() {
            // A public-key KWK rotates the same way, under the same lock.
            if let Some(pf) = self.pub_family(&admin, name)? {
                if backup {
                    return Err(Error::usage(format!(
                        "--backup is for aes keys; {name} is an {} key",
                        pf.ty.name()
                    )));
                }
                return self.pub_rotate_locked(&admin, &pf);
            }
            return Err(self.key_not_found(name));
        }
        let backup = backup || self.newest_is_backup_capable(&admin, &family)?;
        self.next_version_locked(&admin, &family, name, backup)
    }

    /// True if the newest version object of `family` is extractable under
    /// a trusted key (made with `--backup`, or restored with it).
    fn newest_is_backup_capable(&self, admin: &Session, family: &Family) -> Result<bool> {
        let Some(&(_, h)) = family.keys.last() else {
            return Ok(false);
        };
        let a = self.read_attributes(admin, h)?;
        Ok(a.extractable == Some(true) && a.wrap_with_trusted == Some(true))
    }

    /// Rotates `name` only if its current version was created at or before
    /// `now - older_than` (the `key purge` cutoff rule), so a nightly
    /// `key rotate --if-older-than 30d` is idempotent. It also rotates when
    /// there is no usable current version (every version disabled or
    /// destroyed, or the current one weak or duplicated: a new version is
    /// what makes the key usable again) and when the current version's
    /// creation time is unknown (the new one records it, so that happens
    /// once). The decision and the creation are made under one exclusive
    /// token lock: two such jobs at once make one new version, never two.
    pub fn rotate_if_older(&self, name: &str, older_than: u64, now: u64) -> Result<RotateReport> {
        validate_key_name(name)?;
        let admin = self.admin_logged_in()?;
        let (family, versions) = self.key_family(&admin, name)?;
        let cutoff = now.saturating_sub(older_than);
        let current = versions.iter().find(|k| k.state == KeyState::Active);
        let stamp = |k: &KeyInfo| {
            k.created
                .clone()
                .unwrap_or_else(|| "at an unknown time".into())
        };
        let reason = match current {
            None => "no usable version (all disabled or destroyed)".to_string(),
            Some(c) if !c.problems.is_empty() => format!(
                "current version v{} is not usable: {}",
                c.version,
                c.problems.join("; ")
            ),
            Some(c) => match c.created_not_after {
                None => format!("creation time of current version v{} is unknown", c.version),
                Some(t) if t <= cutoff => format!(
                    "current version v{} was created {}, at or before the cutoff {}",
                    c.version,
                    stamp(c),
                    crate::time::rfc3339(cutoff)
                ),
                Some(_) => {
                    return Ok(RotateReport {
                        key: name.to_string(),
                        token: self.token_label.clone(),
                        rotated: false,
                        reason: format!(
                            "current version v{} was created {}, after the cutoff {}",
                            c.version,
                            stamp(c),
                            crate::time::rfc3339(cutoff)
                        ),
                        cutoff: crate::time::rfc3339(cutoff),
                        current_version: c.version,
                        previous_version: Some(c.version),
                        created: c.created.clone(),
                    })
                }
            },
        };
        let info = match &family {
            KeyFamily::Pub(pf) => self.pub_rotate_locked(&admin, pf)?,
            KeyFamily::Aes(family) => {
                let backup = self.newest_is_backup_capable(&admin, family)?;
                self.next_version_locked(&admin, family, name, backup)?
            }
        };
        Ok(RotateReport {
            key: name.to_string(),
            token: self.token_label.clone(),
            rotated: true,
            reason,
            cutoff: crate::time::rfc3339(cutoff),
            current_version: info.version,
            previous_version: current.map(|c| c.version),
            created: info.created,
        })
    }

    /// Creates the next version of `family` (non-empty); the caller holds
    /// the exclusive token lock from its scan.
    fn next_version_locked(
        &self,
        admin: &Session,
        family: &Family,
        name: &str,
        backup: bool,
    ) -> Result<KeyInfo> {
        let next = family.last_issued().checked_add(1).ok_or_else(|| {
            Error::key(format!("key {name:?} has reached the last version number"))
        })?;
        let (mut info, h) = self.generate(admin, name, next, backup)?;
        self.ensure_unique(admin, &info.key_ref(), h)?;
        info.state = KeyState::Active;
        Ok(info)
    }

    /// All hsmseal keys on the token, sorted by name then version, each
    /// version with its state, creation time, attributes and problems
    /// (destroyed versions included, see [`Self::key_versions`]).
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let admin = self.admin_reading()?;
        let scan = self.scan(&admin)?;
        let names: BTreeSet<&str> = scan
            .keys
            .iter()
            .map(|(k, _)| k.name.as_str())
            .chain(scan.records.iter().map(|(n, _)| n.as_str()))
            .collect();
        let mut out = Vec::new();
        for name in names {
            let family = self.family_from(&admin, &scan, name);
            if !family.is_empty() {
                out.extend(self.version_infos(&admin, &family)?);
            }
        }
        // Public-key KWKs, with their type, in the same list.
        for pf in self.pub_families(&admin)? {
            out.extend(self.pub_version_infos(&admin, &pf)?);
        }
        out.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
        Ok(out)
    }

    /// Every version of one key from v1 to the highest ever issued, oldest
    /// first, with states; `ErrorKind::Key` if the token knows no such key.
    pub fn key_versions(&self, name: &str) -> Result<Vec<KeyInfo>> {
        validate_key_name(name)?;
        let admin = self.admin_reading()?;
        Ok(self.key_family(&admin, name)?.1)
    }

    /// `name`'s family (AES, else public-key) and every version of it with
    /// its state; `ErrorKind::Key` if the token knows no such key.
    fn key_family(&self, admin: &Session, name: &str) -> Result<(KeyFamily, Vec<KeyInfo>)> {
        let family = self.family(admin, name)?;
        if !family.is_empty() {
            let versions = self.version_infos(admin, &family)?;
            return Ok((KeyFamily::Aes(family), versions));
        }
        match self.pub_family(admin, name)? {
            Some(pf) => {
                let versions = self.pub_version_infos(admin, &pf)?;
                Ok((KeyFamily::Pub(pf), versions))
            }
            None => Err(self.key_not_found(name)),
        }
    }

    /// Turns version `k` off in the HSM: `CKA_ENCRYPT` and `CKA_DECRYPT`
    /// false, so the token refuses to wrap or unwrap with it. If it was the
    /// current version, the highest remaining enabled version becomes
    /// current (or none, and encryption under the name fails). Idempotent.
    pub fn disable_version(&self, k: &KeyRef) -> Result<StateChange> {
        self.set_enabled(k, false)
    }

    /// Undoes [`Self::disable_version`]. Idempotent.
    pub fn enable_version(&self, k: &KeyRef) -> Result<StateChange> {
        self.set_enabled(k, true)
    }

    /// Checks that [`Self::destroy_version`] may destroy `k`, changing
    /// nothing: the version's entry, or `None` if it is already destroyed.
    pub fn check_destroy(&self, k: &KeyRef, force: bool) -> Result<Option<KeyInfo>> {
        validate_key_name(&k.name)?;
        let admin = self.admin_reading()?;
        let (family, versions) = self.key_family(&admin, &k.name)?;
        self.destroy_target(&family, versions, k, force)
    }

    /// Deletes every object labelled as version `k` from the token
    /// (`C_DestroyObject`); irreversible. Refuses the current version unless
    /// `force`. Idempotent: an already destroyed version is reported
    /// unchanged.
    pub fn destroy_version(&self, k: &KeyRef, force: bool) -> Result<StateChange> {
        validate_key_name(&k.name)?;
        let admin = self.admin_logged_in()?;
        let (family, versions) = self.key_family(&admin, &k.name)?;
        let target = self.destroy_target(&family, versions, k, force)?;
        let family = match family {
            KeyFamily::Aes(f) => f,
            KeyFamily::Pub(pf) => {
                // Also finishes an interrupted destroy (a public key left
                // beside a destroyed private key).
                self.pub_destroy_locked(&admin, &pf, &[k.version])?;
                let previous = target.as_ref().map_or(KeyState::Destroyed, |i| i.state);
                return self.pub_destroy_change(
                    &admin,
                    &k.name,
                    k.version,
                    previous,
                    target.is_some(),
                );
            }
        };
        let previous_state = target
            .as_ref()
            .map(|i| i.state)
            .unwrap_or(KeyState::Destroyed);
        if target.is_some() {
            self.destroy_versions(&admin, &family, &[k.version])?;
        } else {
            // Already destroyed: finish an interrupted destroy (its KDK,
            // and the key's blind-index key if no version is left).
            self.destroy_kdk(&admin, k)?;
            self.destroy_bidx_if_last(&admin, &k.name)?;
        }
        let after = self.family(&admin, &k.name)?;
        let versions = self.version_infos(&admin, &after)?;
        Ok(StateChange {
            key: k.name.clone(),
            version: k.version,
            token: self.token_label.clone(),
            action: "destroy",
            changed: target.is_some(),
            previous_state,
            state: state_of(&versions, k.version),
            current_version: current_of(&versions),
        })
    }

    /// Retention: destroys every version of `name` that is not the current
    /// one and was created at or before `now - older_than` (seconds).
    /// Versions with an unknown creation time are spared. With `dry_run`,
    /// only reports what it would destroy.
    pub fn purge(
        &self,
        name: &str,
        older_than: u64,
        now: u64,
        dry_run: bool,
        needed: &BTreeMap<u32, String>,
    ) -> Result<PurgeReport> {
        validate_key_name(name)?;
        // A dry run only reads; a purge holds the exclusive lock from its
        // listing to its last destroy.
        let admin = if dry_run {
            self.admin_reading()?
        } else {
            self.admin_logged_in()?
        };
        let (family, versions) = self.key_family(&admin, name)?;
        let cutoff = now.saturating_sub(older_than);
        let (destroyed, spared) = plan_purge(&versions, cutoff, needed);
        if !dry_run && !destroyed.is_empty() {
            let targets: Vec<u32> = destroyed.iter().map(|i| i.version).collect();
            match &family {
                KeyFamily::Pub(pf) => self.pub_destroy_locked(&admin, pf, &targets)?,
                KeyFamily::Aes(family) => self.destroy_versions(&admin, family, &targets)?,
            }
        }
        Ok(PurgeReport {
            key: name.to_string(),
            token: self.token_label.clone(),
            dry_run,
            cutoff: crate::time::rfc3339(cutoff),
            current_version: current_of(&versions),
            destroyed,
            spared,
        })
    }

    // ---- internals ----

    /// Generates version `version` of `name` and checks what the token
    /// made. The caller holds the exclusive token lock and then calls
    /// [`Self::ensure_unique`].
    fn generate(
        &self,
        admin: &Session,
        name: &str,
        version: u32,
        backup: bool,
    ) -> Result<(KeyInfo, ObjectHandle)> {
        let k = KeyRef {
            name: name.to_string(),
            version,
        };
        let mut template = kwk::kwk_template(name, version, crate::time::now_unix());
        if backup {
            kwk::make_backup_capable(&mut template);
        }
        let h = admin
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| {
                token_error(
                    e,
                    &self.token_label,
                    &format!("generating key {k} with CKM_AES_KEY_GEN"),
                )
            })?;
        // Check what the token made, not what we asked for: a token that
        // ignores part of the template must not leave a weak key behind.
        let info = self.key_info(admin, &k, h)?;
        if !info.is_ok() {
            let destroyed = match admin.destroy_object(h) {
                Ok(()) => "it was destroyed",
                Err(_) => "destroying it failed too, remove it by hand",
            };
            return Err(Error::token(format!(
                "token {:?} did not honour hsmseal's key template for {k}: {}; {destroyed}. Run `hsmseal doctor`",
                self.token_label,
                info.problems.join("; ")
            )));
        }
        // Its key-derivation key (v2 column tokens), made under the same
        // lock: a version never exists without one. If it cannot be made,
        // the new KWK is destroyed too and the creation fails.
        if let Err(e) = self.generate_kdk(admin, &k, backup) {
            let _ = admin.destroy_object(h);
            return Err(e);
        }
        Ok((info, h))
    }

    /// After generating `h` as version `k`: checks that no other object
    /// carries its label. hsmseal processes cannot make one meanwhile (the
    /// caller holds the exclusive token lock from its scan to here), but a
    /// client that does not take the lock can. Then `h` is destroyed (no
    /// hsmseal process can have used it: they need the lock to look it up)
    /// and the creation fails, so hsmseal never leaves a duplicated label.
    fn ensure_unique(&self, admin: &Session, k: &KeyRef, h: ObjectHandle) -> Result<()> {
        let t = &self.token_label;
        let label = kwk::label(&k.name, k.version);
        let handles = admin
            .find_objects(&[Attribute::Label(label.clone().into_bytes())])
            .map_err(|e| token_error(e, t, &format!("checking that {label} is unique")))?;
        if handles.len() > 1 {
            let destroyed = match admin.destroy_object(h) {
                Ok(()) => "hsmseal destroyed the one it made, so the label stays unique",
                Err(_) => "destroying the one hsmseal made failed too; `hsmseal key list` shows the duplicate",
            };
            return Err(Error::token(format!(
                "another PKCS#11 client created an object labelled {label} on token {t:?} while hsmseal was creating key {k}; {destroyed}. Check with `hsmseal key list` and run the command again"
            )));
        }
        self.verified
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                k.clone(),
                Arc::new(Verified {
                    usable: vec![h],
                    labelled: 1,
                }),
            );
        self.forget_current(&k.name);
        Ok(())
    }

    /// The entries of `family` from v1 to the highest issued, with states:
    /// present objects as read, missing numbers as destroyed.
    pub(super) fn version_infos(&self, admin: &Session, family: &Family) -> Result<Vec<KeyInfo>> {
        let mut present: BTreeMap<u32, Vec<KeyInfo>> = BTreeMap::new();
        for (v, h) in &family.keys {
            let k = KeyRef {
                name: family.name.clone(),
                version: *v,
            };
            if let Some(info) = self.key_info_if_present(admin, &k, *h)? {
                present.entry(*v).or_default().push(info);
            }
        }
        // Same rule as `current_version`: the highest version with an
        // object that is not disabled.
        let current = present
            .iter()
            .rev()
            .find(|(_, infos)| infos.iter().any(|i| i.state != KeyState::Disabled))
            .map(|(v, _)| *v);
        let mut out = Vec::new();
        for (v, infos) in present.iter_mut() {
            let n = infos.len();
            for info in infos.iter_mut() {
                if Some(*v) == current {
                    info.state = KeyState::Active;
                }
                if n > 1 {
                    info.problems
                        .push(kwk::duplicate_problem(n, &info.name, info.version));
                }
            }
        }
        // Missing numbers, newest first, bounded (see MAX_LISTED_DESTROYED).
        let mut destroyed = Vec::new();
        let mut v = family.last_issued();
        while v >= 1 && destroyed.len() < MAX_LISTED_DESTROYED {
            if !present.contains_key(&v) {
                destroyed.push(KeyInfo::destroyed(&family.name, v));
            }
            v -= 1;
        }
        out.extend(present.into_values().flatten());
        out.extend(destroyed);
        out.sort_by_key(|k| k.version);
        Ok(out)
    }

    fn set_enabled(&self, k: &KeyRef, enable: bool) -> Result<StateChange> {
        validate_key_name(&k.name)?;
        let t = &self.token_label;
        let action = if enable { "enable" } else { "disable" };
        let admin = self.admin_logged_in()?;
        let family = self.family(&admin, &k.name)?;
        if family.is_empty() {
            if let Some(pf) = self.pub_family(&admin, &k.name)? {
                return self.pub_set_enabled(&admin, &pf, k.version, enable);
            }
        }
        let handles = family.handles(k.version);
        if handles.is_empty() {
            return Err(self.missing_version(&family, k.version));
        }
        let before = self.version_infos(&admin, &family)?;
        let mut changed = false;
        // The version's KDK follows its KWK (CKA_SIGN false while
        // disabled), so the token itself also refuses to derive v2 batch
        // keys under a disabled version, whoever asks. Enabling restores
        // the KDK first and disabling clears it last: a crash in between
        // leaves a KWK state hsmseal checks before every derivation, and
        // running the command again finishes (both steps are idempotent).
        if enable {
            changed |= self.set_kdk_sign(&admin, k, true)?;
        }
        for h in handles {
            let Some(disabled) = self.disabled(&admin, h)? else {
                continue;
            };
            if disabled != enable {
                continue;
            }
            admin
                .update_attributes(h, &[Attribute::Encrypt(enable), Attribute::Decrypt(enable)])
                .map_err(|e| match rv_of(&e) {
                    Some(
                        RvError::AttributeReadOnly
                        | RvError::ActionProhibited
                        | RvError::AttributeTypeInvalid
                        | RvError::AttributeValueInvalid,
                    ) => Error::token(format!(
                        "token {t:?} does not let hsmseal change CKA_ENCRYPT/CKA_DECRYPT of key {k} ({}), so it cannot {action} it there (hsmseal keeps no disabled state of its own, which other PKCS#11 clients would ignore); `hsmseal key destroy` removes a version for good",
                        returned(&e)
                    )),
                    _ => token_error(e, t, &format!("{action} key {k}: setting CKA_ENCRYPT and CKA_DECRYPT")),
                })?;
            changed = true;
        }
        if !enable {
            changed |= self.set_kdk_sign(&admin, k, false)?;
        }
        self.evict(k);
        let after = self.family(&admin, &k.name)?;
        let versions = self.version_infos(&admin, &after)?;
        let state = state_of(&versions, k.version);
        // Check what the token did, not what we asked for.
        if (state == KeyState::Disabled) == enable {
            return Err(Error::token(format!(
                "token {t:?} accepted the change to CKA_ENCRYPT/CKA_DECRYPT of key {k} but reports the key as {state}; it cannot be {action}d on this token"
            )));
        }
        Ok(StateChange {
            key: k.name.clone(),
            version: k.version,
            token: t.clone(),
            action,
            changed,
            previous_state: state_of(&before, k.version),
            state,
            current_version: current_of(&versions),
        })
    }

    /// Sets `CKA_SIGN` of the KDK(s) of `k` to `sign` where it differs;
    /// true if anything changed. A version without KDK changes nothing.
    fn set_kdk_sign(&self, admin: &Session, k: &KeyRef, sign: bool) -> Result<bool> {
        let t = &self.token_label;
        let action = if sign { "enable" } else { "disable" };
        let mut changed = false;
        for h in self.kdk_objects(admin, k)? {
            let now = match admin.get_attributes(h, &[AttributeType::Sign]) {
                Ok(a) => a.into_iter().find_map(|a| match a {
                    Attribute::Sign(v) => Some(v),
                    _ => None,
                }),
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, t, "reading a key-derivation key's CKA_SIGN")),
            };
            if now == Some(sign) {
                continue;
            }
            admin
                .update_attributes(h, &[Attribute::Sign(sign)])
                .map_err(|e| {
                    Error::token(format!(
                        "token {t:?} did not let hsmseal set CKA_SIGN of the key-derivation key {} to {sign} ({}), so it cannot {action} {k} there; run the command again, or `hsmseal key destroy` the version",
                        super::kdk::kdk_label(&k.name, k.version),
                        returned(&e)
                    ))
                })?;
            changed = true;
        }
        Ok(changed)
    }

    /// `k`'s entry among `versions` (of `family`) if
    /// [`Self::destroy_version`] may destroy it, `None` if it is already
    /// destroyed, or why not: the current version only with `force`, for
    /// every key type.
    fn destroy_target(
        &self,
        family: &KeyFamily,
        versions: Vec<KeyInfo>,
        k: &KeyRef,
        force: bool,
    ) -> Result<Option<KeyInfo>> {
        if k.version > family.last_issued() {
            return Err(match family {
                KeyFamily::Aes(f) => self.missing_version(f, k.version),
                KeyFamily::Pub(f) => self.pub_missing_version(f, k.version),
            });
        }
        let Some(info) = versions
            .into_iter()
            .find(|i| i.version == k.version && i.state != KeyState::Destroyed)
        else {
            return Ok(None);
        };
        if info.state == KeyState::Active && !force {
            let name = &k.name;
            return Err(Error::usage(match family {
                KeyFamily::Aes(_) => format!(
                    "refusing to destroy {k}: it is the current version, which new encryptions under {name} use. Run `hsmseal key rotate {name}` first, or pass --force (new encryptions then use the highest remaining enabled version, or fail if there is none)"
                ),
                KeyFamily::Pub(_) => format!(
                    "refusing to destroy {k}: it is the current version, which `key export-public {name}` hands out for new encryptions. Run `hsmseal key rotate {name}` first, or pass --force"
                ),
            }));
        }
        Ok(Some(info))
    }

    /// Destroys every object of each of `versions`, after recording the
    /// newest version number if it is among them (so it is never reused).
    fn destroy_versions(&self, admin: &Session, family: &Family, versions: &[u32]) -> Result<()> {
        let t = &self.token_label;
        let name = &family.name;
        if let Some(newest) = family.newest() {
            if versions.contains(&newest) && newest > family.high_water {
                self.write_high_water(admin, family, newest)?;
            }
        }
        let mut done: Vec<String> = Vec::new();
        for &v in versions {
            let k = KeyRef {
                name: name.clone(),
                version: v,
            };
            for h in family.handles(v) {
                match admin.destroy_object(h) {
                    Ok(()) => {}
                    // Someone else destroyed it meanwhile: the result we wanted.
                    Err(e) if is_gone(&e) => {}
                    Err(e) => {
                        let already = if done.is_empty() {
                            String::new()
                        } else {
                            format!(" (already destroyed: {})", done.join(", "))
                        };
                        return Err(token_error(e, t, &format!("destroying key {k}{already}")));
                    }
                }
            }
            // Its KDK after it: a crash in between leaves a KDK whose KWK is
            // gone, which derives nothing (derivation checks the KWK first)
            // and is removed by running the destroy again.
            self.destroy_kdk(admin, &k)?;
            self.evict(&k);
            done.push(format!("v{v}"));
        }
        // The key's blind-index key goes with its last version (a crash
        // before this leaves it with no version, which computes nothing:
        // indexes need a usable version; running the destroy again
        // removes it).
        self.destroy_bidx_if_last(admin, name)?;
        Ok(())
    }

    /// Records on the token that versions up to `version` of the family were
    /// issued (a new high-water record; older ones are then removed).
    fn write_high_water(&self, admin: &Session, family: &Family, version: u32) -> Result<()> {
        let name = &family.name;
        let template = [
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(kwk::high_water_label(name).into_bytes()),
            Attribute::Application(b"hsmseal".to_vec()),
            Attribute::Value(version.to_string().into_bytes()),
        ];
        admin.create_object(&template).map_err(|e| {
            Error::token(format!(
                "cannot record on token {:?} that {name} v{version} was issued ({}: creating a CKO_DATA object), so its number could be reused after it is destroyed; nothing was destroyed. Run `hsmseal key rotate {name}` first so v{version} is not the newest version",
                self.token_label,
                returned(&e)
            ))
        })?;
        // Superseded: the new record holds the highest number. One left
        // behind (a failure here) is harmless: the highest value wins.
        for old in &family.records {
            let _ = admin.destroy_object(*old);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(version: u32, state: KeyState, created: Option<u64>) -> KeyInfo {
        let mut k = KeyInfo::destroyed("k", version);
        k.state = state;
        k.created_not_after = created;
        k.created = created.map(crate::time::rfc3339);
        k
    }

    #[test]
    fn purge_spares_the_current_version_newer_ones_and_undated_ones() {
        let versions = [
            info(1, KeyState::DecryptOnly, Some(100)),
            info(2, KeyState::Destroyed, None),
            info(3, KeyState::Disabled, Some(200)),
            info(4, KeyState::DecryptOnly, None),
            info(5, KeyState::DecryptOnly, Some(201)),
            info(6, KeyState::Active, Some(50)),
            info(7, KeyState::Disabled, Some(60)),
        ];
        let (destroy, spare) = plan_purge(&versions, 200, &BTreeMap::new());
        let v = |items: &[PurgeItem]| items.iter().map(|i| i.version).collect::<Vec<_>>();
        // At the cutoff exactly counts as old; a disabled version newer than
        // the current one is not current, so it goes too.
        assert_eq!(v(&destroy), [1, 3, 7]);
        assert_eq!(v(&spare), [4, 5, 6]);
        assert_eq!(spare[0].reason, REASON_UNKNOWN);
        assert_eq!(spare[1].reason, REASON_NEW);
        assert_eq!(spare[2].reason, REASON_CURRENT);
        assert!(destroy.iter().all(|i| i.reason == REASON_OLD));
        assert_eq!(destroy[1].state, KeyState::Disabled);
        // Nothing is old enough (the current version's age never matters).
        let (destroy, spare) = plan_purge(&versions, 59, &BTreeMap::new());
        assert!(destroy.is_empty(), "{destroy:?}");
        assert_eq!(spare.len(), 6);
        // Versions still needed by data (`--check`) are spared with the
        // reason given; only old, otherwise destroyable ones are affected.
        let needed: BTreeMap<u32, String> = [
            (1, "needed by a".to_string()),
            (6, "needed by b".to_string()),
        ]
        .into();
        let (destroy, spare) = plan_purge(&versions, 200, &needed);
        assert_eq!(v(&destroy), [3, 7]);
        assert_eq!(v(&spare), [1, 4, 5, 6]);
        assert_eq!(spare[0].reason, "needed by a");
        assert_eq!(spare[3].reason, REASON_CURRENT);
    }
}
