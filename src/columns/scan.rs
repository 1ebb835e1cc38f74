//! Fast byte searches without extra dependencies: eight bytes at a time
//! ("SWAR"). Parsing speed matters because one reader thread feeds every
//! worker; tokens are long runs of bytes that contain no delimiter.

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// Bit 7 of each byte of the result is set where `x` has a zero byte (plus
/// possibly false positives above the first one, which `trailing_zeros`
/// never reaches).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(LO) & !x & HI
}

#[inline(always)]
fn word(h: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&h[i..i + 8]);
    u64::from_le_bytes(w)
}

/// Index of the first `a` in `h`.
#[inline]
pub fn find1(h: &[u8], a: u8) -> Option<usize> {
    let va = LO * a as u64;
    let mut i = 0;
    while i + 8 <= h.len() {
        let z = zero_bytes(word(h, i) ^ va);
        if z != 0 {
            return Some(i + (z.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    h[i..].iter().position(|&c| c == a).map(|p| i + p)
}

/// Index of the first `a` or `b` in `h`.
#[inline]
pub fn find2(h: &[u8], a: u8, b: u8) -> Option<usize> {
    let (va, vb) = (LO * a as u64, LO * b as u64);
    let mut i = 0;
    while i + 8 <= h.len() {
        let x = word(h, i);
        let z = zero_bytes(x ^ va) | zero_bytes(x ^ vb);
        if z != 0 {
            return Some(i + (z.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    h[i..].iter().position(|&c| c == a || c == b).map(|p| i + p)
}

/// Index of the first `a`, `b` or `c` in `h`.
#[inline]
pub fn find3(h: &[u8], a: u8, b: u8, c: u8) -> Option<usize> {
    let (va, vb, vc) = (LO * a as u64, LO * b as u64, LO * c as u64);
    let mut i = 0;
    while i + 8 <= h.len() {
        let x = word(h, i);
        let z = zero_bytes(x ^ va) | zero_bytes(x ^ vb) | zero_bytes(x ^ vc);
        if z != 0 {
            return Some(i + (z.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    h[i..]
        .iter()
        .position(|&x| x == a || x == b || x == c)
        .map(|p| i + p)
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
