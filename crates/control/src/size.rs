//! Human-readable byte sizes: `4096`, `512KiB`, `10GiB`, `1.5TiB`, `2G`.

/// Parses a size. Binary suffixes (`K`, `KiB`, `M`, `MiB`, ... up to `T`)
/// are powers of 1024; a bare number is bytes. Decimal fractions are allowed
/// with a suffix as long as the result is a whole number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    if num.is_empty() {
        return Err(format!("size {text:?} has no number"));
    }
    let bad = || format!("size {text:?} is not a whole number of bytes below 2^64");
    match num.split_once('.') {
        None => num
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1u64 << shift))
            .ok_or_else(bad),
        Some((int, frac)) => {
            if frac.is_empty() || frac.len() > 12 || frac.contains('.') {
                return Err(bad());
            }
            let int: u64 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| bad())?
            };
            let frac_num: u128 = frac.parse().map_err(|_| bad())?;
            let denom: u128 = 10u128.pow(u32::try_from(frac.len()).map_err(|_| bad())?);
            let scaled = frac_num * (1u128 << shift);
            if !scaled.is_multiple_of(denom) {
                return Err(bad());
            }
            let whole = u128::from(int) * (1u128 << shift) + scaled / denom;
            u64::try_from(whole).map_err(|_| bad())
        }
    }
}

/// Formats a size with the largest binary unit that divides it exactly.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["TiB", "GiB", "MiB", "KiB"];
    for (i, u) in UNITS.iter().enumerate() {
        let shift = 40 - 10 * i;
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{u}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1.5TiB"), Ok(3 << 39));
        assert_eq!(parse_size(" 64 MiB "), Ok(64 << 20));
    }

    #[test]
    fn refuses_nonsense() {
        assert!(parse_size("").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("10XB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("0.3B").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert!(parse_size("1.2.3G").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for n in [512u64, 4096, 10 << 30, 3 << 39, 12345] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }
}
