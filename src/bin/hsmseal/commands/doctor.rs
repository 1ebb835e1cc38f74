//! `hsmseal doctor`: can hsmseal work with this module, token and keys?
//! Reports module and token details, the mechanisms hsmseal needs, and each
//! key's attributes with anything that makes hsmseal refuse it.

use crate::app::App;
use hsmseal::error::Result;

pub fn run(app: &App) -> Result<i32> {
    let hsm = app.hsm()?;
    let report = hsm.doctor()?;
    if app.json {
        crate::report::emit("doctor", &report);
    } else {
        crate::outln!("{report}");
    }
    Ok(if report.ok() { 0 } else { 1 })
}
