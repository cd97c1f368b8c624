//! [`Size`]: a byte count as a config file or a command line spells it.
//!
//! One grammar for every size the fabric reads (stord's disk sizes, vmm-shim's
//! `--mem`): a decimal number, optionally followed (after optional blanks) by a
//! binary unit: `B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`, in any case, so `1GiB`,
//! `1G`, `1g` and `1073741824` are the same size. Units are powers of 1024; decimal
//! units (`KB`, `GB`) are refused rather than guessed. Overflow is an error, never a
//! wrapped value.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// no number before the unit
    #[error("`{0}` is not a size (a number of bytes or like \"64MiB\")")]
    NotANumber(String),
    /// a unit this grammar does not know
    #[error("`{text}`: unknown unit `{unit}` (use B, KiB, MiB, GiB or TiB)")]
    UnknownUnit {
        /// The whole text.
        text: String,
        /// The unit as written.
        unit: String,
    },
    /// more than 2^64 - 1 bytes
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// A number of bytes. Parses from `"64MiB"`-style text ([`FromStr`]), deserializes
/// from such a string or a plain number, serializes as the number, and displays in
/// the largest binary unit that divides it exactly (`"64MiB"`, `"4097"`), a form
/// the parser reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

/// Units by decreasing shift; the first name of each is the one [`Size`] displays.
const UNITS: [(&str, &str, u32); 4] = [
    ("TiB", "T", 40),
    ("GiB", "G", 30),
    ("MiB", "M", 20),
    ("KiB", "K", 10),
];

impl Size {
    /// The byte count.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl From<u64> for Size {
    fn from(n: u64) -> Self {
        Size(n)
    }
}

impl From<Size> for u64 {
    fn from(s: Size) -> Self {
        s.0
    }
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, SizeError> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| SizeError::NotANumber(s.to_string()))?;
        let unit = unit.trim();
        let shift = if unit.is_empty() || unit.eq_ignore_ascii_case("b") {
            0
        } else {
            UNITS
                .iter()
                .find(|(long, short, _)| {
                    unit.eq_ignore_ascii_case(long) || unit.eq_ignore_ascii_case(short)
                })
                .map(|&(_, _, shift)| shift)
                .ok_or_else(|| SizeError::UnknownUnit {
                    text: s.to_string(),
                    unit: unit.to_string(),
                })?
        };
        n.checked_mul(1 << shift)
            .map(Size)
            .ok_or_else(|| SizeError::TooLarge(s.to_string()))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = UNITS
            .iter()
            .find(|&&(_, _, shift)| self.0 != 0 && self.0.trailing_zeros() >= shift);
        match unit {
            Some(&(name, _, shift)) => write!(f, "{}{name}", self.0 >> shift),
            None => write!(f, "{}", self.0),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string like \"64MiB\" or \"10GiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<u64, SizeError> {
        s.parse::<Size>().map(Size::bytes)
    }

    #[test]
    fn stord_spellings() {
        // Formerly stord's `parse_size` tests.
        assert_eq!(p("4096"), Ok(4096));
        assert_eq!(p("64MiB"), Ok(64 << 20));
        assert_eq!(p("10G"), Ok(10 << 30));
        assert!(p("10 furlongs").is_err());
        assert!(p("").is_err());
        assert!(p("99999999999TiB").is_err());
        assert_eq!(p("1TiB"), Ok(1 << 40));
        assert_eq!(p("7B"), Ok(7));
        assert_eq!(p("3KiB"), Ok(3 << 10));
        assert_eq!(p("3k"), Ok(3 << 10));
        assert_eq!(p(" 64 MiB "), Ok(64 << 20));
    }

    #[test]
    fn vmm_spellings() {
        // Formerly vmm-shim's `parse_size` tests (its `--mem`).
        assert_eq!(p("256M"), Ok(256 << 20));
        assert_eq!(p("1G"), Ok(1 << 30));
        assert_eq!(p("4096"), Ok(4096));
        assert!(p("x").is_err());
        assert!(p("").is_err());
        assert!(p("99999999999999G").is_err());
        assert_eq!(p("1g"), Ok(1 << 30));
        assert_eq!(p("256m"), Ok(256 << 20));
        assert_eq!(p("65536K"), Ok(64 << 20));
    }

    #[test]
    fn one_size_many_spellings() {
        for s in [
            "1GiB",
            "1G",
            "1g",
            "1gib",
            "1024MiB",
            "1048576K",
            "1073741824",
        ] {
            assert_eq!(p(s), Ok(1 << 30), "{s}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(p("GiB"), Err(SizeError::NotANumber("GiB".into())));
        assert_eq!(
            p("1GB"),
            Err(SizeError::UnknownUnit {
                text: "1GB".into(),
                unit: "GB".into()
            })
        );
        assert!(matches!(p("-1"), Err(SizeError::NotANumber(_))));
        assert!(matches!(p("17179869184G"), Err(SizeError::TooLarge(_))));
        assert!(p("ten gigs").unwrap_err().to_string().contains("64MiB"));
    }

    #[test]
    fn display_reads_back() {
        for n in [
            0,
            1,
            4097,
            1 << 10,
            3 << 20,
            64 << 20,
            1 << 30,
            5 << 40,
            u64::MAX,
        ] {
            let shown = Size(n).to_string();
            assert_eq!(p(&shown), Ok(n), "{shown}");
        }
        assert_eq!(Size(64 << 20).to_string(), "64MiB");
        assert_eq!(Size(1536 << 20).to_string(), "1536MiB");
        assert_eq!(Size(4097).to_string(), "4097");
        assert_eq!(Size(0).to_string(), "0");
    }

    #[test]
    fn serde_takes_numbers_and_strings() {
        let s: Size = serde_json::from_str("\"64MiB\"").unwrap();
        assert_eq!(s, Size(64 << 20));
        let s: Size = serde_json::from_str("1048576").unwrap();
        assert_eq!(s, Size(1 << 20));
        assert!(serde_json::from_str::<Size>("-1").is_err());
        assert!(serde_json::from_str::<Size>("\"12 parsecs\"").is_err());
        assert_eq!(serde_json::to_string(&Size(4096)).unwrap(), "4096");
    }
}
