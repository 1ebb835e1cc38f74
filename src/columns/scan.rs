//! Byte searches for the column parsers: thin names over `memchr` (already
//! in the build through serde_json), whose SIMD search beats the eight-bytes-
//! at-a-time loop this file used to hold. Parsing speed matters because one
//! reader thread feeds every worker; tokens are long runs of bytes that
//! contain no delimiter.

/// Index of the first `a` in `h`.
#[inline]
pub fn find1(h: &[u8], a: u8) -> Option<usize> {
    memchr::memchr(a, h)
}

/// Index of the first `a` or `b` in `h`.
#[inline]
pub fn find2(h: &[u8], a: u8, b: u8) -> Option<usize> {
    memchr::memchr2(a, b, h)
}

/// Index of the first `a`, `b` or `c` in `h`.
#[inline]
pub fn find3(h: &[u8], a: u8, b: u8, c: u8) -> Option<usize> {
    memchr::memchr3(a, b, c, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_match_naive_search() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 37 % 251) as u8).collect();
        for start in 0..40 {
            let h = &data[start..];
            for a in [0u8, 1, 10, 34, 44, 128, 200, 255] {
                let naive1 = h.iter().position(|&c| c == a);
                assert_eq!(find1(h, a), naive1);
                let naive2 = h.iter().position(|&c| c == a || c == 44);
                assert_eq!(find2(h, a, 44), naive2);
                let naive3 = h.iter().position(|&c| c == a || c == 44 || c == 9);
                assert_eq!(find3(h, a, 44, 9), naive3);
            }
        }
    }
}
