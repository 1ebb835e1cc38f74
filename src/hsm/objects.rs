//! hsmseal's objects on the token as found and read: the scan of every
//! hsmseal label, one key name's *family* (its version objects and
//! high-water records), a version's attributes and creation time, and the
//! errors that say why a key or version is missing. Reads only, on the
//! caller's admin session under the token lock it holds (shared to read;
//! exclusive when the caller goes on to change objects, see
//! `super::lifecycle`).

use super::errors::{is_gone, token_error};
use super::kwk::{self, KeyAttributes, KeyInfo, KeyState};
use super::Hsm;
use crate::backend::KeyRef;
use crate::error::{Error, Result};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// Every hsmseal object found on the token.
#[derive(Default)]
pub(super) struct Scan {
    /// Key version objects, sorted by name then version.
    pub(super) keys: Vec<(KeyRef, ObjectHandle)>,
    /// High-water records: (key name, object).
    pub(super) records: Vec<(String, ObjectHandle)>,
}

/// What the token holds for one key name.
#[derive(Default)]
pub(super) struct Family {
    pub(super) name: String,
    /// (version, object) of every key object, by version (a version appears
    /// twice if two objects carry its label).
    pub(super) keys: Vec<(u32, ObjectHandle)>,
    /// The highest version number any high-water record holds (0: none).
    pub(super) high_water: u32,
    /// The high-water record objects (normally at most one).
    pub(super) records: Vec<ObjectHandle>,
}

impl Family {
    /// The highest version that has an object.
    pub(super) fn newest(&self) -> Option<u32> {
        self.keys.last().map(|(v, _)| *v)
    }

    /// The highest version number ever issued, as far as the token shows.
    pub(super) fn last_issued(&self) -> u32 {
        self.newest().unwrap_or(0).max(self.high_water)
    }

    /// True if the token knows nothing of this name.
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.high_water == 0
    }

    pub(super) fn handles(&self, version: u32) -> Vec<ObjectHandle> {
        self.keys
            .iter()
            .filter(|(v, _)| *v == version)
            .map(|(_, h)| *h)
            .collect()
    }
}

impl Hsm {
    /// Every hsmseal object on the token: key versions (sorted) and
    /// version high-water records.
    pub(super) fn scan(&self, admin: &Session) -> Result<Scan> {
        let t = &self.token_label;
        // An empty template finds every object the user can see, so an
        // object of the wrong class with our label shows up (and is refused)
        // rather than hiding.
        let handles = admin
            .find_objects(&[])
            .map_err(|e| token_error(e, t, "searching for keys"))?;
        let mut out = Scan::default();
        for h in handles {
            let attrs = match admin.get_attributes(h, &[AttributeType::Label]) {
                Ok(a) => a,
                // Destroyed by someone else since the search: not a key any more.
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(token_error(e, t, "reading a key label")),
            };
            for a in attrs {
                if let Attribute::Label(l) = a {
                    if let Some(k) = kwk::parse_label(&l) {
                        out.keys.push((k, h));
                    } else if let Some(name) = kwk::parse_high_water_label(&l) {
                        out.records.push((name, h));
                    }
                }
            }
        }
        out.keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// What the token holds for `name`.
    pub(super) fn family(&self, admin: &Session, name: &str) -> Result<Family> {
        let scan = self.scan(admin)?;
        Ok(self.family_from(admin, &scan, name))
    }

    /// [`Self::family`] for one name from a scan already made.
    pub(super) fn family_from(&self, admin: &Session, scan: &Scan, name: &str) -> Family {
        let mut f = Family {
            name: name.to_string(),
            ..Family::default()
        };
        f.keys = scan
            .keys
            .iter()
            .filter(|(k, _)| k.name == name)
            .map(|(k, h)| (k.version, *h))
            .collect();
        for (_, h) in scan.records.iter().filter(|(n, _)| n == name) {
            f.records.push(*h);
            if let Some(v) = read_high_water(admin, *h) {
                f.high_water = f.high_water.max(v);
            }
        }
        f
    }

    pub(super) fn read_attributes(
        &self,
        admin: &Session,
        h: ObjectHandle,
    ) -> Result<KeyAttributes> {
        let attrs = admin
            .get_attributes(h, kwk::CHECKED_ATTRIBUTES)
            .map_err(|e| token_error(e, &self.token_label, "reading key attributes"))?;
        Ok(KeyAttributes::from_attributes(&attrs))
    }

    pub(super) fn key_info(&self, admin: &Session, k: &KeyRef, h: ObjectHandle) -> Result<KeyInfo> {
        Ok(make_key_info(k, self.read_attributes(admin, h)?, admin, h))
    }

    /// Whether the object `h` is disabled; `None` if it is gone.
    pub(super) fn disabled(&self, admin: &Session, h: ObjectHandle) -> Result<Option<bool>> {
        match admin.get_attributes(h, &[AttributeType::Encrypt, AttributeType::Decrypt]) {
            Ok(attrs) => Ok(Some(kwk::is_disabled(&KeyAttributes::from_attributes(
                &attrs,
            )))),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(token_error(e, &self.token_label, "reading key attributes")),
        }
    }

    /// [`Self::key_info`], or `None` if the object was destroyed meanwhile.
    pub(super) fn key_info_if_present(
        &self,
        admin: &Session,
        k: &KeyRef,
        h: ObjectHandle,
    ) -> Result<Option<KeyInfo>> {
        match admin.get_attributes(h, kwk::CHECKED_ATTRIBUTES) {
            Ok(attrs) => Ok(Some(make_key_info(
                k,
                KeyAttributes::from_attributes(&attrs),
                admin,
                h,
            ))),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(token_error(e, &self.token_label, "reading key attributes")),
        }
    }

    /// Why version `version` of `family` has no object: destroyed (its
    /// number was issued), or never created.
    pub(super) fn missing_version(&self, family: &Family, version: u32) -> Error {
        let name = &family.name;
        let t = &self.token_label;
        if family.is_empty() {
            self.key_not_found(name)
        } else if version <= family.last_issued() {
            Error::key(format!(
                "key {name} v{version} not found on token {t:?}: it was destroyed (`hsmseal key destroy` or `key purge`); data encrypted under it can no longer be decrypted"
            ))
        } else {
            Error::key(format!(
                "key {name} v{version} not found on token {t:?}: the newest version is v{}; v{version} was never created here (or was destroyed by another tool)",
                family.last_issued()
            ))
        }
    }

    /// Why `family` has no current version: unknown, all destroyed, or
    /// every remaining version disabled.
    pub(super) fn no_current_version(&self, family: &Family) -> Error {
        let name = &family.name;
        let t = &self.token_label;
        let last = family.last_issued();
        if family.is_empty() {
            self.key_not_found(name)
        } else if family.keys.is_empty() {
            Error::key(format!(
                "key {name} has no versions left on token {t:?} (v1 to v{last} were destroyed); `hsmseal key rotate {name}` creates v{}",
                u64::from(last) + 1
            ))
        } else {
            Error::key(format!(
                "key {name} has no enabled version on token {t:?} (every remaining version is disabled); `hsmseal key enable {name} --version N` re-enables one, `hsmseal key rotate {name}` creates v{}",
                u64::from(last) + 1
            ))
        }
    }

    pub(super) fn key_not_found(&self, name: &str) -> Error {
        Error::key(format!(
            "key {name:?} not found on token {:?} (see `hsmseal key list`)",
            self.token_label
        ))
    }
}

/// The value of a high-water record: a canonical decimal version number in
/// a `CKO_DATA` object. Anything else is ignored (the record only guards
/// against reusing a version number; see [`lifecycle`]).
pub(super) fn read_high_water(admin: &Session, h: ObjectHandle) -> Option<u32> {
    let attrs = admin
        .get_attributes(h, &[AttributeType::Class, AttributeType::Value])
        .ok()?;
    let mut class_ok = false;
    let mut value = None;
    for a in attrs {
        match a {
            Attribute::Class(c) => class_ok = c == ObjectClass::DATA,
            Attribute::Value(v) => value = String::from_utf8(v).ok(),
            _ => {}
        }
    }
    if !class_ok {
        return None;
    }
    kwk::parse_version(&value?)
}

/// The creation time of `k`: from its `CKA_ID` (see [`kwk::key_id`]), else
/// the day of `start_date`. (display string, latest possible Unix time)
fn created(
    admin: &Session,
    h: ObjectHandle,
    k: &KeyRef,
    start_date: Option<&str>,
) -> (Option<String>, Option<u64>) {
    let from_id = admin
        .get_attributes(h, &[AttributeType::Id])
        .ok()
        .and_then(|attrs| {
            attrs.iter().find_map(|a| match a {
                Attribute::Id(id) => kwk::created_from_id(id, k),
                _ => None,
            })
        });
    match (from_id, start_date) {
        (Some(t), _) => (Some(crate::time::rfc3339(t)), Some(t)),
        (None, Some(d)) => (Some(d.to_string()), crate::time::date_end_unix(d)),
        (None, None) => (None, None),
    }
}

/// `CKA_START_DATE` as `YYYY-MM-DD`, or `None` if unset or unreadable (see
/// [`kwk::CHECKED_ATTRIBUTES`] for why unreadable is expected on SoftHSM2).
fn read_start_date(admin: &Session, h: ObjectHandle) -> Option<String> {
    let attrs = admin.get_attributes(h, &[AttributeType::StartDate]).ok()?;
    attrs.iter().find_map(|a| match a {
        Attribute::StartDate(d) => kwk::date_string(d),
        _ => None,
    })
}

pub(super) fn make_key_info(
    k: &KeyRef,
    mut attributes: KeyAttributes,
    admin: &Session,
    h: ObjectHandle,
) -> KeyInfo {
    attributes.start_date = read_start_date(admin, h);
    let (created, created_not_after) = created(admin, h, k, attributes.start_date.as_deref());
    // Provisional: which version is active depends on its siblings
    // (`lifecycle::Family::states`).
    let state = if kwk::is_disabled(&attributes) {
        KeyState::Disabled
    } else {
        KeyState::DecryptOnly
    };
    KeyInfo {
        name: k.name.clone(),
        version: k.version,
        key_type: "aes".into(),
        label: kwk::label(&k.name, k.version),
        state,
        created,
        created_not_after,
        problems: kwk::problems(&attributes),
        attributes: Some(attributes),
    }
}

/// Why a private key's boolean attributes differ from `want` (empty: as
/// made). A token that does not report `CKA_SIGN` or `CKA_DERIVE` for an RSA
/// key is not penalised; every other attribute must be reported as made.
/// Shared by the transport key of the backup ceremony and the RSA-OAEP KWK,
/// which want different usages but the same reading of the answer.
pub(super) fn private_key_problems(
    attrs: &[Attribute],
    want: &[(AttributeType, bool)],
) -> Vec<String> {
    let mut p = Vec::new();
    for &(ty, value) in want {
        let got = attrs.iter().find_map(|a| match (a, ty) {
            (Attribute::Token(b), AttributeType::Token)
            | (Attribute::Private(b), AttributeType::Private)
            | (Attribute::Sensitive(b), AttributeType::Sensitive)
            | (Attribute::Extractable(b), AttributeType::Extractable)
            | (Attribute::Decrypt(b), AttributeType::Decrypt)
            | (Attribute::Unwrap(b), AttributeType::Unwrap)
            | (Attribute::Sign(b), AttributeType::Sign)
            | (Attribute::Derive(b), AttributeType::Derive)
            | (Attribute::NeverExtractable(b), AttributeType::NeverExtractable) => Some(*b),
            _ => None,
        });
        match got {
            Some(b) if b == value => {}
            None if matches!(ty, AttributeType::Sign | AttributeType::Derive) => {}
            other => p.push(format!("{ty} is {other:?}, not {value}")),
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_numbers() {
        let mut f = Family::default();
        assert!(f.is_empty());
        assert_eq!(f.last_issued(), 0);
        f.high_water = 4;
        assert!(!f.is_empty());
        assert_eq!(f.last_issued(), 4);
        assert_eq!(f.newest(), None);
        assert!(f.handles(4).is_empty());
    }
}
