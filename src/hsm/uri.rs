//! Which token to use: a plain label, or an RFC 7512 `pkcs11:` URI (the
//! convention of p11-kit, GnuTLS and OpenSSL's pkcs11 provider), so two
//! tokens with one label can be told apart by serial number or slot.
//!
//! Invariants:
//! - A value that starts with `pkcs11:` (any case) is a URI; anything else
//!   is a token label, compared trimmed as before.
//! - Supported path attributes: `token` (label), `serial`, `manufacturer`,
//!   `model`, `slot-id`. Every one given must match; none given matches
//!   every token (and more than one token is then an ambiguity error, never
//!   a guess). Values are percent-decoded (RFC 3986) and compared trimmed,
//!   as PKCS#11 pads these fields with spaces.
//! - Everything else is a usage error naming it: unknown attributes, the
//!   RFC's attributes hsmseal does not take (`object`, `id`, `type`,
//!   `library-*`, `slot-*` other than `slot-id`, `module-*`), an attribute
//!   given twice, a bad percent escape. A PIN in the URI (`pin-value`,
//!   `pin-source`) is refused: a command line or config value is no place
//!   for a PIN, and hsmseal has its own PIN sources.
//! - Nothing here is secret: the parsed value may be printed.

use crate::error::{Error, Result};

/// What a `--token` value (or `token` in hsmseal.toml, `HSMSEAL_TOKEN`)
/// asks for. Every field that is set must match the token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSpec {
    /// `CK_TOKEN_INFO.label`.
    pub label: Option<String>,
    /// `CK_TOKEN_INFO.serialNumber`.
    pub serial: Option<String>,
    /// `CK_TOKEN_INFO.manufacturerID`.
    pub manufacturer: Option<String>,
    /// `CK_TOKEN_INFO.model`.
    pub model: Option<String>,
    /// The PKCS#11 slot ID (`CK_SLOT_ID`).
    pub slot_id: Option<u64>,
}

/// The token fields a [`TokenSpec`] is matched against.
#[derive(Debug, Clone)]
pub struct TokenFields<'a> {
    pub label: &'a str,
    pub serial: &'a str,
    pub manufacturer: &'a str,
    pub model: &'a str,
    pub slot_id: u64,
}

const SCHEME: &str = "pkcs11:";

impl TokenSpec {
    /// A spec naming a token by its label alone.
    pub fn label(label: &str) -> TokenSpec {
        TokenSpec {
            label: Some(label.trim().to_string()),
            ..TokenSpec::default()
        }
    }

    /// Parses a token label or a `pkcs11:` URI.
    pub fn parse(s: &str) -> Result<TokenSpec> {
        let is_uri = s.len() >= SCHEME.len()
            && s.is_char_boundary(SCHEME.len())
            && s[..SCHEME.len()].eq_ignore_ascii_case(SCHEME);
        if !is_uri {
            return Ok(TokenSpec::label(s));
        }
        let rest = &s[SCHEME.len()..];
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        // The URI itself is not echoed: it may hold a PIN or other values
        // its writer did not mean to print; the attribute's name is.
        let bad = |why: String| Error::usage(format!("token URI: {why}"));
        let pin_refused = |name: &str| {
            Error::usage(format!(
                "token URI: {name} is refused: a PIN never goes on the command line or in a setting that is shown; use HSMSEAL_PIN, --pin-file or the prompt"
            ))
        };
        if s.contains("pin-value") || s.contains("pin-source") {
            let name = if s.contains("pin-value") {
                "pin-value"
            } else {
                "pin-source"
            };
            return Err(pin_refused(name));
        }
        if let Some(q) = query {
            // hsmseal takes no query attribute: the first one is refused.
            if let Some(attr) = q.split('&').find(|a| !a.is_empty()) {
                let name = attr.split_once('=').map_or(attr, |(n, _)| n);
                return Err(bad(match name {
                    "module-name" | "module-path" => {
                        format!("{name} is not supported: name the module with --module or HSMSEAL_PKCS11_MODULE")
                    }
                    _ => format!("unknown query attribute {name:?}"),
                }));
            }
        }
        let mut spec = TokenSpec::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let Some((name, raw)) = attr.split_once('=') else {
                return Err(bad(format!("{attr:?} is not NAME=VALUE")));
            };
            let value =
                percent_decode(raw).map_err(|why| bad(format!("attribute {name}: {why}")))?;
            let slot = match name {
                "token" => &mut spec.label,
                "serial" => &mut spec.serial,
                "manufacturer" => &mut spec.manufacturer,
                "model" => &mut spec.model,
                "slot-id" => {
                    if spec.slot_id.is_some() {
                        return Err(bad("slot-id is given twice".into()));
                    }
                    let id = value.trim().parse::<u64>().map_err(|_| {
                        bad(format!("slot-id {value:?} is not a decimal number"))
                    })?;
                    spec.slot_id = Some(id);
                    continue;
                }
                "object" | "id" | "type" => {
                    return Err(bad(format!(
                        "{name} names an object, and this value selects a token: give the key name with --key or as the command's argument"
                    )))
                }
                "library-manufacturer" | "library-description" | "library-version"
                | "slot-description" | "slot-manufacturer" => {
                    return Err(bad(format!(
                        "{name} is not supported: select the token with token=, serial=, manufacturer=, model= or slot-id="
                    )))
                }
                _ => {
                    return Err(bad(format!(
                        "unknown attribute {name:?} (supported: token, serial, manufacturer, model, slot-id)"
                    )))
                }
            };
            if slot.is_some() {
                return Err(bad(format!("{name} is given twice")));
            }
            *slot = Some(value.trim().to_string());
        }
        Ok(spec)
    }

    /// True when every attribute given matches `t`.
    pub fn matches(&self, t: &TokenFields<'_>) -> bool {
        let eq =
            |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have.trim());
        eq(&self.label, t.label)
            && eq(&self.serial, t.serial)
            && eq(&self.manufacturer, t.manufacturer)
            && eq(&self.model, t.model)
            && self.slot_id.is_none_or(|id| id == t.slot_id)
    }

    /// True when only a label is given (a plain `--token LABEL`).
    pub fn is_label_only(&self) -> bool {
        self.label.is_some()
            && self.serial.is_none()
            && self.manufacturer.is_none()
            && self.model.is_none()
            && self.slot_id.is_none()
    }
}

impl std::fmt::Display for TokenSpec {
    /// The label alone for a plain label; otherwise the URI form.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_label_only() {
            return write!(f, "{}", self.label.as_deref().unwrap_or_default());
        }
        let mut parts = Vec::new();
        for (name, v) in [
            ("token", &self.label),
            ("manufacturer", &self.manufacturer),
            ("model", &self.model),
            ("serial", &self.serial),
        ] {
            if let Some(v) = v {
                parts.push(format!("{name}={}", percent_encode(v)));
            }
        }
        if let Some(id) = self.slot_id {
            parts.push(format!("slot-id={id}"));
        }
        write!(f, "{SCHEME}{}", parts.join(";"))
    }
}

/// RFC 3986 percent-decoding into UTF-8 text.
fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    format!("bad percent escape at byte {i} (use %XX with two hex digits)")
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the decoded value is not UTF-8".to_string())
}

/// Percent-encodes what is not an RFC 3986 unreserved character.
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn fields<'a>(label: &'a str, serial: &'a str, slot_id: u64) -> TokenFields<'a> {
        TokenFields {
            label,
            serial,
            manufacturer: "SoftHSM project",
            model: "SoftHSM v2",
            slot_id,
        }
    }

    #[test]
    fn labels_and_uris_parse_and_match() {
        assert_eq!(
            TokenSpec::parse(" prod ").unwrap(),
            TokenSpec::label("prod")
        );
        let s = TokenSpec::parse("pkcs11:token=my%20token;serial=abc123").unwrap();
        assert_eq!(s.label.as_deref(), Some("my token"));
        assert_eq!(s.serial.as_deref(), Some("abc123"));
        assert!(s.matches(&fields("my token", "abc123  ", 7)));
        assert!(!s.matches(&fields("my token", "abc124", 7)));
        assert!(!s.matches(&fields("other", "abc123", 7)));
        let s = TokenSpec::parse("PKCS11:slot-id=7;model=SoftHSM%20v2").unwrap();
        assert!(s.matches(&fields("x", "y", 7)));
        assert!(!s.matches(&fields("x", "y", 8)));
        assert!(TokenSpec::parse("pkcs11:")
            .unwrap()
            .matches(&fields("a", "b", 1)));
        let s = TokenSpec::parse("pkcs11:token=a%3Bb;manufacturer=SoftHSM%20project").unwrap();
        assert_eq!(s.label.as_deref(), Some("a;b"));
        assert_eq!(
            s.to_string(),
            "pkcs11:token=a%3Bb;manufacturer=SoftHSM%20project"
        );
        assert_eq!(TokenSpec::parse("prod").unwrap().to_string(), "prod");
    }

    #[test]
    fn pins_unknown_and_malformed_attributes_are_usage_errors() {
        for (uri, says) in [
            ("pkcs11:token=a?pin-value=1234", "pin-value is refused"),
            ("pkcs11:token=a;pin-value=1234", "pin-value is refused"),
            ("pkcs11:token=a?pin-source=file:/p", "pin-source is refused"),
            ("pkcs11:token=a?module-path=/x.so", "--module"),
            ("pkcs11:token=a?foo=1", "unknown query attribute"),
            ("pkcs11:colour=red", "unknown attribute \"colour\""),
            ("pkcs11:object=backups", "object names an object"),
            ("pkcs11:slot-description=x", "not supported"),
            ("pkcs11:token=a;token=b", "token is given twice"),
            ("pkcs11:slot-id=x", "not a decimal number"),
            ("pkcs11:token=a%2", "bad percent escape"),
            ("pkcs11:token=a%zz", "bad percent escape"),
            ("pkcs11:token=%ff", "not UTF-8"),
            ("pkcs11:token", "is not NAME=VALUE"),
        ] {
            let e = TokenSpec::parse(uri).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Usage, "{uri}");
            assert!(e.to_string().contains(says), "{uri}: {e}");
        }
        // The refusal never repeats the PIN, even percent-encoded.
        for uri in [
            "pkcs11:token=a?pin-value=s3cret",
            "pkcs11:token=a;pin-value=s3cret",
            "pkcs11:token=%zz;pin-value=s3cret",
            "pkcs11:token=a?pin-source=s3cret",
        ] {
            let e = TokenSpec::parse(uri).unwrap_err();
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }
}
