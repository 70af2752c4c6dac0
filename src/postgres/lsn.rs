//! Log sequence numbers: positions in the write-ahead log.

use std::fmt;
use std::str::FromStr;

/// A position in Postgres' write-ahead log, printed as `X/Y` like the server does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`, which the server reads as "no position yet".
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// A string that is not an `X/Y` log sequence number.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN `{0}`; expected two hexadecimal numbers such as `0/16B3748`")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in ["", "0", "0/", "/1", "g/1", "0/1/2", "100000000/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad} parsed");
        }
    }
}
