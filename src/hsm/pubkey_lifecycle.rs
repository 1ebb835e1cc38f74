//! The lifecycle of public-key KWKs (`super::pubkey`), as for AES KWKs
//! (`super::lifecycle`): versions, rotation, disable/enable, destroy and
//! purge, for every type in [`super::pubkey::PUBKEY_TYPES`] (one scan covers all prefixes,
//! so a new type needs no code here).
//!
//! Representation (docs/FORMAT.md section 1, "Public-key KWKs"):
//! - a version is a key pair labelled `{prefix}{name}:v{n}`; the private
//!   key carries its creation time in `CKA_ID` as AES KWKs do;
//! - **current**: the highest version whose private key exists and is not
//!   disabled; `key export-public` exports it by default;
//! - **disabled**: the private key's one usage (`CKA_DECRYPT` for RSA-OAEP,
//!   `CKA_DERIVE` for EC-P256) set to false, so the token refuses it whoever asks; the public key is
//!   untouched (hosts holding the recipient file can still encrypt to it,
//!   which `key disable` says);
//! - **destroyed**: both objects gone; a number below the highest issued
//!   with no object is shown as destroyed, and the highest number is kept
//!   in a high-water `CKO_DATA` record `{prefix}{name}:high-water` before
//!   the newest version is destroyed, so numbers are never reused.
//!
//! Concurrency: every method that changes objects runs on the admin
//! session under the exclusive token lock (`Hsm::admin_logged_in`) from its
//! scan to its last check, the same lock AES rotation takes, so two
//! `key rotate` of one public key issue two distinct versions.
//!
//! A name is used by one type only: every `key create` (aes, rsa-oaep,
//! ec-p256) asks [`Hsm::refuse_taken_name`] under the exclusive lock it
//! then generates under, so two creates of one name at once (of the same
//! or different types) make one key and one refusal.

use super::errors::{is_gone, token_error};
use super::kwk::{current_of, state_of, KeyAttributes, KeyInfo, KeyState, StateChange};
use super::pubkey::{
    parse_pub_high_water, parse_pub_label, private_attribute_types, private_problems, KeyKind,
    PubKeyType,
};
use super::Hsm;
use crate::backend::KeyRef;
use crate::error::{Error, Result};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use std::collections::BTreeMap;

/// What the token holds for one public-key KWK name of one type.
pub(super) struct PubFamily {
    pub(super) ty: PubKeyType,
    pub(super) name: String,
    /// (version, private key object), by version.
    pub(super) privs: Vec<(u32, ObjectHandle)>,
    /// (version, public key object), by version.
    pub(super) pubs: Vec<(u32, ObjectHandle)>,
    /// The highest number a high-water record holds (0: none).
    pub(super) high_water: u32,
    pub(super) records: Vec<ObjectHandle>,
}

impl PubFamily {
    fn new(ty: PubKeyType, name: &str) -> PubFamily {
        PubFamily {
            ty,
            name: name.to_string(),
            privs: Vec::new(),
            pubs: Vec::new(),
            high_water: 0,
            records: Vec::new(),
        }
    }

    /// The highest version with an object (private or public).
    pub(super) fn newest(&self) -> Option<u32> {
        self.privs.iter().chain(&self.pubs).map(|(v, _)| *v).max()
    }

    pub(super) fn last_issued(&self) -> u32 {
        self.newest().unwrap_or(0).max(self.high_water)
    }

    fn is_empty(&self) -> bool {
        self.privs.is_empty() && self.pubs.is_empty() && self.high_water == 0
    }

    fn versions(&self) -> std::collections::BTreeSet<u32> {
        self.privs
            .iter()
            .chain(&self.pubs)
            .map(|(v, _)| *v)
            .collect()
    }

    fn of(list: &[(u32, ObjectHandle)], v: u32) -> Vec<ObjectHandle> {
        list.iter()
            .filter(|(x, _)| *x == v)
            .map(|(_, h)| *h)
            .collect()
    }
}

/// The modulus size of the RSA public key `h`, if it reads.
fn modulus_bits(admin: &Session, h: ObjectHandle) -> Option<u64> {
    admin
        .get_attributes(h, &[AttributeType::ModulusBits])
        .ok()?
        .into_iter()
        .find_map(|a| match a {
            Attribute::ModulusBits(b) => Some(u64::from(b)),
            _ => None,
        })
}

/// The `key_type` shown for a version: `rsa-oaep-3072`, `ec-p256`, ...
fn describe(admin: &Session, ty: PubKeyType, public: Option<ObjectHandle>) -> String {
    match ty {
        PubKeyType::RsaOaep => match public.and_then(|h| modulus_bits(admin, h)) {
            Some(b) => format!("{}-{b}", ty.name()),
            None => ty.name().to_string(),
        },
        PubKeyType::EcP256 => ty.name().to_string(),
    }
}

impl Hsm {
    /// Every public-key KWK family on the token (all types), by name.
    pub(super) fn pub_families(&self, admin: &Session) -> Result<Vec<PubFamily>> {
        let t = &self.token_label;
        let handles = admin
            .find_objects(&[])
            .map_err(|e| token_error(e, t, "searching for keys"))?;
        let mut out: BTreeMap<(String, PubKeyType), PubFamily> = BTreeMap::new();
        for h in handles {
            let attrs = match admin.get_attributes(h, &[AttributeType::Label, AttributeType::Class])
            {
                Ok(a) => a,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, t, "reading a key label")),
            };
            let (mut label, mut class) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = Some(l),
                    Attribute::Class(c) => class = Some(c),
                    _ => {}
                }
            }
            let Some(label) = label else { continue };
            if let Some((ty, k)) = parse_pub_label(&label) {
                let f = out
                    .entry((k.name.clone(), ty))
                    .or_insert_with(|| PubFamily::new(ty, &k.name));
                match class {
                    Some(ObjectClass::PRIVATE_KEY) => f.privs.push((k.version, h)),
                    Some(ObjectClass::PUBLIC_KEY) => f.pubs.push((k.version, h)),
                    _ => {}
                }
            } else if let Some((ty, name)) = parse_pub_high_water(&label) {
                let f = out
                    .entry((name.clone(), ty))
                    .or_insert_with(|| PubFamily::new(ty, &name));
                f.records.push(h);
                if let Some(v) = super::objects::read_high_water(admin, h) {
                    f.high_water = f.high_water.max(v);
                }
            }
        }
        let mut v: Vec<PubFamily> = out.into_values().filter(|f| !f.is_empty()).collect();
        for f in &mut v {
            f.privs.sort_by_key(|x| x.0);
            f.pubs.sort_by_key(|x| x.0);
        }
        Ok(v)
    }

    /// The public-key family of `name` (of whichever type holds it).
    pub(super) fn pub_family(&self, admin: &Session, name: &str) -> Result<Option<PubFamily>> {
        Ok(self
            .pub_families(admin)?
            .into_iter()
            .find(|f| f.name == name))
    }

    /// The one check every `key create` makes, under the exclusive token
    /// lock the caller then generates under: refuses `name` when any key
    /// uses it (AES or public-key, any version ever issued, destroyed ones
    /// included: numbers are never reused). The same type says how to add
    /// a version instead; another type says a name is used by one type only.
    pub(super) fn refuse_taken_name(
        &self,
        admin: &Session,
        wanted: KeyKind,
        name: &str,
    ) -> Result<()> {
        let t = &self.token_label;
        let family = self.family(admin, name)?;
        let (taken_by, last) = if !family.is_empty() {
            (KeyKind::Aes, family.last_issued())
        } else if let Some(f) = self.pub_family(admin, name)? {
            (KeyKind::Pub(f.ty), f.last_issued())
        } else {
            return Ok(());
        };
        let other = taken_by.name();
        Err(Error::key(match (taken_by == wanted, family.newest()) {
            (false, _) => format!(
                "key {name:?} on token {t:?} is an {other} key; a name is used by one key type only, so it cannot also be an {} key: choose another name (or `hsmseal key rotate {name}` for a new {other} version)",
                wanted.name()
            ),
            (true, _) if taken_by != KeyKind::Aes => format!(
                "key {name:?} already exists on token {t:?} ({other}, latest v{last}); use `hsmseal key rotate {name}` to add a version"
            ),
            (true, Some(newest)) => format!(
                "key {name:?} already exists on token {t:?} (latest v{newest}); use `hsmseal key rotate {name}` to add a version"
            ),
            (true, None) => format!(
                "key {name:?} existed on token {t:?}: v1 to v{last} were destroyed; `hsmseal key rotate {name}` creates v{} (version numbers are never reused)",
                u64::from(last) + 1
            ),
        }))
    }

    /// Every version of `f` from v1 to the highest issued, with states.
    pub(super) fn pub_version_infos(&self, admin: &Session, f: &PubFamily) -> Result<Vec<KeyInfo>> {
        let t = &self.token_label;
        let ty = f.ty;
        let mut out = Vec::new();
        for v in f.versions() {
            let k = KeyRef {
                name: f.name.clone(),
                version: v,
            };
            let privs = PubFamily::of(&f.privs, v);
            let pubs = PubFamily::of(&f.pubs, v);
            let mut info = KeyInfo::destroyed(&f.name, v);
            info.label = ty.label(&f.name, v);
            info.key_type = describe(admin, ty, pubs.first().copied());
            info.state = KeyState::DecryptOnly;
            match privs.as_slice() {
                [] => info.problems.push(format!(
                    "its private key is missing (only the public key {} is on token {t:?}): nothing can decrypt under it; `hsmseal key destroy {} --version {v}` removes the rest",
                    info.label, f.name
                )),
                [h, ..] => {
                    let types = private_attribute_types(ty);
                    let attrs = match admin.get_attributes(*h, &types) {
                        Ok(a) => a,
                        Err(e) if is_gone(&e) => continue,
                        Err(e) => return Err(token_error(e, t, "reading private key attributes")),
                    };
                    let (disabled, problems) = private_problems(ty, &attrs);
                    if disabled {
                        info.state = KeyState::Disabled;
                    }
                    info.problems = problems;
                    let mut a = KeyAttributes::from_attributes(&attrs);
                    a.class = Some("CKO_PRIVATE_KEY".into());
                    info.attributes = Some(a);
                    let id = admin
                        .get_attributes(*h, &[AttributeType::Id])
                        .ok()
                        .and_then(|attrs| {
                            attrs.into_iter().find_map(|a| match a {
                                Attribute::Id(id) => Some(id),
                                _ => None,
                            })
                        });
                    let prefix = format!("{}@", info.label);
                    let created = id
                        .and_then(|id| String::from_utf8(id).ok())
                        .and_then(|s| s.strip_prefix(&prefix).map(str::to_string))
                        .and_then(|s| crate::time::parse_rfc3339(&s));
                    info.created = created.map(crate::time::rfc3339);
                    info.created_not_after = created;
                }
            }
            if privs.len() > 1 {
                info.problems
                    .push(super::kwk::duplicate_problem(privs.len(), &k.name, v));
            }
            if pubs.is_empty() && !privs.is_empty() {
                info.problems.push(format!(
                    "its public key is missing on token {t:?}: no slot can be matched to it (the fingerprint is taken from the public key)"
                ));
            }
            out.push(info);
        }
        // The current version: the highest one with a private key that is
        // not disabled.
        if let Some(c) = out
            .iter_mut()
            .rev()
            .find(|i| i.state != KeyState::Disabled && i.attributes.is_some())
        {
            c.state = KeyState::Active;
        }
        // Missing numbers, newest first, bounded as for AES keys (a stray
        // `v4000000000` label must not make a listing of billions).
        let present: std::collections::BTreeSet<u32> = out.iter().map(|i| i.version).collect();
        let mut v = f.last_issued();
        let mut listed = 0;
        while v >= 1 && listed < 4096 {
            if !present.contains(&v) {
                let mut d = KeyInfo::destroyed(&f.name, v);
                d.label = ty.label(&f.name, v);
                d.key_type = ty.name().to_string();
                out.push(d);
                listed += 1;
            }
            v -= 1;
        }
        out.sort_by_key(|k| k.version);
        Ok(out)
    }

    /// The current version of `f`: its highest usable version.
    pub(super) fn pub_current(&self, admin: &Session, f: &PubFamily) -> Result<u32> {
        let versions = self.pub_version_infos(admin, f)?;
        match versions.iter().find(|k| k.state == KeyState::Active) {
            Some(k) => Ok(k.version),
            None => Err(Error::key(format!(
                "{} key {} has no usable version on token {:?} (every version is disabled or destroyed); `hsmseal key enable {} --version N` or `hsmseal key rotate {}`",
                f.ty.name(),
                f.name,
                self.token_label,
                f.name,
                f.name
            ))),
        }
    }

    /// Why version `version` of `f` has no key pair.
    pub(super) fn pub_missing_version(&self, f: &PubFamily, version: u32) -> Error {
        let (name, t) = (&f.name, &self.token_label);
        if version <= f.last_issued() {
            Error::key(format!(
                "key {name} v{version} not found on token {t:?}: it was destroyed (`hsmseal key destroy` or `key purge`); data sealed to it opens only through the files' other slots"
            ))
        } else {
            Error::key(format!(
                "key {name} v{version} not found on token {t:?}: the newest version is v{}",
                f.last_issued()
            ))
        }
    }

    /// `key rotate` of a public-key KWK: version N+1 (N the highest ever
    /// issued) with the same type and size as the newest version. The
    /// caller holds the exclusive token lock from its scan.
    pub(super) fn pub_rotate_locked(&self, admin: &Session, f: &PubFamily) -> Result<KeyInfo> {
        let next = f.last_issued().checked_add(1).ok_or_else(|| {
            Error::key(format!(
                "key {:?} has reached the last version number",
                f.name
            ))
        })?;
        // The newest version's size (RSA); EC-P256 has one size.
        let bits = match f.ty {
            PubKeyType::RsaOaep => f
                .pubs
                .iter()
                .rev()
                .find_map(|(_, h)| modulus_bits(admin, *h))
                .unwrap_or(3072),
            PubKeyType::EcP256 => 0,
        };
        self.generate_pub_pair(admin, f.ty, &f.name, next, bits)?;
        self.forget_pub();
        let after = self
            .pub_family(admin, &f.name)?
            .ok_or_else(|| Error::token("the new key pair is not found"))?;
        let versions = self.pub_version_infos(admin, &after)?;
        versions
            .into_iter()
            .find(|i| i.version == next)
            .ok_or_else(|| Error::token("the new key pair is not found"))
    }

    /// `key disable` / `key enable` of a public-key KWK version: the
    /// private key's usage attribute set to `enable`, then read back.
    pub(super) fn pub_set_enabled(
        &self,
        admin: &Session,
        f: &PubFamily,
        version: u32,
        enable: bool,
    ) -> Result<StateChange> {
        let t = &self.token_label;
        let action = if enable { "enable" } else { "disable" };
        let k = KeyRef {
            name: f.name.clone(),
            version,
        };
        let privs = PubFamily::of(&f.privs, version);
        if privs.is_empty() {
            return Err(self.pub_missing_version(f, version));
        }
        let before = self.pub_version_infos(admin, f)?;
        let was = state_of(&before, version);
        let mut changed = false;
        if (was == KeyState::Disabled) == enable {
            let usage = f.ty.usage();
            let attr = f.ty.usage_attribute(enable);
            for h in privs {
                admin.update_attributes(h, std::slice::from_ref(&attr)).map_err(|e| {
                    Error::token(format!(
                        "token {t:?} does not let hsmseal change {usage} of the private key of {k} ({e}), so it cannot {action} it there (hsmseal keeps no disabled state of its own); `hsmseal key destroy` removes a version for good"
                    ))
                })?;
            }
            changed = true;
        }
        self.forget_pub();
        let after = self
            .pub_family(admin, &f.name)?
            .ok_or_else(|| self.pub_missing_version(f, version))?;
        let versions = self.pub_version_infos(admin, &after)?;
        let state = state_of(&versions, version);
        if (state == KeyState::Disabled) == enable {
            return Err(Error::token(format!(
                "token {t:?} accepted the change to the private key of {k} but reports it as {state}; it cannot be {action}d on this token"
            )));
        }
        Ok(StateChange {
            key: f.name.clone(),
            version,
            token: t.clone(),
            action,
            changed,
            previous_state: was,
            state,
            current_version: current_of(&versions),
        })
    }

    /// Destroys both objects of each of `versions`, after recording the
    /// newest number if it is among them (so it is never reused).
    pub(super) fn pub_destroy_locked(
        &self,
        admin: &Session,
        f: &PubFamily,
        versions: &[u32],
    ) -> Result<()> {
        let t = &self.token_label;
        if let Some(newest) = f.newest() {
            if versions.contains(&newest) && newest > f.high_water {
                let template = [
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(f.ty.high_water_label(&f.name).into_bytes()),
                    Attribute::Application(b"hsmseal".to_vec()),
                    Attribute::Value(newest.to_string().into_bytes()),
                ];
                admin.create_object(&template).map_err(|e| {
                    Error::token(format!(
                        "cannot record on token {t:?} that {} v{newest} was issued ({e}), so its number could be reused; nothing was destroyed. Run `hsmseal key rotate {}` first",
                        f.name, f.name
                    ))
                })?;
                for old in &f.records {
                    let _ = admin.destroy_object(*old);
                }
            }
        }
        for &v in versions {
            // The private key first: a crash in between leaves a public key
            // alone, which opens nothing and is shown with its problem.
            for h in PubFamily::of(&f.privs, v)
                .into_iter()
                .chain(PubFamily::of(&f.pubs, v))
            {
                match admin.destroy_object(h) {
                    Ok(()) => {}
                    Err(e) if is_gone(&e) => {}
                    Err(e) => {
                        return Err(token_error(
                            e,
                            t,
                            &format!("destroying key {} v{v}", f.name),
                        ))
                    }
                }
            }
        }
        self.forget_pub();
        Ok(())
    }

    /// [`StateChange`] after a destroy of `version` of `name`.
    pub(super) fn pub_destroy_change(
        &self,
        admin: &Session,
        name: &str,
        version: u32,
        previous_state: KeyState,
        changed: bool,
    ) -> Result<StateChange> {
        let versions = match self.pub_family(admin, name)? {
            Some(f) => self.pub_version_infos(admin, &f)?,
            None => Vec::new(),
        };
        Ok(StateChange {
            key: name.to_string(),
            version,
            token: self.token_label.clone(),
            action: "destroy",
            changed,
            previous_state,
            state: state_of(&versions, version),
            current_version: current_of(&versions),
        })
    }
}
