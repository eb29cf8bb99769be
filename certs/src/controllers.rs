//! The controller certificates an agent accepts: a list of serials the
//! fleet CA signed, with a version that only grows, and the revoked ones. The controller sends it
//! with every request (a request header); an agent keeps the newest list it
//! has verified and, once it has one, admits only the controller
//! certificates it names. So a revoked controller certificate is refused by
//! every agent the controller has talked to since, and a thief cannot bring
//! it back by replaying an older list (or write one: that takes the CA key).

use crate::CertError;

/// The request header carrying the signed list.
pub const HEADER: &str = "x-imfleet-controllers";
/// Most serials a list may name (controllers in use, renewed and not yet
/// expired, across a few nodes).
pub const MAX_SERIALS: usize = 64;
/// Longest encoded list accepted.
pub const MAX_ENCODED_BYTES: usize = 16 * 1024;

/// The accepted controller certificates, by serial (lower-case hex), and
/// the revoked ones not yet expired (serial, not-after in Unix seconds):
/// an agent remembers every revocation it has seen, so a controller whose
/// records were restored from an older backup cannot admit one again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerList {
    /// Grows with every change (milliseconds since the epoch when made).
    pub version: u64,
    pub serials: Vec<String>,
    pub revoked: Vec<(String, i64)>,
}

fn is_serial(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= 40
        && serial
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ControllerList {
    /// What the CA signs: the list bound to its purpose.
    fn message(&self) -> String {
        let mut text = format!("imfleet controllers\nversion {}\n", self.version);
        for serial in &self.serials {
            text.push_str("serial ");
            text.push_str(serial);
            text.push('\n');
        }
        for (serial, not_after) in &self.revoked {
            text.push_str(&format!("revoked {serial} {not_after}\n"));
        }
        text
    }

    fn parse(text: &str) -> Option<ControllerList> {
        let mut lines = text.lines();
        if lines.next()? != "imfleet controllers" {
            return None;
        }
        let version = lines.next()?.strip_prefix("version ")?.parse().ok()?;
        let (mut serials, mut revoked) = (Vec::new(), Vec::new());
        for line in lines {
            if let Some(serial) = line.strip_prefix("serial ") {
                if !is_serial(serial) || serials.len() == MAX_SERIALS {
                    return None;
                }
                serials.push(serial.to_owned());
            } else {
                let (serial, not_after) = line.strip_prefix("revoked ")?.split_once(' ')?;
                if !is_serial(serial) || revoked.len() == MAX_SERIALS {
                    return None;
                }
                revoked.push((serial.to_owned(), not_after.parse().ok()?));
            }
        }
        Some(ControllerList {
            version,
            serials,
            revoked,
        })
    }

    /// The version an encoded list claims, read without checking its
    /// signature: only to skip lists no newer than one already held.
    pub fn claimed_version(encoded: &str) -> Option<u64> {
        if encoded.len() > MAX_ENCODED_BYTES {
            return None;
        }
        let text = hex::decode(encoded.split_once('.')?.0).ok()?;
        let text = String::from_utf8(text).ok()?;
        text.lines().nth(1)?.strip_prefix("version ")?.parse().ok()
    }

    pub fn admits(&self, serial: &str) -> bool {
        self.serials.iter().any(|s| s == serial)
    }

    /// The list signed by `ca`, encoded for the header.
    pub fn sign(&self, ca: &crate::CertificateAuthority) -> Result<String, CertError> {
        let message = self.message();
        let signature = ca.sign(message.as_bytes())?;
        Ok(format!(
            "{}.{}",
            hex::encode(message.as_bytes()),
            hex::encode(signature)
        ))
    }

    /// An encoded list, if a CA in `ca_pem` signed it.
    pub fn verify(encoded: &str, ca_pem: &str) -> Result<ControllerList, CertError> {
        let bad = |detail: &str| CertError::Verify(format!("controller list: {detail}"));
        if encoded.len() > MAX_ENCODED_BYTES {
            return Err(bad("too long"));
        }
        let (text, signature) = encoded.split_once('.').ok_or_else(|| bad("malformed"))?;
        let text = hex::decode(text).map_err(|_| bad("malformed"))?;
        let signature = hex::decode(signature).map_err(|_| bad("malformed"))?;
        if !crate::verify_ca_signature(ca_pem, &text, &signature) {
            return Err(bad("not signed by this fleet's CA"));
        }
        let text = String::from_utf8(text).map_err(|_| bad("malformed"))?;
        ControllerList::parse(&text).ok_or_else(|| bad("malformed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_list_the_ca_signed_is_taken_and_it_says_what_it_signed() {
        let ca = crate::CertificateAuthority::generate("CA").unwrap();
        let list = ControllerList {
            version: 7,
            serials: vec!["0a1b".into(), "ff".into()],
            revoked: vec![("0c".into(), 1_900_000_000)],
        };
        let encoded = list.sign(&ca).unwrap();
        let back = ControllerList::verify(&encoded, ca.cert_pem()).unwrap();
        assert_eq!(back, list);
        assert_eq!(ControllerList::claimed_version(&encoded), Some(7));
        assert!(back.admits("ff") && !back.admits("0a"));

        let other = crate::CertificateAuthority::generate("CA").unwrap();
        assert!(ControllerList::verify(&encoded, other.cert_pem()).is_err());
        // The text changed under the signature: refused.
        let (_, signature) = encoded.split_once('.').unwrap();
        let forged = ControllerList {
            version: 8,
            serials: vec!["0a1b".into(), "ff".into(), "01".into()],
            revoked: Vec::new(),
        };
        let swapped = format!("{}.{signature}", hex::encode(forged.message()));
        assert!(ControllerList::verify(&swapped, ca.cert_pem()).is_err());
        for junk in ["", ".", "zz.zz", &"a".repeat(MAX_ENCODED_BYTES + 1)] {
            assert!(ControllerList::verify(junk, ca.cert_pem()).is_err());
        }
        // Signed, but not a list: refused.
        let odd = format!(
            "{}.{}",
            hex::encode("imfleet controllers\nversion 1\nserial XYZ\n"),
            hex::encode(
                ca.sign(b"imfleet controllers\nversion 1\nserial XYZ\n")
                    .unwrap()
            )
        );
        assert!(ControllerList::verify(&odd, ca.cert_pem()).is_err());
    }
}
