//! `--include` / `--exclude` patterns, matched by `globset`.
//!
//! Syntax (README "Bulk runs"): `*` any run of characters except `/`; `?`
//! one character except `/`; `**` as a whole path component (`**/x`,
//! `a/**/x`, `a/**`) any run of directories, `**/` also none at all (so
//! `**/*.log` matches `a.log`); `**` inside a component is the same as `*`
//! (the gitignore rule); `[abc]`, `[a-z]`, `[!a-z]` (or `[^a-z]`) one
//! character from (or not from) a set, never `/`; `{a,b}` either
//! alternative (`*.{txt,log}`; `{,x}` may be empty); `\x` the character `x`
//! itself.
//!
//! What a pattern is matched against: a pattern containing `/` against the
//! file's path relative to the `-r` directory it was found under (e.g.
//! `logs/2024/*.gz`); a pattern without `/` against the file name alone (e.g.
//! `*.tmp`). The whole string must match.
//!
//! Invariants: matching takes time linear in the name (globset compiles the
//! patterns into one regex automaton; the hand-written backtracking matcher
//! this replaced took seconds per file on `*a*a*a...`); an invalid pattern is
//! a usage error naming it, never a pattern that silently selects nothing.
//!
//! globset matches bytes, so `?` and a class stand for one *byte*: with a
//! non-ASCII character there they would silently miss it, so a class holding
//! one is refused and the README says to use `*` for such characters.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use hsmseal::error::{Error, Result};
use std::path::Path;

/// The patterns of one option (`--include` or `--exclude`), split by what
/// they are matched against.
#[derive(Debug, Clone)]
struct Patterns {
    /// Patterns without `/`: matched against the file name.
    names: GlobSet,
    /// Patterns with `/`: matched against the path relative to `-r`.
    paths: GlobSet,
}

impl Patterns {
    fn new(option: &str, patterns: &[String]) -> Result<Patterns> {
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for p in patterns {
            let glob = compile(option, p)?;
            if p.contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        // Building a set only fails on a regex too large for its limits,
        // which a command-line pattern can reach (a huge brace expansion).
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| {
                Error::usage(format!(
                    "{option} patterns {patterns:?}: {}; use fewer or simpler patterns",
                    e.kind()
                ))
            })
        };
        Ok(Patterns {
            names: build(names)?,
            paths: build(paths)?,
        })
    }

    fn is_empty(&self) -> bool {
        self.names.is_empty() && self.paths.is_empty()
    }

    fn matches(&self, rel: &Path) -> bool {
        // `rel` comes from the walk: relative, never `./`-prefixed.
        let name_hit = !self.names.is_empty()
            && rel
                .file_name()
                .is_some_and(|name| self.names.is_match(Path::new(name)));
        name_hit || self.paths.is_match(rel)
    }
}

/// One pattern, with hsmseal's rules: `*`, `?` and classes never match `/`,
/// `\` escapes, an unclosed `[` is an error, `{a,}` may be empty.
fn compile(option: &str, pattern: &str) -> Result<globset::Glob> {
    let bad = |why: &dyn std::fmt::Display| {
        Error::usage(format!(
            "{option} {pattern:?}: {why} (see README \"Bulk runs\" for the pattern rules)"
        ))
    };
    if pattern.is_empty() {
        return Err(bad(&"empty pattern"));
    }
    if let Some(c) = non_ascii_in_class(pattern) {
        return Err(bad(&format!(
            "the class holds the non-ASCII character {c:?}, and a class matches one byte; use * or {{...}} alternatives for it"
        )));
    }
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .empty_alternates(true)
        .allow_unclosed_class(false)
        .build()
        // `e.kind()`, not `e`: the error's Display repeats the pattern.
        .map_err(|e| bad(e.kind()))
}

/// The first non-ASCII character inside a `[...]` class of `pattern`, if
/// any (a rough scan: `\` escapes the next character, a `]` right after
/// `[`, `[!` or `[^` is a member; an unclosed class is left to globset).
fn non_ascii_in_class(pattern: &str) -> Option<char> {
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '[' => {
                if matches!(chars.peek(), Some('!' | '^')) {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
                for m in chars.by_ref() {
                    if m == ']' {
                        break;
                    }
                    if !m.is_ascii() {
                        return Some(m);
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// The `--include` and `--exclude` patterns of one run. A file is taken if
/// it matches some include (or there are none) and no exclude.
#[derive(Debug, Clone)]
pub struct Filter {
    include: Patterns,
    exclude: Patterns,
}

impl Default for Filter {
    /// Takes every file.
    fn default() -> Filter {
        Filter::new(&[], &[]).expect("no patterns always build")
    }
}

impl Filter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter> {
        Ok(Filter {
            include: Patterns::new("--include", include)?,
            exclude: Patterns::new("--exclude", exclude)?,
        })
    }

    /// Does the run take the file at `rel` (relative to its `-r` directory)?
    pub fn takes(&self, rel: &Path) -> bool {
        (self.include.is_empty() || self.include.matches(rel)) && !self.exclude.matches(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Filter::new(&[p.to_string()], &[])
            .unwrap()
            .takes(Path::new(s))
    }

    fn usage_error(p: &str) -> String {
        let e = Filter::new(&[p.to_string()], &[]).unwrap_err();
        assert_eq!(e.kind(), hsmseal::error::ErrorKind::Usage, "{p:?}");
        e.message().to_string()
    }

    #[test]
    fn name_patterns_match_the_file_name_anywhere() {
        assert!(m("*.log", "a.log"));
        assert!(m("*.log", "x/y/a.log"));
        assert!(!m("*.log", "a.log.gz"));
        assert!(m("a?c", "d/abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("data.[ct]sv", "data.csv"));
        assert!(m("data.[ct]sv", "data.tsv"));
        assert!(!m("data.[!ct]sv", "data.tsv"));
        assert!(m("data.[^ct]sv", "data.psv"));
        assert!(m("f[0-9][0-9]", "f42"));
        assert!(!m("f[0-9]", "fa"));
        assert!(m("[]x]", "]"));
        assert!(m(r"\*", "*"));
        assert!(!m(r"\*", "a"));
        assert!(m("*", "anything"));
        assert!(m("é*", "été"), "non-ASCII literals match");
        assert!(m("*.log", "caf\u{e9}/x.log"));
    }

    #[test]
    fn path_patterns_match_the_relative_path() {
        assert!(m("logs/*.gz", "logs/a.gz"));
        assert!(!m("logs/*.gz", "logs/2024/a.gz"), "* does not cross /");
        assert!(!m("logs/?/a.gz", "logs/x/y/a.gz"));
        assert!(m("logs/**/*.gz", "logs/2024/01/a.gz"));
        assert!(m("logs/**/*.gz", "logs/a.gz"), "**/ matches no directory");
        assert!(m("**/*.gz", "a.gz"));
        assert!(m("**/cache/**", "x/cache/y/z"));
        assert!(m("cache/**", "cache/a"));
        assert!(!m("cache/**", "other/cache/a"));
        assert!(m("a/**", "a/b/c"));
        assert!(!m("a[/]b", "a/b"), "a class never matches /");
        assert!(!m("a[!x]b", "a/b"), "nor does a negated one");
        assert!(
            !m("logs/**.gz", "logs/x/a.gz"),
            "** inside a component is *"
        );
        assert!(m("logs/**.gz", "logs/a.gz"));
    }

    #[test]
    fn braces_select_each_alternative() {
        let p = "*.{txt,log}.hseal";
        assert!(m(p, "a.txt.hseal"));
        assert!(m(p, "d/b.log.hseal"));
        assert!(!m(p, "c.csv.hseal"));
        assert!(!m(p, "a.txt"));
        assert!(m("{logs,data}/**/*.gz", "data/x/y.gz"));
        assert!(!m("{logs,data}/**/*.gz", "tmp/x/y.gz"));
        assert!(m("dump{,.bak}", "dump") && m("dump{,.bak}", "dump.bak"));
        assert!(m("{a,{b,c}}x", "cx"), "nested braces");
    }

    #[test]
    fn a_pattern_that_backtracked_for_hours_matches_at_once() {
        // The old matcher tried every way to place each `*` (about
        // C(60, 14) = 1.5e13 attempts here, hours); an automaton reads the
        // name once. No timing threshold: the test only has to finish.
        let p = "*a".repeat(14);
        let one_a = format!("{}a", "b".repeat(59));
        let ends_wrong = format!("{}b", "a".repeat(59));
        assert!(!m(&p, &one_a));
        assert!(!m(&p, &ends_wrong));
        assert!(m(&p, &"a".repeat(60)));
        assert!(m(&format!("**/{p}"), &format!("x/y/{}", "a".repeat(14))));
    }

    #[test]
    fn non_utf8_names_are_matched_by_their_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let name = Path::new(std::ffi::OsStr::from_bytes(b"d/x\xff.log"));
        let f = Filter::new(&["*.log".into()], &["d/x?.log".into()]).unwrap();
        assert!(!f.takes(name), "? matches the one invalid byte");
        assert!(Filter::new(&["*.log".into()], &[]).unwrap().takes(name));
    }

    #[test]
    fn filters_combine_include_and_exclude() {
        let f = Filter::new(&["*.sql".into(), "keep/**".into()], &["*secret*".into()]).unwrap();
        assert!(f.takes(Path::new("a/b.sql")));
        assert!(f.takes(Path::new("keep/x.bin")));
        assert!(!f.takes(Path::new("a/b.bin")));
        assert!(!f.takes(Path::new("a/secret.sql")));
        let all = Filter::new(&[], &["**/tmp/**".into()]).unwrap();
        assert!(all.takes(Path::new("x")));
        assert!(!all.takes(Path::new("tmp/x")));
        assert!(Filter::default().takes(Path::new("a/b")));
    }

    #[test]
    fn bad_patterns_are_one_line_usage_errors_naming_them() {
        for (p, says) in [
            ("[abc", "unclosed character class"),
            ("", "empty pattern"),
            ("*.{txt,log", "unclosed alternate group"),
            ("[z-a]", "invalid range"),
            ("x[é]", "non-ASCII"),
            ("x[!aé]", "non-ASCII"),
        ] {
            let msg = usage_error(p);
            assert!(msg.contains(&format!("--include {p:?}")), "{msg}");
            assert!(msg.contains(says), "{p:?}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        // An escaped bracket opens no class.
        assert!(m(r"\[é]", "[é]"));
        let e = Filter::new(&[], &["a{".into()]).unwrap_err();
        assert!(
            e.message().starts_with("--exclude \"a{\""),
            "{}",
            e.message()
        );
    }
}
