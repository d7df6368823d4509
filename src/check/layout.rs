//! Guest RAM layouts: the default one (regions separated by holes) and the `GPA:SIZE,...`
//! text form, with the size syntax it is written in.
//!
//! Layouts are what a user of the checker most often writes by hand, so parsing them (with
//! errors that say what is wrong) belongs to the library; the command line only forwards the
//! string. Depends on nothing else in `check`.

use crate::driver::RegionSpec;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Parses a size in bytes: a number with an optional binary suffix `K`, `M`, `G`, `T` (`KiB`,
/// `MB`... are accepted too; all are powers of 1024), or a `0x` hexadecimal number of bytes.
/// The error says what is wrong with `s`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).map_err(|e| format!("invalid size {s:?}: {e}"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 4096, 64K, 256M, 1G"))?;
    let mult = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => KIB,
        "M" | "MB" | "MIB" => MIB,
        "G" | "GB" | "GIB" => GIB,
        "T" | "TB" | "TIB" => TIB,
        _ => return Err(format!("invalid size suffix in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Parses `GPA:SIZE[,GPA:SIZE...]` (both in [`parse_size`] syntax), e.g. `0:64M,1G:64M,4G:32M`.
/// Overlaps and alignment are checked when the run plans its memory.
pub fn parse_layout(s: &str) -> Result<Vec<RegionSpec>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (g, z) = part
            .split_once(':')
            .ok_or_else(|| format!("layout entry {part:?} is not GPA:SIZE"))?;
        out.push(RegionSpec::new(parse_size(g)?, parse_size(z)?));
    }
    if out.is_empty() {
        return Err("empty layout".into());
    }
    Ok(out)
}

/// `regions` regions totalling `total` bytes (1 MiB multiples), each starting at the next
/// 1 GiB boundary after the previous one ends, so every pair is separated by a hole.
pub fn default_layout(total: u64, regions: u32) -> Result<Vec<RegionSpec>, String> {
    if regions == 0 {
        return Err("--regions must be at least 1".into());
    }
    let each = total / u64::from(regions) / MIB * MIB;
    if each == 0 {
        return Err(format!(
            "{total} bytes of RAM cannot be split into {regions} regions of at least 1 MiB"
        ));
    }
    let mut out = Vec::new();
    let mut gpa = 0u64;
    for i in 0..regions {
        let size = if i + 1 == regions {
            (total - each * u64::from(regions - 1)) / MIB * MIB
        } else {
            each
        };
        out.push(RegionSpec::new(gpa, size));
        gpa = (gpa + size + 1).next_multiple_of(GIB);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_layouts() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(
            parse_layout("0:64M,1G:32M").unwrap(),
            vec![
                RegionSpec::new(0, 64 << 20),
                RegionSpec::new(1 << 30, 32 << 20)
            ]
        );
        assert!(parse_layout("0-64M").is_err());
        assert!(parse_layout(" , ").is_err());
    }

    #[test]
    fn default_layout_has_holes() {
        let l = default_layout(96 << 20, 3).unwrap();
        assert_eq!(
            l,
            vec![
                RegionSpec::new(0, 32 << 20),
                RegionSpec::new(1 << 30, 32 << 20),
                RegionSpec::new(2 << 30, 32 << 20)
            ]
        );
        assert!(default_layout(1 << 20, 3).is_err());
        assert!(default_layout(64 << 20, 0).is_err());
    }
}
