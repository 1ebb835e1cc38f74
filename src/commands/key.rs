//! `hsmseal key create|list|info`: key-wrapping keys live in the HSM; these
//! commands create them there and describe them. No key material is ever
//! shown (it cannot be: the keys are never extractable).

use crate::app::App;
use crate::cli::KeyCommand;
use crate::error::Result;
use crate::hsm::KeyInfo;
use crate::keys::validate_key_name;

pub fn run(app: &App, cmd: KeyCommand) -> Result<i32> {
    let hsm = app.hsm()?;
    match cmd {
        KeyCommand::Create { name } => {
            validate_key_name(&name)?;
            let info = hsm.create_key(&name)?;
            if app.json {
                println!("{}", serde_json::to_string(&info).expect("serialisable"));
            } else {
                println!(
                    "created {} v{} on token {}",
                    info.name,
                    info.version,
                    app.settings.token_label()?
                );
            }
        }
        KeyCommand::List => print_keys(app, &hsm.list_keys()?),
        KeyCommand::Info { name } => {
            validate_key_name(&name)?;
            print_keys(app, &hsm.key_versions(&name)?)
        }
    }
    Ok(0)
}

fn print_keys(app: &App, keys: &[KeyInfo]) {
    if app.json {
        println!("{}", serde_json::to_string(keys).expect("serialisable"));
        return;
    }
    if keys.is_empty() {
        println!("no hsmseal keys on this token (create one with `hsmseal key create NAME`)");
        return;
    }
    let current = |k: &KeyInfo| {
        keys.iter()
            .filter(|o| o.name == k.name)
            .map(|o| o.version)
            .max()
            == Some(k.version)
    };
    println!(
        "{:<24} {:>7}  {:<12} {:<12} status",
        "NAME", "VERSION", "CREATED", "STATE"
    );
    for k in keys {
        let state = if current(k) { "active" } else { "decrypt-only" };
        let status = if k.problems.is_empty() {
            "ok".to_string()
        } else {
            format!("REFUSED: {}", k.problems.join("; "))
        };
        println!(
            "{:<24} {:>7}  {:<12} {:<12} {status}",
            k.name,
            k.version,
            k.created.as_deref().unwrap_or("-"),
            state
        );
    }
}
