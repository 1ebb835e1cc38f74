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

/// (serial, slot id) of every initialised token in the test's SoftHSM2
/// directory, as `softhsm2-util --show-slots` reports them.
fn tokens(c: &Cli) -> Vec<(String, String)> {
    let out = std::process::Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &c.token.conf)
        .arg("--show-slots")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut found = Vec::new();
    let (mut slot, mut serial) = (String::new(), String::new());
    for line in text.lines() {
        let l = line.trim();
        if let Some(s) = line.strip_prefix("Slot ") {
            slot = s.trim().to_string();
        } else if let Some(s) = l.strip_prefix("Serial number:") {
            serial = s.trim().to_string();
        } else if l.starts_with("Initialized:") && l.ends_with("yes") {
            found.push((serial.clone(), slot.clone()));
        }
    }
    found
}

/// `--token` (and HSMSEAL_TOKEN) takes an RFC 7512 `pkcs11:` URI, so two
/// SoftHSM2 tokens with one label in one directory are told apart by
/// serial (or slot-id): a key made on one is not on the other. The plain
/// label is refused as ambiguous (exit 5) and the message lists URIs that
/// work. A PIN in the URI, an unknown attribute or a bad escape is a usage
/// error (exit 2) before any PIN is read, and never echoes the PIN.
#[test]
fn two_tokens_with_one_label_are_told_apart_by_a_pkcs11_uri() {
    let c = Cli::new();
    let label = c.token.label.clone();
    let out = std::process::Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &c.token.conf)
        .args(["--init-token", "--free", "--label", &label])
        .args(["--pin", &c.token.pin, "--so-pin", &c.token.so_pin])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = tokens(&c);
    assert_eq!(t.len(), 2, "{t:?}");
    let (s1, s2) = (t[0].0.clone(), t[1].0.clone());
    assert_ne!(s1, s2);

    let amb = c.run(&["key", "list"]);
    assert_eq!(code(&amb), 5, "{}", stderr(&amb));
    assert!(
        stderr(&amb).contains("2 tokens match the label"),
        "{}",
        stderr(&amb)
    );
    assert!(
        stderr(&amb).contains(&format!("serial={s1}")),
        "{}",
        stderr(&amb)
    );

    let uri1 = format!("pkcs11:token={label};serial={s1}");
    let uri2 = format!("pkcs11:serial={s2}");
    assert_eq!(code(&c.run(&["--token", &uri1, "key", "create", "one"])), 0);
    let on = |uri: &str, extra: &[(&str, &str)]| {
        let mut env = vec![("HSMSEAL_TOKEN", uri)];
        env.extend_from_slice(extra);
        let out = c.run_with(&["--json", "key", "list"], None, &env);
        assert_eq!(code(&out), 0, "{uri}: {}", stderr(&out));
        // One `key` line per key version (JSON lines, docs/FORMAT.md 8).
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .inspect(|k| assert_eq!(k["type"], "key", "{k}"))
            .map(|k| k["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(on(&uri1, &[]), ["one"]);
    assert!(on(&uri2, &[]).is_empty(), "the key went to the other token");
    // The same token by slot id, and with a percent-encoded serial.
    let by_slot = format!("pkcs11:slot-id={}", t[0].1);
    assert_eq!(on(&by_slot, &[]), ["one"]);
    let enc: String = s1.bytes().map(|b| format!("%{b:02x}")).collect();
    assert_eq!(on(&format!("pkcs11:serial={enc}"), &[]), ["one"]);
    // A URI no token matches: exit 5, naming what there is.
    let none = c.run(&["--token", "pkcs11:serial=nope", "key", "list"]);
    assert_eq!(code(&none), 5, "{}", stderr(&none));
    assert!(stderr(&none).contains("tokens found"), "{}", stderr(&none));

    // Refused before any PIN is read (a wrong one would be exit 6).
    for (uri, says) in [
        (
            format!("pkcs11:serial={s1}?pin-value=s3cret"),
            "pin-value is refused",
        ),
        (
            format!("pkcs11:serial={s1};pin-value=s3cret"),
            "pin-value is refused",
        ),
        ("pkcs11:colour=red".to_string(), "unknown attribute"),
        ("pkcs11:object=one".to_string(), "object names an object"),
        ("pkcs11:token=%zz".to_string(), "bad percent escape"),
    ] {
        let out = c.run_with(
            &["--token", &uri, "key", "list"],
            None,
            &[("HSMSEAL_PIN", "wrong-pin")],
        );
        assert_eq!(code(&out), 2, "{uri}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{uri}: {}", stderr(&out));
        assert!(!stderr(&out).contains("s3cret"), "{}", stderr(&out));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
    }
}

/// hsmseal.toml is found in the working directory only: run from elsewhere
/// (a new user's `cd data`), the error says so instead of only suggesting a
/// second `init --dev`.
#[test]
fn no_token_says_no_config_file_was_found_here() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(support::BIN);
    support::clear_hsmseal_env(&mut cmd);
    cmd.current_dir(dir.path()).args(["key", "list"]);
    let out = support::run_cmd(cmd, None);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no hsmseal.toml in this directory"), "{err}");
    assert!(err.contains("HSMSEAL_CONFIG"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
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
