//! Which addresses another instance may be reached at (`peers.allowed`). An address read from
//! the Redis registry is a claim made by whatever can write that Redis, not a credential: it
//! is used only when it is a bare `http(s)://host[:port]` base URL whose host is one the
//! operator allowed, so a forged entry can point this instance at nothing else (no internal
//! service, no path of its choosing).

use std::net::IpAddr;

use ipnet::IpNet;

/// The allowed hosts and networks of `peers.allowed`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAllowList {
    nets: Vec<IpNet>,
    names: Vec<String>,
}

impl PeerAllowList {
    /// Parses `peers.allowed`: each entry is a CIDR range (`10.0.0.0/8`, `fd00::/8`), one IP
    /// address, or a host name matched exactly (case-insensitively, never resolved to check).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut list = Self::default();
        for raw in entries {
            let entry = raw.trim();
            if let Ok(net) = entry.parse::<IpNet>() {
                list.nets.push(net.trunc());
            } else if let Ok(ip) = entry.trim_matches(['[', ']']).parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else if is_host_name(entry) {
                list.names.push(entry.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "{entry:?} is neither a CIDR range, an IP address nor a host name"
                ));
            }
        }
        Ok(list)
    }

    /// Whether `host` (an IP address, bracketed or not, or a name) is allowed.
    pub fn allows_host(&self, host: &str) -> bool {
        match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => {
                let ip = canonical(ip);
                self.nets.iter().any(|net| net.contains(&ip))
            }
            Err(_) => self.names.iter().any(|n| n.eq_ignore_ascii_case(host)),
        }
    }

    /// Checks a registered address: a bare `http://` or `https://` base URL (no user, path,
    /// query or fragment) on an allowed host. Returns it without a trailing `/`.
    pub fn check_url(&self, url: &str) -> Result<String, &'static str> {
        let uri: http::Uri = url.parse().map_err(|_| "not a URL")?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err("not an http:// or https:// URL"),
        }
        let authority = uri.authority().ok_or("no host")?;
        if authority.as_str().contains('@') {
            return Err("carries user information");
        }
        if uri.query().is_some() || !matches!(uri.path(), "" | "/") || url.contains('#') {
            return Err("carries a path, query or fragment");
        }
        if !self.allows_host(authority.host()) {
            return Err("host not in peers.allowed");
        }
        // Rebuilt from what was checked, so that nothing else of the text reaches a client.
        let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
        Ok(match authority.port_u16() {
            Some(port) => format!("{scheme}://{}:{port}", authority.host()),
            None => format!("{scheme}://{}", authority.host()),
        })
    }
}

/// An IPv4 address written as IPv4-mapped IPv6 (`::ffff:10.0.0.1`) is matched as IPv4, so a
/// range cannot be dodged by spelling.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// A host name: dot-separated labels of letters, digits and `-`, the last one not all
/// digits (so that a mistyped address such as `10.0.0` is refused, not taken for a name).
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && !s
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> PeerAllowList {
        PeerAllowList::parse(&entries.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("valid list")
    }

    #[test]
    fn ranges_addresses_and_names_are_matched() {
        let l = list(&["127.0.0.0/8", "10.1.2.3", "fd00::/8", "runcache-1"]);
        assert!(l.allows_host("127.0.0.7"));
        assert!(l.allows_host("10.1.2.3"));
        assert!(!l.allows_host("10.1.2.4"));
        assert!(l.allows_host("[fd00::1]"));
        assert!(l.allows_host("RunCache-1"));
        assert!(!l.allows_host("runcache-2"));
        assert!(!l.allows_host("192.168.1.1"));
        // IPv4-mapped spelling of an address outside the ranges is still outside.
        assert!(!l.allows_host("::ffff:192.168.1.1"));
        assert!(l.allows_host("::ffff:127.0.0.1"));
    }

    #[test]
    fn only_bare_base_urls_on_allowed_hosts_pass() {
        let l = list(&["127.0.0.0/8"]);
        assert_eq!(
            l.check_url("http://127.0.0.1:8080/"),
            Ok("http://127.0.0.1:8080".to_owned())
        );
        assert!(l.check_url("https://127.0.0.1").is_ok());
        for bad in [
            "http://10.0.0.1:8080",
            "http://127.0.0.1:8080/admin",
            "http://127.0.0.1:8080/?x=1",
            "http://127.0.0.1:8080/#x",
            "http://user:pw@127.0.0.1:8080",
            "ftp://127.0.0.1",
            "127.0.0.1:8080",
            "http://evil.example:8080",
            "",
        ] {
            assert!(l.check_url(bad).is_err(), "{bad} passed");
        }
    }

    #[test]
    fn a_bad_entry_is_refused() {
        for bad in [
            "10.0.0.0/33",
            "-host",
            "a b",
            "http://x",
            "",
            "10.0.0",
            "0177.0.0.1",
        ] {
            assert!(
                PeerAllowList::parse(&[bad.to_owned()]).is_err(),
                "{bad:?} was taken"
            );
        }
    }
}
