//! Turning `cryptoki` errors into hsmseal's one-line errors.
//!
//! Invariant: every PKCS#11 failure names the C function that failed
//! (`C_Encrypt`), the return code by its spec name (`CKR_DEVICE_ERROR`) and
//! what the user can do about it. The cases that mean something specific to
//! hsmseal (a bad GCM tag, a wrong PIN) are mapped by the callers, which know
//! the context; everything else goes through [`token_error`].
//!
//! No PIN or key byte ever reaches these functions: cryptoki's errors carry
//! only return codes and function names.

use crate::error::Error;
use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use std::path::Path;

/// The spec name of a return code: `RvError::GeneralError` -> `CKR_GENERAL_ERROR`.
///
/// cryptoki's `Display` for `RvError` is a paragraph of spec prose, too long
/// for a one-line error; its variant names are the CKR names in CamelCase.
pub(crate) fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED+{code:#x}"),
        RvError::UnknownErrorCode(code) => format!("CKR {code:#x} (unknown)"),
        other => camel_to_upper_snake("CKR", &format!("{other:?}")),
    }
}

/// The C name of a PKCS#11 function: `Function::Encrypt` -> `C_Encrypt`.
pub(crate) fn c_function_name(f: Function) -> String {
    format!("C_{f:?}")
}

fn camel_to_upper_snake(prefix: &str, camel: &str) -> String {
    let mut out = String::from(prefix);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// What a user can do about a return code, for the end of an error message.
fn advice(rv: RvError) -> &'static str {
    use RvError::*;
    match rv {
        SessionHandleInvalid | SessionClosed | DeviceRemoved | TokenNotPresent
        | TokenNotRecognized | CryptokiNotInitialized => {
            "the token went away or was reset; check the HSM connection and run the command again"
        }
        UserNotLoggedIn => "log in first: set HSMSEAL_PIN or --pin-file",
        MechanismInvalid | MechanismParamInvalid => {
            "the module does not support AES-GCM the way hsmseal uses it; run `hsmseal doctor`"
        }
        KeyFunctionNotPermitted | KeyTypeInconsistent | KeyHandleInvalid
        | ObjectHandleInvalid => "the key cannot be used this way; run `hsmseal key list`",
        DeviceMemory | HostMemory => "the token or host is out of memory; free space on the token",
        TokenWriteProtected => "the token is read-only; use a writable token or slot",
        SessionCount => "the token has no free sessions; lower --jobs or close other clients",
        TemplateInconsistent | TemplateIncomplete | AttributeValueInvalid
        | AttributeTypeInvalid => {
            "the token rejected hsmseal's key template; run `hsmseal doctor` and check the vendor's attribute support"
        }
        DeviceError | GeneralError | FunctionFailed => {
            "the HSM reported an internal failure; check its logs (SoftHSM2: syslog) and run the command again"
        }
        _ => "run `hsmseal doctor` to check the module and token",
    }
}

/// A PKCS#11 failure as an `ErrorKind::Token` error:
/// "`what` on token "T" failed: C_X returned CKR_Y; advice".
pub(crate) fn token_error(e: CkError, token: &str, what: &str) -> Error {
    failure(e, &format!("token {token:?}"), what)
}

/// The same for calls made before a token is chosen:
/// "`what` in module /x.so failed: ...".
pub(crate) fn module_error(e: CkError, module: &Path, what: &str) -> Error {
    failure(e, &format!("module {}", module.display()), what)
}

fn failure(e: CkError, place: &str, what: &str) -> Error {
    let on = if place.starts_with("module") {
        "in"
    } else {
        "on"
    };
    match e {
        CkError::Pkcs11(rv, f) => Error::token(format!(
            "{what} {on} {place} failed: {} returned {}; {}",
            c_function_name(f),
            ckr_name(rv),
            advice(rv)
        )),
        other => Error::token(format!(
            "{what} {on} {place} failed: {other}; run `hsmseal doctor` to check the module and token"
        )),
    }
}

/// The return code of a PKCS#11 failure, if it was one.
pub(crate) fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// True for what `C_Decrypt` returns when the GCM tag does not verify (wrong
/// key, modified data). SoftHSM2 reports a bad GCM tag as
/// `CKR_GENERAL_ERROR`; the spec's answer is `CKR_ENCRYPTED_DATA_INVALID`.
/// Only on `C_Decrypt` itself: the same codes from `C_DecryptInit` mean
/// something else.
pub fn is_bad_tag(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::GeneralError | RvError::EncryptedDataInvalid,
            Function::Decrypt
        )
    )
}

/// True for the code a token returns for a key whose attributes forbid the
/// operation (here: a version disabled since its handle was verified).
pub fn is_not_permitted(e: &CkError) -> bool {
    rv_of(e) == Some(RvError::KeyFunctionNotPermitted)
}

/// True for the codes a token returns for an object that no longer exists.
pub fn is_gone(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(RvError::ObjectHandleInvalid) | Some(RvError::KeyHandleInvalid)
    )
}

pub fn pin_locked(token: &str) -> Error {
    Error::pin(format!(
        "the user PIN of token {token:?} is locked; its security officer must reset it (e.g. `pkcs11-tool --login --login-type so --init-pin`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_codes_and_functions_get_their_spec_names() {
        assert_eq!(ckr_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            ckr_name(RvError::EncryptedDataInvalid),
            "CKR_ENCRYPTED_DATA_INVALID"
        );
        assert_eq!(ckr_name(RvError::Cancel), "CKR_CANCEL");
        assert_eq!(
            ckr_name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED+0x80000001"
        );
        assert_eq!(c_function_name(Function::Encrypt), "C_Encrypt");
        assert_eq!(
            c_function_name(Function::GetAttributeValue),
            "C_GetAttributeValue"
        );
    }

    #[test]
    fn token_errors_are_one_line_and_name_function_code_and_advice() {
        let e = token_error(
            CkError::Pkcs11(RvError::DeviceError, Function::Encrypt),
            "prod",
            "wrapping a data key with backups v1",
        );
        assert_eq!(e.kind(), crate::error::ErrorKind::Token);
        let m = e.to_string();
        assert!(m.contains("C_Encrypt returned CKR_DEVICE_ERROR"), "{m}");
        assert!(m.contains("\"prod\""), "{m}");
        assert!(m.contains("logs"), "{m}");
        assert!(!m.contains('\n'));
        let e = module_error(
            CkError::Pkcs11(RvError::GeneralError, Function::Initialize),
            Path::new("/m.so"),
            "initialising the module",
        );
        assert!(e.to_string().starts_with("initialising the module in module /m.so failed: C_Initialize returned CKR_GENERAL_ERROR"), "{e}");
    }

    #[test]
    fn a_bad_tag_is_only_c_decrypts_general_or_encrypted_data_invalid() {
        assert!(is_bad_tag(&CkError::Pkcs11(
            RvError::GeneralError,
            Function::Decrypt
        )));
        assert!(is_bad_tag(&CkError::Pkcs11(
            RvError::EncryptedDataInvalid,
            Function::Decrypt
        )));
        assert!(!is_bad_tag(&CkError::Pkcs11(
            RvError::GeneralError,
            Function::DecryptInit
        )));
        assert!(!is_bad_tag(&CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            Function::Decrypt
        )));
    }
}
