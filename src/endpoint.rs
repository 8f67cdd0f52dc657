//! Cluster URLs: parsed and checked before any I/O, with credentials kept out of every message.

use std::fmt;

/// One etcd cluster as given on the command line.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host:port`, no credentials: safe to log.
    pub base: String,
    /// Value of the `Authorization` header when the URL carried `user:password@`.
    pub auth: Option<String>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.auth.is_some() {
            " (with credentials)"
        } else {
            ""
        };
        write!(f, "{}{auth}", self.base)
    }
}

impl Endpoint {
    /// Parse `http[s]://[user[:password]@]host[:port][/]`. The error never repeats the URL,
    /// since it may hold a password.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("not a URL (expected http://host:port or https://host:port)")?;
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => return Err("the scheme must be http or https".into()),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err("must not contain a path, query or fragment".into());
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport)?;
        let port = match port {
            None => default_port,
            Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '%') {
            return Err("missing or invalid host".into());
        }
        let auth = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let creds = format!("{}:{}", percent_decode(user)?, percent_decode(pass)?);
                Some(format!("Basic {}", base64(creds.as_bytes())))
            }
        };
        Ok(Endpoint {
            base: format!("{scheme}://{host}:{port}"),
            auth,
        })
    }
}

fn split_host_port(hostport: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(v6) = hostport.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("garbage after ]")?),
        };
        return Ok((&hostport[..addr.len() + 2], port));
    }
    Ok(match hostport.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or("bad %-escape in the credentials")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape in the credentials")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "credentials are not UTF-8".into())
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_default_ports() {
        let e = Endpoint::parse("http://127.0.0.1:2379").unwrap();
        assert_eq!(e.base, "http://127.0.0.1:2379");
        assert_eq!(e.auth, None);
        assert_eq!(
            Endpoint::parse("https://conf1/").unwrap().base,
            "https://conf1:443"
        );
        assert_eq!(
            Endpoint::parse("http://[::1]:4001").unwrap().base,
            "http://[::1]:4001"
        );
    }

    #[test]
    fn credentials_become_a_header_and_never_the_display() {
        let e = Endpoint::parse("https://root:s%40cret@conf1:2379").unwrap();
        assert_eq!(e.auth.as_deref(), Some("Basic cm9vdDpzQGNyZXQ="));
        assert_eq!(e.to_string(), "https://conf1:2379");
        assert!(!format!("{e:?}").contains("cret"));
    }

    #[test]
    fn rejects_bad_urls_without_echoing_them() {
        for bad in [
            "conf1:2379",
            "ftp://x",
            "http://",
            "http://h:port",
            "http://h:99999",
            "http://h/v2/keys",
            "http://u:pw@h:1?x",
        ] {
            let err = Endpoint::parse(bad).unwrap_err();
            assert!(!err.contains("pw"), "{bad}: {err}");
        }
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
