//! `hsmseal config show`: every resolved setting and where it came from.
//! The PIN is never shown, only where it would be read from.

use crate::app::App;
use crate::cli::ConfigCommand;
use crate::config::Setting;
use hsmseal::error::Result;

pub fn run(app: &App, cmd: ConfigCommand) -> Result<i32> {
    match cmd {
        ConfigCommand::Show => show(app),
    }
}

fn show(app: &App) -> Result<i32> {
    let s = &app.settings;
    let pin_source = if s
        .pin_file
        .as_ref()
        .is_some_and(|p| p.source == crate::config::Source::Flag)
    {
        "--pin-file (redacted)".to_string()
    } else if crate::config::pin_env_set() {
        "environment HSMSEAL_PIN (redacted)".to_string()
    } else if let Some(p) = &s.pin_file {
        format!("file {} from {} (redacted)", p.value.display(), p.source)
    } else {
        "prompt on a terminal".to_string()
    };
    if app.json {
        let mut v = serde_json::to_value(s).expect("serialisable");
        v["pin"] = serde_json::Value::String(pin_source);
        crate::report::emit("config", &v);
        return Ok(0);
    }
    fn line<T: std::fmt::Debug>(name: &str, s: &Option<Setting<T>>) {
        match s {
            Some(s) => crate::outln!("{name:<14} {:?}  ({})", s.value, s.source),
            None => crate::outln!("{name:<14} (not set)"),
        }
    }
    crate::outln!(
        "{:<14} {}",
        "config file",
        s.config_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or("(none)".into())
    );
    line("module", &Some(s.module.clone()));
    line("token", &s.token);
    crate::outln!("{:<14} {pin_source}", "pin");
    line("default_key", &s.default_key);
    line("jobs", &Some(s.jobs.clone()));
    line("audit_log", &s.audit_log);
    line("softhsm2_conf", &s.softhsm2_conf);
    Ok(0)
}
