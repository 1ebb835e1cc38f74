//! `--include` / `--exclude` patterns: a small glob matcher.
//!
//! Syntax: `*` any run of characters except `/`; `?` one character except
//! `/`; `**` any run of characters including `/` (`**/` also matches no
//! directory at all, so `**/*.log` matches `a.log`); `[abc]`, `[a-z]`,
//! `[!a-z]` (or `[^a-z]`) one character from (or not from) a set; `\x` the
//! character `x` itself.
//!
//! What a pattern is matched against: a pattern containing `/` against the
//! file's path relative to the `-r` directory it was found under (e.g.
//! `logs/2024/*.gz`); a pattern without `/` against the file name alone (e.g.
//! `*.tmp`). The whole string must match.
//!
//! Written here rather than taken from `globset`: these five rules are all a
//! file selection needs, and ~100 lines with tests cost less than a regex
//! engine in the dependency tree.

use hsmseal::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Glob {
    pattern: Vec<char>,
    /// Contains `/`: matched against the relative path, else the file name.
    path_pattern: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob> {
        if pattern.is_empty() {
            return Err(Error::usage("empty --include/--exclude pattern"));
        }
        let chars: Vec<char> = pattern.chars().collect();
        // Reject an unterminated class now rather than never matching.
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '\\' => i += 1,
                '[' => match class_end(&chars, i) {
                    Some(end) => i = end,
                    None => {
                        return Err(Error::usage(format!(
                            "pattern {pattern:?}: '[' without a closing ']'"
                        )))
                    }
                },
                _ => {}
            }
            i += 1;
        }
        Ok(Glob {
            path_pattern: pattern.contains('/'),
            pattern: chars,
        })
    }

    /// Does the pattern select the file at `rel` (relative path, `/`-separated)?
    pub fn matches_path(&self, rel: &str) -> bool {
        let subject = if self.path_pattern {
            rel.trim_start_matches("./")
        } else {
            rel.rsplit('/').next().unwrap_or(rel)
        };
        let s: Vec<char> = subject.chars().collect();
        match_at(&self.pattern, &s)
    }
}

/// Index of the `]` closing the class opened at `start`.
fn class_end(p: &[char], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if i < p.len() && (p[i] == '!' || p[i] == '^') {
        i += 1;
    }
    // A ']' first in the class is a member.
    if i < p.len() && p[i] == ']' {
        i += 1;
    }
    while i < p.len() {
        if p[i] == ']' {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn class_matches(p: &[char], start: usize, end: usize, c: char) -> bool {
    let mut i = start + 1;
    let negate = p[i] == '!' || p[i] == '^';
    if negate {
        i += 1;
    }
    let mut found = false;
    let first = i;
    while i < end {
        if (i > first || p[i] != ']') && i + 2 < end && p[i + 1] == '-' {
            if p[i] <= c && c <= p[i + 2] {
                found = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                found = true;
            }
            i += 1;
        }
    }
    found != negate && c != '/'
}

fn match_at(p: &[char], s: &[char]) -> bool {
    if p.is_empty() {
        return s.is_empty();
    }
    match p[0] {
        '*' if p.get(1) == Some(&'*') => {
            let rest = &p[2..];
            // `**/` may stand for no directory at all.
            if rest.first() == Some(&'/') && match_at(&rest[1..], s) {
                return true;
            }
            (0..=s.len()).any(|k| match_at(rest, &s[k..]))
        }
        '*' => {
            let rest = &p[1..];
            for k in 0..=s.len() {
                if match_at(rest, &s[k..]) {
                    return true;
                }
                if k < s.len() && s[k] == '/' {
                    return false;
                }
            }
            false
        }
        '?' => !s.is_empty() && s[0] != '/' && match_at(&p[1..], &s[1..]),
        '[' => {
            let end = class_end(p, 0).expect("checked in Glob::new");
            !s.is_empty() && class_matches(p, 0, end, s[0]) && match_at(&p[end + 1..], &s[1..])
        }
        '\\' if p.len() > 1 => !s.is_empty() && s[0] == p[1] && match_at(&p[2..], &s[1..]),
        c => !s.is_empty() && s[0] == c && match_at(&p[1..], &s[1..]),
    }
}

/// The `--include` and `--exclude` patterns of one run. A file is taken if
/// it matches some include (or there are none) and no exclude.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    include: Vec<Glob>,
    exclude: Vec<Glob>,
}

impl Filter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter> {
        Ok(Filter {
            include: include
                .iter()
                .map(|p| Glob::new(p))
                .collect::<Result<_>>()?,
            exclude: exclude
                .iter()
                .map(|p| Glob::new(p))
                .collect::<Result<_>>()?,
        })
    }

    pub fn takes(&self, rel: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|g| g.matches_path(rel)))
            && !self.exclude.iter().any(|g| g.matches_path(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Glob::new(p).unwrap().matches_path(s)
    }

    #[test]
    fn name_patterns_match_the_file_name_anywhere() {
        assert!(m("*.log", "a.log"));
        assert!(m("*.log", "x/y/a.log"));
        assert!(!m("*.log", "a.log.gz"));
        assert!(m("a?c", "d/abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*", ""));
        assert!(m("data.[ct]sv", "data.csv"));
        assert!(m("data.[ct]sv", "data.tsv"));
        assert!(!m("data.[!ct]sv", "data.tsv"));
        assert!(m("data.[^ct]sv", "data.psv"));
        assert!(m("f[0-9][0-9]", "f42"));
        assert!(!m("f[0-9]", "fa"));
        assert!(m("[]x]", "]"));
        assert!(m(r"\*", "*"));
        assert!(!m(r"\*", "a"));
    }

    #[test]
    fn path_patterns_match_the_relative_path() {
        assert!(m("logs/*.gz", "logs/a.gz"));
        assert!(!m("logs/*.gz", "logs/2024/a.gz"), "* does not cross /");
        assert!(m("logs/**/*.gz", "logs/2024/01/a.gz"));
        assert!(m("logs/**/*.gz", "logs/a.gz"), "**/ matches no directory");
        assert!(m("**/*.gz", "a.gz"));
        assert!(m("**/cache/**", "x/cache/y/z"));
        assert!(m("cache/**", "cache/a"));
        assert!(!m("cache/**", "other/cache/a"));
        assert!(m("a/**", "a/b/c"));
        assert!(!m("a/?", "a/"));
        assert!(!m("a[/]b", "a/b"), "a class never matches /");
    }

    #[test]
    fn filters_combine_include_and_exclude() {
        let f = Filter::new(&["*.sql".into(), "keep/**".into()], &["*secret*".into()]).unwrap();
        assert!(f.takes("a/b.sql"));
        assert!(f.takes("keep/x.bin"));
        assert!(!f.takes("a/b.bin"));
        assert!(!f.takes("a/secret.sql"));
        let all = Filter::new(&[], &["**/tmp/**".into()]).unwrap();
        assert!(all.takes("x"));
        assert!(!all.takes("tmp/x"));
        assert!(Glob::new("[abc").is_err());
        assert!(Glob::new("").is_err());
    }
}
