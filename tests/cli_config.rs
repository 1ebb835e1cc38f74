//! hsmseal.toml, HSMSEAL_* variables and flags: `config show` reports each
//! resolved setting and where it came from (flag over environment over file
//! over default), with secrets redacted; a bad file is a usage error.

mod support;

use serde_json::Value;
use support::{code, stderr, write, Cli};

fn show(c: &Cli, args: &[&str], env: &[(&str, &str)]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["config", "show"]);
    let out = c.run_with(&a, None, env);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("config show --json is JSON")
}

#[test]
fn each_setting_says_where_it_came_from() {
    let c = Cli::new();
    let module = c
        .token
        .env()
        .into_iter()
        .find(|(k, _)| k == "HSMSEAL_PKCS11_MODULE");
    let module = module.map(|(_, v)| v).unwrap_or_default();
    write(
        &c.path("hsmseal.toml"),
        format!(
            "module = {module:?}\ntoken = \"from-file\"\npin_file = \"secrets/pin\"\n\
             default_key = \"filekey\"\njobs = 3\naudit_log = \"logs/audit.log\"\n"
        )
        .as_bytes(),
    );
    // The harness sets HSMSEAL_TOKEN and the PIN for its own token; clear the
    // token so the file's value is the one that counts.
    let v = show(&c, &[], &[("HSMSEAL_TOKEN", "")]);
    let file_src = |s: &Value| {
        s["source"]["file"]
            .as_str()
            .map(|p| p.ends_with("hsmseal.toml"))
    };
    assert_eq!(v["token"]["value"], "from-file");
    assert_eq!(file_src(&v["token"]), Some(true), "{v}");
    assert_eq!(v["default_key"]["value"], "filekey");
    assert_eq!(v["jobs"]["value"], 3);
    assert_eq!(file_src(&v["jobs"]), Some(true));
    // Relative paths in the file are relative to the file.
    let pin_file = v["pin_file"]["value"].as_str().unwrap();
    assert!(pin_file.ends_with("secrets/pin"), "{pin_file}");
    let audit = v["audit_log"]["value"].as_str().unwrap();
    assert!(audit.ends_with("logs/audit.log"), "{audit}");
    // The PIN itself is never a setting: only where it would come from.
    assert!(v["pin"].as_str().unwrap().contains("redacted"), "{v}");
    assert!(!v.to_string().contains(&c.token.pin), "PIN in config show");

    // Environment beats the file.
    let v = show(
        &c,
        &[],
        &[
            ("HSMSEAL_TOKEN", "from-env"),
            ("HSMSEAL_JOBS", "5"),
            ("HSMSEAL_KEY", "envkey"),
            ("HSMSEAL_AUDIT_LOG", "/tmp/env-audit.log"),
        ],
    );
    assert_eq!(v["token"]["value"], "from-env");
    assert_eq!(v["token"]["source"]["env"], "HSMSEAL_TOKEN");
    assert_eq!(v["jobs"]["value"], 5);
    assert_eq!(v["default_key"]["value"], "envkey");
    assert_eq!(v["audit_log"]["value"], "/tmp/env-audit.log");
    assert_eq!(v["audit_log"]["source"]["env"], "HSMSEAL_AUDIT_LOG");

    // Flags beat both.
    let v = show(
        &c,
        &[
            "--token",
            "from-flag",
            "--jobs",
            "7",
            "--audit-log",
            "/tmp/flag-audit.log",
        ],
        &[
            ("HSMSEAL_TOKEN", "from-env"),
            ("HSMSEAL_JOBS", "5"),
            ("HSMSEAL_AUDIT_LOG", "/tmp/env-audit.log"),
        ],
    );
    assert_eq!(v["audit_log"]["value"], "/tmp/flag-audit.log");
    assert_eq!(v["audit_log"]["source"], "flag");
    assert_eq!(v["token"]["value"], "from-flag");
    assert_eq!(v["token"]["source"], "flag");
    assert_eq!(v["jobs"]["value"], 7);
    assert_eq!(v["jobs"]["source"], "flag");

    // The human form names the sources too.
    let out = c.run_with(&["config", "show"], None, &[("HSMSEAL_TOKEN", "")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("from-file") && text.contains("hsmseal.toml"),
        "{text}"
    );
    assert!(!text.contains(&c.token.pin));
}

#[test]
fn bad_configuration_is_a_usage_error_naming_the_file() {
    let c = Cli::new();
    write(&c.path("hsmseal.toml"), b"tokn = \"typo\"\n");
    let out = c.run(&["config", "show"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("hsmseal.toml"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim_end().lines().count(), 1, "one-line error");

    write(&c.path("hsmseal.toml"), b"jobs = 0\n");
    let out = c.run(&["config", "show"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));

    std::fs::remove_file(c.path("hsmseal.toml")).unwrap();
    let out = c.run_with(&["config", "show"], None, &[("HSMSEAL_JOBS", "many")]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = c.run_with(
        &["config", "show"],
        None,
        &[("HSMSEAL_CONFIG", "/nonexistent/hsmseal.toml")],
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

/// The environment variables are declared on the options (clap's `env`),
/// so `--help` names every one, HSMSEAL_PIN_FILE included; the precedence
/// is unchanged (flag, environment, file, default) and `config show` still
/// tells a value from the environment from one given as a flag. An empty
/// variable counts as unset.
#[test]
fn environment_variables_are_declared_and_keep_their_place() {
    let c = Cli::new();
    let v = show(&c, &[], &[("HSMSEAL_PIN_FILE", "/env/pin")]);
    assert_eq!(v["pin_file"]["value"], "/env/pin");
    assert_eq!(v["pin_file"]["source"]["env"], "HSMSEAL_PIN_FILE", "{v}");
    let v = show(
        &c,
        &["--pin-file", "/flag/pin"],
        &[("HSMSEAL_PIN_FILE", "/env/pin")],
    );
    assert_eq!(v["pin_file"]["value"], "/flag/pin");
    assert_eq!(v["pin_file"]["source"], "flag", "{v}");

    // Empty: as if unset, for a path and a number alike (clap alone would
    // take "" as a value and refuse it).
    let v = show(
        &c,
        &[],
        &[("HSMSEAL_PKCS11_MODULE", ""), ("HSMSEAL_JOBS", "")],
    );
    assert_eq!(v["module"]["source"], "default", "{v}");
    assert_eq!(v["jobs"]["source"], "default", "{v}");

    // A bad value from the environment is a usage error naming it.
    let out = c.run_with(&["config", "show"], None, &[("HSMSEAL_JOBS", "0")]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("HSMSEAL_JOBS"), "{}", stderr(&out));

    // --help names each variable, and never shows a value from the
    // environment (the PIN least of all).
    let secret = "pin-9f8e7d";
    let env = [
        ("HSMSEAL_PIN", secret),
        ("HSMSEAL_TOKEN", secret),
        ("HSMSEAL_PIN_FILE", secret),
        ("HSMSEAL_KEY", secret),
    ];
    for args in [
        &["--help"][..],
        &["encrypt", "--help"],
        &["columns", "encrypt", "-h"],
    ] {
        let out = c.run_with(args, None, &env);
        assert_eq!(code(&out), 0, "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(!help.contains(secret), "{args:?} shows a value:\n{help}");
        for name in [
            "HSMSEAL_PKCS11_MODULE",
            "HSMSEAL_TOKEN",
            "HSMSEAL_PIN_FILE",
            "HSMSEAL_JOBS",
            "HSMSEAL_AUDIT_LOG",
        ] {
            assert!(help.contains(&format!("[env: {name}]")), "{args:?}: {name}");
        }
        if args[0] != "--help" {
            assert!(help.contains("[env: HSMSEAL_KEY]"), "{args:?}");
        }
    }
}
