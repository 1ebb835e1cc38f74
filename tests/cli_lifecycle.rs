//! The CI key-rotation job end to end (issue: key lifecycle and rotation):
//! encrypt under v1, rotate the key twice, rotate files and a column dump,
//! destroy v1 and v2; everything rotated still decrypts, and a copy left on
//! v1 fails with an error naming the destroyed version.

mod support;

use support::{code, data, stderr, write, Cli};

#[test]
fn rotate_twice_rewrap_everything_then_shred_the_old_versions() {
    let c = Cli::new();
    c.ok(&["key", "create", "backups"]);
    let plain = data(70_000, 42);
    write(&c.path("db.sql"), &plain);
    c.ok(&["encrypt", "--key", "backups", "db.sql"]);
    std::fs::copy(c.path("db.sql.hseal"), c.path("left-on-v1.hseal")).unwrap();
    let csv =
        b"id,name,ssn\n1,\"Doe, Jane\",123-45-6789\n2,\"O'Neil \"\"Mac\"\"\",\n3,,987-65-4321\n";
    write(&c.path("users.csv"), csv);
    let cols = [
        "--columns",
        "name,ssn",
        "--row-id",
        "id",
        "--context",
        "app.users",
    ];
    let mut args = vec![
        "columns",
        "encrypt",
        "--key",
        "backups",
        "-i",
        "users.csv",
        "-o",
        "users.enc.csv",
    ];
    args.extend(cols);
    c.ok(&args);

    c.ok(&["key", "rotate", "backups"]);
    c.ok(&["key", "rotate", "backups"]);
    let info = support::json_of_type(&c.ok(&["--json", "key", "info", "backups"]), "key");
    let versions: Vec<u64> = info
        .iter()
        .map(|k| k["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);

    let payload_before = std::fs::read(c.path("db.sql.hseal")).unwrap()[1024..].to_vec();
    c.ok(&["rotate", "db.sql.hseal"]);
    assert_eq!(
        std::fs::read(c.path("db.sql.hseal")).unwrap()[1024..],
        payload_before[..]
    );
    let v = support::json_one(&c.ok(&["--json", "inspect", "db.sql.hseal"]), "item");
    assert_eq!(v["key_version"], 3);
    let mut args = vec![
        "columns",
        "rotate",
        "--key",
        "backups",
        "-i",
        "users.enc.csv",
        "-o",
        "users.rot.csv",
    ];
    args.extend(cols);
    c.ok(&args);

    for v in ["1", "2"] {
        c.ok(&["key", "destroy", "backups", "--version", v, "--yes"]);
    }
    // Everything rotated decrypts.
    c.ok(&["decrypt", "-o", "db.out", "db.sql.hseal"]);
    assert_eq!(std::fs::read(c.path("db.out")).unwrap(), plain);
    let mut args = vec![
        "columns",
        "decrypt",
        "-i",
        "users.rot.csv",
        "-o",
        "users.out.csv",
    ];
    args.extend(cols);
    c.ok(&args);
    assert_eq!(std::fs::read(c.path("users.out.csv")).unwrap(), csv);
    // What was left behind is shredded, and the error says why.
    let out = c.run(&["decrypt", "-o", "v1.out", "left-on-v1.hseal"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("backups v1"), "{}", stderr(&out));
    assert!(stderr(&out).contains("destroyed"), "{}", stderr(&out));
    assert!(!c.path("v1.out").exists());
    let mut args = vec![
        "columns",
        "decrypt",
        "-i",
        "users.enc.csv",
        "-o",
        "users.old.csv",
    ];
    args.extend(cols);
    let out = c.run(&args);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("backups v1"), "{}", stderr(&out));
}
