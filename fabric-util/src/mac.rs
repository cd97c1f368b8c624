//! [`MacAddr`]: an Ethernet address, parsed once from `52:54:00:12:34:56` text.
//!
//! The parser takes six two-digit hex groups separated by `:` (or `-`, as some tools
//! print them), nothing more or less; [`fmt::Display`] and serde write the
//! lower-case colon form, so what netd reports reads back unchanged.

use std::fmt;
use std::str::FromStr;

/// Not six two-digit hex groups.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address such as \"52:54:00:12:34:56\"")]
pub struct MacParseError(pub String);

/// An Ethernet (EUI-48) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six bytes.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Whether the group bit (lowest bit of the first byte) is set: a multicast or
    /// broadcast address, which no NIC may have as its own.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(b: [u8; 6]) -> Self {
        MacAddr(b)
    }
}

impl From<MacAddr> for [u8; 6] {
    fn from(m: MacAddr) -> Self {
        m.0
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, MacParseError> {
        let bad = || MacParseError(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in mac.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            // from_str_radix alone would take "+a" or "a": two hex digits exactly.
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_roundtrip() {
        // Formerly netd's `mac_parse_roundtrip`.
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:ef:00".parse::<MacAddr>().is_err());
        assert!("zz:54:00:ab:cd:ef".parse::<MacAddr>().is_err());
        assert_eq!(
            "52-54-00-AB-CD-EF".parse::<MacAddr>().unwrap().octets(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
        assert!("52:54:00:ab:cd:+e".parse::<MacAddr>().is_err());
        assert!("".parse::<MacAddr>().is_err());
    }

    #[test]
    fn multicast_bit() {
        assert!("01:00:00:00:00:00"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!(MacAddr([0xff; 6]).is_multicast());
        assert!(!MacAddr([0x52, 0x54, 0, 0, 0, 1]).is_multicast());
    }

    #[test]
    fn serde_as_text() {
        let m = MacAddr([0x02, 0, 0, 0, 0, 0x0a]);
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"02:00:00:00:00:0a\"");
        let back: MacAddr = serde_json::from_str("\"02:00:00:00:00:0a\"").unwrap();
        assert_eq!(back, m);
        assert!(serde_json::from_str::<MacAddr>("\"02:00\"").is_err());
        assert!(serde_json::from_str::<MacAddr>("[2,0,0,0,0,10]").is_err());
    }
}
