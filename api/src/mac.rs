//! MAC addresses in the text form the contract carries (`PortSpec::mac`, `PortStatus::host_mac`).

/// A 48-bit Ethernet address.
pub type Mac = [u8; 6];

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut out = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Formats as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &Mac) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let m = parse_mac("02:0a:FF:00:01:10").unwrap();
        assert_eq!(fmt_mac(&m), "02:0a:ff:00:01:10");
        assert!(parse_mac("02:0a:ff:00:01").is_none());
        assert!(parse_mac("02:0a:ff:00:01:10:11").is_none());
        assert!(parse_mac("zz:0a:ff:00:01:10").is_none());
        assert!(parse_mac("2:0a:ff:00:01:10").is_none());
        assert!(parse_mac("+2:0a:ff:00:01:10").is_none());
    }
}
