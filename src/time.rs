//! Dates and times as hsmseal writes them: Unix seconds, RFC 3339 in UTC
//! with whole seconds, and `YYYY-MM-DD` days. Used by the key lifecycle
//! (creation times, purge cutoffs) and the audit log (entry times), which
//! must not depend on each other for it.
//!
//! Invariant: what [`rfc3339`] writes, [`parse_rfc3339`] reads back exactly,
//! and nothing looser is accepted; impossible dates (2024-02-30) are
//! rejected, never normalised. Proleptic Gregorian calendar, UTC, from 1970.

/// The end (last second) of a `YYYY-MM-DD` day as Unix time.
pub fn date_end_unix(date: &str) -> Option<u64> {
    let b = date.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let days = days_from_civil(i64::from(y), m, d);
    // Reject impossible dates (2024-02-30): they do not round-trip.
    if civil_from_days(days) != (i64::from(y), m, d) || days < 0 {
        return None;
    }
    Some(days as u64 * 86_400 + 86_399)
}

/// Seconds since the Unix epoch now (0 if the clock is before it).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A Unix time as RFC 3339 in UTC with whole seconds:
/// `2025-01-31T12:00:00Z`.
pub fn rfc3339(unix: u64) -> String {
    let (y, m, d) = civil_from_days((unix / 86_400) as i64);
    let s = unix % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Parses exactly the form [`rfc3339`] writes (and nothing looser: no
/// offsets, fractions or lowercase), from 1970 on.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z' {
        return None;
    }
    let day_end = date_end_unix(&s[..10])?;
    let (h, m, sec) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    if h > 23 || m > 59 || sec > 59 {
        return None;
    }
    Some(day_end - 86_399 + u64::from(h * 3600 + m * 60 + sec))
}

/// A fixed-width run of ASCII digits.
fn num(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`); avoids a date crate for
/// one call.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01 (Howard Hinnant's
/// `days_from_civil`, the inverse of [`civil_from_days`]). Out-of-range
/// months and days give a date that does not round-trip, which callers use
/// to reject them.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_writes_and_parses_strictly() {
        for t in [
            0,
            59,
            86_399,
            86_400,
            951_782_400,
            1_709_979_072,
            4_102_444_799,
        ] {
            let s = rfc3339(t);
            assert_eq!(parse_rfc3339(&s), Some(t), "{s}");
        }
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-00-10T00:00:00Z",
            "2024-01-00T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:60:00Z",
            "2024-01-01T00:00:60Z",
            "2024-01-01t00:00:00Z",
            "2024-01-01T00:00:00z",
            "2024-01-01T00:00:00.5Z",
            "1969-12-31T23:59:59Z",
            "+024-01-01T00:00:00Z",
            "2024-1-01T00:00:00Z ",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(date_end_unix("1970-01-01"), Some(86_399));
        assert_eq!(date_end_unix("2000-02-29"), Some(951_868_799));
        assert_eq!(date_end_unix("2001-02-29"), None);
        assert_eq!(date_end_unix("2001-02-2x"), None);
    }

    #[test]
    fn days_to_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
