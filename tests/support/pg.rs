//! A throwaway PostgreSQL server for tests: initdb (as the `postgres` user
//! when run as root) in a temp dir, on a free loopback port, password
//! authentication over TCP; stopped on drop. Shared by
//! the test binaries that need a server, which include it with
//! `#[path = "support/pg.rs"] mod pg;` (pg_direct.rs, pg_rewrite.rs and
//! columns_bidx.rs do, each beside `mod support;`), and the ways those tests
//! run `hsmseal pg` against it.
#![allow(dead_code)]

use crate::support::{code, stderr, Cli};
use postgres::{Client, NoTls};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The one way the tests run `hsmseal [--json] pg SUBCOMMAND --dsn DSN
/// REST…` (`args` = SUBCOMMAND, REST…) with extra environment `env` (the
/// password's source: PGPASSWORD, PGPASSFILE, or none).
pub fn run_pg(cli: &Cli, json: bool, dsn: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    // --json is global: before the subcommand.
    let mut all: Vec<&str> = if json { vec!["--json"] } else { vec![] };
    all.extend_from_slice(&["pg", args[0], "--dsn", dsn]);
    all.extend_from_slice(&args[1..]);
    cli.run_with(&all, None, env)
}

/// `hsmseal pg ARGS` on `db` with PGPASSWORD set.
pub fn pg(cli: &Cli, db: &Pg, args: &[&str]) -> Output {
    run_pg(cli, false, &db.dsn(), args, &[("PGPASSWORD", PASSWORD)])
}

/// `hsmseal --json pg ARGS` on `db`, which must exit 0: its summary.
pub fn pg_ok(cli: &Cli, db: &Pg, args: &[&str]) -> serde_json::Value {
    let out = run_pg(cli, true, &db.dsn(), args, &[("PGPASSWORD", PASSWORD)]);
    assert_eq!(code(&out), 0, "hsmseal pg {args:?}: {}", stderr(&out));
    crate::support::json_one(&out.stdout, "summary")
}

/// The one value a query returns, as i64 (`count(*)`, sums).
pub fn count(c: &mut Client, q: &str) -> i64 {
    c.query_one(q, &[]).unwrap().get(0)
}

pub const PASSWORD: &str = "pg-s3cret-Pw";

pub struct Pg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}
fn pg_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn as_pg(bin: &std::path::Path) -> Command {
    if unsafe { libc::getuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Pg {
    /// A fresh server, or `None` (printed) when PostgreSQL is not installed.
    pub fn start() -> Option<Pg> {
        let Some(bin) = pg_bindir() else {
            eprintln!("SKIPPED: no PostgreSQL binaries under /usr/lib/postgresql (apt-get install postgresql)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("hsmseal-pg")
            .tempdir()
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
        let data = dir.path().join("data");
        let out = as_pg(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let out = as_pg(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("log"))
            .args(["-w", "-t", "120", "-o"])
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c full_page_writes=off -c synchronous_commit=off",
                dir.path().display()
            ))
            .arg("start")
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Pg { dir, bin, port })
    }

    pub fn dsn(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    pub fn client(&self) -> Client {
        let mut c = postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .password(PASSWORD);
        c.connect(NoTls).unwrap()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = as_pg(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
