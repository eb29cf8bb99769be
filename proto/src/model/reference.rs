//! Image references in Docker's grammar (the `distribution/reference`
//! package the Engine itself parses with):
//!
//! ```text
//! reference      := name [ ":" tag ] [ "@" digest ]
//! name           := [ domain "/" ] path-component *( "/" path-component )
//! domain         := host [ ":" port ]      host: DNS name, IPv4 or [IPv6]
//! path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag            := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest         := algorithm ":" hex{32,}
//! ```
//!
//! A reference becomes part of an Engine API path (`/images/{name}/json`),
//! so nothing but this grammar may reach one: `x/../../containers/victim`
//! is not a reference, and neither is anything with `?`, `%`, `#` or a space.

/// Longest name (domain and path) the Engine accepts.
const MAX_NAME: usize = 255;

/// Whether `reference` is an image reference in Docker's grammar.
pub fn valid_image_reference(reference: &str) -> bool {
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (reference, None),
    };
    if digest.is_some_and(|d| !valid_digest(d)) {
        return false;
    }
    // A tag follows the last ':' after the last '/' (a ':' before it is a port).
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    if tag.is_some_and(|t| !valid_tag(t)) {
        return false;
    }
    valid_name(name)
}

fn valid_name(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_NAME {
        return false;
    }
    let mut components: Vec<&str> = name.split('/').collect();
    // The first component is a registry when it looks like one (Docker's rule).
    if components.len() > 1 {
        let first = components[0];
        let is_domain = first.contains(['.', ':'])
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase());
        if is_domain {
            if !valid_domain(first) {
                return false;
            }
            components.remove(0);
        }
    }
    components.iter().all(|c| valid_path_component(c))
}

fn valid_path_component(component: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        // A run of letters and digits...
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        // ...then one separator, and another run must follow.
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += if bytes.get(i + 1) == Some(&b'_') {
                    2
                } else {
                    1
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        }
    };
    if port.is_some_and(|p| p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    // Empty only for a bracketed IPv6 host, checked above.
    host.is_empty() && domain.starts_with('[')
        || !host.is_empty()
            && host.split('.').all(|label| {
                let b = label.as_bytes();
                !b.is_empty()
                    && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                    && b[0] != b'-'
                    && b[b.len() - 1] != b'-'
            })
}

fn valid_tag(tag: &str) -> bool {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

fn valid_digest(digest: &str) -> bool {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return false;
    };
    let algorithm_ok = algorithm.split(['+', '.', '-', '_']).all(|part| {
        let b = part.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    algorithm_ok && hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_docker_accepts() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        for good in [
            "portsip/pbx:22",
            "portsip/postgresql:14.12",
            "pbx",
            "imfleet-test/pbx:23-never-healthy",
            "registry.example.com:5000/portsip/pbx:23.1",
            "localhost/pbx:1",
            "localhost:5000/a/b/c:latest",
            "[::1]:5000/pbx:1",
            "Registry.Example.com/pbx",
            "a__b/c-d---e/f.g:Tag_1.x-y",
            &format!("pbx@{digest}"),
            &format!("portsip/pbx:22@{digest}"),
            &format!("sha256:{}", "0".repeat(64)),
        ] {
            assert!(valid_image_reference(good), "{good}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "x/../../containers/victim",
            "../pbx",
            "a/./b",
            "a//b",
            "/pbx",
            "pbx/",
            "-x",
            "--help",
            "Pbx",
            "pbx:",
            "pbx:-x",
            "pbx:a b",
            "pbx:22\n",
            "a b",
            "pbx?x=1",
            "pbx#x",
            "pbx%2F..",
            "a.-b",
            "a___b",
            "pbx@sha256:abc",
            "pbx@:abcdefabcdefabcdefabcdefabcdefabcdef",
            "host:port/pbx",
            "[zz]:5000/pbx",
            "-registry.com/pbx",
            &format!("pbx:{}", "a".repeat(129)),
            &"a".repeat(256),
        ] {
            assert!(!valid_image_reference(bad), "{bad:?}");
        }
    }
}
