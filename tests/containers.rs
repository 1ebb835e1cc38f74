//! The binary against tokens made in containers, and the release binary run
//! inside the minimal image (cargo feature `containers`; run by
//! `make test-containers`, which builds the image and starts podman's
//! Docker-compatible socket at `DOCKER_HOST`).
//!
//! What these prove that the host-token tests do not:
//! - every token here is initialised by the `softhsm2-util` of a separate,
//!   minimal system (its own container of `containers/build-image.sh`'s
//!   image), not by the tools installed next to the tests, and the host's
//!   module then creates keys in it and uses them; the container's SoftHSM2
//!   reads the token back after the host has written to it;
//! - the release binary runs in that image, which has SoftHSM2 and Debian's
//!   essential packages only: its shared libraries all resolve there, to
//!   packages the README declares ("Runtime dependencies").
//!
//! Each test takes its token from its own container
//! ([`support::container::ContainerProvider`], explicitly, whatever
//! `HSMSEAL_TEST_TOKENS` says).

mod support;

use std::collections::BTreeSet;
use support::container::{run_in_container, ContainerProvider};
use support::token::TokenProvider;
use support::{code, data, json_lines, json_one, stderr, write, Cli};

/// A working directory and a token initialised in a container of its own.
fn cli() -> Cli {
    Cli {
        token: ContainerProvider::new(None).new_token(),
        work: tempfile::tempdir().expect("temp dir"),
    }
}

/// The runtime packages the README declares for the release binary
/// (README "Runtime dependencies"); a shared library from any other package
/// is an undeclared dependency.
const DECLARED_RUNTIME_PACKAGES: &[&str] = &["libc6", "libgcc-s1"];

#[test]
fn a_container_reports_its_exit_code_and_output_and_is_removed() {
    // The seam itself must be able to fail: a failing command in the
    // container is reported, not taken for a made token.
    let (rc, out, err) = run_in_container("echo out; echo err >&2; exit 7", &[], &[], &[]);
    assert_eq!((rc, out.as_str(), err.as_str()), (7, "out\n", "err\n"));
    // No network inside: only the loopback interface exists.
    let (rc, out, err) = run_in_container("ls /sys/class/net", &[], &[], &[]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"], "{out}");
}

#[test]
fn keys_created_in_a_container_made_token_have_the_required_attributes() {
    let c = cli();
    let created = json_one(&c.ok(&["--json", "key", "create", "k"]), "key");
    assert_eq!(created["version"], 1);
    assert_eq!(created["label"], "hsmseal:k:v1");
    let info = json_lines(&c.ok(&["--json", "key", "info", "k"]));
    assert_eq!(info.len(), 1, "{info:?}");
    let a = &info[0]["attributes"];
    assert_eq!(info[0]["state"], "active", "{a}");
    assert_eq!(info[0]["problems"].as_array().unwrap().len(), 0, "{a}");
    assert_eq!(a["extractable"], false, "{a}");
    assert_eq!(a["sensitive"], true, "{a}");
    assert_eq!(a["encrypt"], true, "{a}");
    assert_eq!(a["decrypt"], true, "{a}");
    // doctor checks module, token, mechanisms and key attributes.
    let doctor = c.run(&["doctor"]);
    assert_eq!(code(&doctor), 0, "{}", stderr(&doctor));

    // The container's SoftHSM2 still reads the token the host wrote to.
    let dir = c.token.dir.path().to_str().unwrap();
    let conf = c.token.conf.to_str().unwrap();
    let (rc, out, err) = run_in_container(
        "softhsm2-util --show-slots",
        &[],
        &[(dir, dir)],
        &[("SOFTHSM2_CONF", conf)],
    );
    assert_eq!(rc, 0, "{out}{err}");
    let words = out.split_whitespace().collect::<Vec<_>>().join(" ");
    let want = format!(
        "Initialized: yes User PIN init.: yes Label: {}",
        c.token.label
    );
    assert!(words.contains(&want), "{out}");

    // The wrong PIN is refused by the container-made token.
    let bad = c.run_with(&["key", "create", "k2"], None, &[("HSMSEAL_PIN", "0000")]);
    assert_ne!(code(&bad), 0, "{}", stderr(&bad));
    assert_eq!(json_lines(&c.ok(&["--json", "key", "list"])).len(), 1);
}

#[test]
fn a_file_round_trips_and_tampering_is_rejected() {
    let c = cli();
    c.ok(&["key", "create", "k"]);
    let plain = data(3 * 65536 + 123, 14);
    write(&c.path("p"), &plain);
    c.ok(&["encrypt", "--key", "k", "p"]);
    c.ok(&["verify", "p.hseal"]);
    c.ok(&["decrypt", "-o", "back", "p.hseal"]);
    assert_eq!(std::fs::read(c.path("back")).unwrap(), plain);

    let mut sealed = std::fs::read(c.path("p.hseal")).unwrap();
    let at = sealed.len() - 40;
    sealed[at] ^= 0x01;
    write(&c.path("t.hseal"), &sealed);
    let v = c.run(&["verify", "t.hseal"]);
    assert_eq!(code(&v), 3, "{}", stderr(&v));
    let d = c.run(&["decrypt", "-o", "t.out", "t.hseal"]);
    assert_eq!(code(&d), 3, "{}", stderr(&d));
    assert!(!c.path("t.out").exists(), "no output under its final name");
    // The tampered input is not destroyed.
    assert_eq!(std::fs::read(c.path("t.hseal")).unwrap(), sealed);
}

#[test]
fn rotation_moves_new_data_and_rewrapped_files_to_the_new_version() {
    let c = cli();
    c.ok(&["key", "create", "k"]);
    write(&c.path("a"), b"before rotation");
    c.ok(&["encrypt", "--key", "k", "a"]);
    let v2 = json_one(&c.ok(&["--json", "key", "rotate", "k"]), "key");
    assert_eq!(v2["version"], 2);
    write(&c.path("b"), b"after rotation");
    c.ok(&["encrypt", "--key", "k", "b"]);
    let version = |f: &str| {
        json_one(&c.ok(&["--json", "inspect", f]), "item")["key_version"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((version("a.hseal"), version("b.hseal")), (1, 2));
    c.ok(&["rewrap", "a.hseal"]);
    assert_eq!(version("a.hseal"), 2);
    let states: Vec<String> = json_lines(&c.ok(&["--json", "key", "info", "k"]))
        .iter()
        .map(|k| k["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["decrypt-only", "active"]);
    for (f, want) in [("a", &b"before rotation"[..]), ("b", b"after rotation")] {
        c.ok(&["decrypt", "-o", &format!("{f}.out"), &format!("{f}.hseal")]);
        assert_eq!(std::fs::read(c.path(&format!("{f}.out"))).unwrap(), want);
    }
}

#[test]
fn a_column_dump_round_trips_and_the_wrong_context_is_refused() {
    let c = cli();
    c.ok(&["key", "create", "pii"]);
    let mut csv = b"id,name,ssn\n".to_vec();
    for i in 0..500 {
        csv.extend_from_slice(format!("{i},\"Doe, J{i}\",{i:09}\n").as_bytes());
    }
    let cols = |verb: &str, context: &str| {
        let mut a = vec!["columns", verb];
        if verb == "encrypt" {
            a.extend(["--key", "pii"]);
        }
        a.extend(["--format", "csv", "--columns", "name,ssn", "--row-id", "id"]);
        a.extend(["--context", context]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args = cols("encrypt", "app.users");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let enc = c.run_in(&args, &csv);
    assert_eq!(code(&enc), 0, "{}", stderr(&enc));
    assert_ne!(enc.stdout, csv);
    assert!(!String::from_utf8_lossy(&enc.stdout).contains("000000123"));

    let args = cols("decrypt", "app.users");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dec = c.run_in(&args, &enc.stdout);
    assert_eq!(code(&dec), 0, "{}", stderr(&dec));
    assert_eq!(dec.stdout, csv);

    let args = cols("decrypt", "app.other");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bad = c.run_in(&args, &enc.stdout);
    assert_eq!(code(&bad), 3, "{}", stderr(&bad));
}

#[test]
fn every_token_comes_from_its_own_container() {
    let (a, b) = (cli(), cli());
    assert_ne!(a.token.dir.path(), b.token.dir.path());
    assert_ne!(a.token.label, b.token.label);
    a.ok(&["key", "create", "k"]);
    // b's token is another token: it has no key k.
    assert_eq!(json_lines(&b.ok(&["--json", "key", "list"])).len(), 0);
    let out = b.run(&["key", "info", "k"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
}

/// The release binary in the minimal image (Debian minbase + softhsm2 +
/// p11-kit, nothing of the build machine): every shared library it links
/// resolves, each to a declared package, and `init --dev`, key creation,
/// encrypt, verify and decrypt work there.
#[test]
fn the_release_binary_runs_in_the_minimal_image() {
    // The binary that ships (`make test-containers` builds it with default
    // features and names it here), else the one cargo built for this test.
    let fresh = std::env::var("HSMSEAL_FRESH_BINARY").ok();
    let bin = fresh.as_deref().unwrap_or(support::BIN);
    let script = r#"
        set -eu
        bin=/opt/hsmseal/hsmseal
        if ldd "$bin" | grep -F 'not found' >&2; then exit 20; fi
        for lib in $(ldd "$bin" | awk '$2 == "=>" { print $3 }'); do
            pkg=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$(readlink -f "$lib")" 2>/dev/null || echo '?:')
            echo "lib $lib ${pkg%%:*}"
        done
        cd "$(mktemp -d)"
        "$bin" init --dev dev >&2
        "$bin" key create k >&2
        head -c 300000 /dev/urandom > plain
        "$bin" encrypt --key k plain >&2
        "$bin" verify plain.hseal >&2
        "$bin" decrypt -o back plain.hseal >&2
        cmp plain back
        echo fresh-image-ok
    "#;
    let (rc, out, err) = run_in_container(script, &[], &[(bin, "/opt/hsmseal/hsmseal")], &[]);
    assert_eq!(rc, 0, "in the minimal image:\n{out}{err}");
    assert!(out.ends_with("fresh-image-ok\n"), "{out}{err}");
    let packages: BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("lib "))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert!(packages.contains("libc6"), "{out}");
    let undeclared: Vec<&&str> = packages
        .iter()
        .filter(|p| !DECLARED_RUNTIME_PACKAGES.contains(p))
        .collect();
    assert!(
        undeclared.is_empty(),
        "the release binary links libraries from undeclared packages {undeclared:?}:\n{out}"
    );
}
