//! Money: `u64` micro-credits (1 credit = 1_000_000).

use crate::error::Error;

/// Micro-credits in one credit.
pub const MICRO: u64 = 1_000_000;

/// Parses a credit amount such as `"0.05"`, `"3"` or `"1.250000"` into micro-credits.
pub fn parse_price(s: &str) -> Result<u64, Error> {
    let bad = || Error::BadPrice(s.to_string());
    let t = s.trim();
    let (int, frac) = match t.split_once('.') {
        Some((i, f)) => (i, f),
        None => (t, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || frac.len() > 6
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let mut micro: u64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        micro += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
    }
    whole
        .checked_mul(MICRO)
        .and_then(|w| w.checked_add(micro))
        .ok_or_else(bad)
}

/// Formats micro-credits with six decimals: `50_000` -> `"0.050000"`.
pub fn format_price(micro: u64) -> String {
    format!("{}.{:06}", micro / MICRO, micro % MICRO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse_price("0.05").unwrap(), 50_000);
        assert_eq!(parse_price("3").unwrap(), 3_000_000);
        assert_eq!(parse_price(".5").unwrap(), 500_000);
        assert_eq!(parse_price("1.").unwrap(), 1_000_000);
        assert_eq!(parse_price(" 0.000001 ").unwrap(), 1);
        assert_eq!(parse_price("18446744073709.551615").unwrap(), u64::MAX);
    }

    #[test]
    fn refuses() {
        for s in [
            "",
            ".",
            "-1",
            "1.0000001",
            "1e3",
            "0,5",
            "18446744073709.551616",
            "99999999999999999999",
            "+1",
        ] {
            assert!(matches!(parse_price(s), Err(Error::BadPrice(_))), "{s}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_price(50_000), "0.050000");
        assert_eq!(format_price(0), "0.000000");
        assert_eq!(format_price(12_345_678), "12.345678");
        for v in [0, 1, 50_000, 999_999, 1_000_000, u64::MAX] {
            assert_eq!(parse_price(&format_price(v)).unwrap(), v);
        }
    }
}
