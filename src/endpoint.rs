//! Cluster URLs, credentials and TLS settings: parsed and checked before any network I/O,
//! with passwords kept out of every message.

use std::fmt;
use std::path::Path;

use ureq::tls::{Certificate, ClientCert, PemItem, RootCerts, TlsConfig};

/// One etcd cluster as given on the command line: one or more member URLs, with the
/// credentials and TLS settings that apply to every member.
#[derive(Clone)]
pub struct Endpoint {
    /// The members' `scheme://host:port`, comma-separated, no credentials: safe to log.
    pub base: String,
    /// Each member's `scheme://host:port`, in the order given; never empty.
    pub members: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    /// The password came from the URL, where `ps` shows it.
    pub password_in_url: bool,
    pub tls: TlsConfig,
}

/// One member URL taken apart.
struct Member {
    scheme: String,
    base: String,
    user: Option<String>,
    password: Option<String>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.user.is_some() {
            " (with credentials)"
        } else {
            ""
        };
        write!(f, "{}{auth}", self.base)
    }
}

/// TLS and credential flags for one side.
#[derive(Debug, Default, Clone)]
pub struct Security {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<String>,
}

impl Endpoint {
    /// Parse a comma-separated list of member URLs, each
    /// `http[s]://[user[:password]@]host[:port][/]`, as etcdctl's `--endpoints` takes them.
    ///
    /// etcd's users are cluster-wide, so credentials in a URL apply to every member: they
    /// may be given in one URL or repeated, but two members with different credentials are
    /// refused. All members share one scheme, since the TLS flags apply to all of them (and a
    /// mixed list would send the credentials in clear text to some members). A member
    /// listed twice is refused. Errors name a member by its position, never by its URL,
    /// which may hold a password.
    pub fn parse(list: &str) -> Result<Endpoint, String> {
        let several = list.contains(',');
        let mut members: Vec<Member> = Vec::new();
        for (i, url) in list.split(',').enumerate() {
            let n = i.saturating_add(1);
            let at = |e: String| {
                if several {
                    format!("member {n}: {e}")
                } else {
                    e
                }
            };
            let url = url.trim();
            if url.is_empty() {
                return Err(at("empty (a stray comma?)".into()));
            }
            let m = Member::parse(url).map_err(at)?;
            for (j, other) in members.iter().enumerate() {
                let j = j.saturating_add(1);
                if other.base == m.base {
                    return Err(at(format!("{} is member {j} again", m.base)));
                }
                if other.scheme != m.scheme {
                    return Err(at(format!(
                        "{} while member {j} is {}: all members use one scheme, since the \
                         TLS flags apply to all of them",
                        m.scheme, other.scheme
                    )));
                }
            }
            members.push(m);
        }
        let mut user = None;
        let mut password = None;
        let mut from: Option<usize> = None;
        for (i, m) in members.iter().enumerate() {
            if m.user.is_none() {
                continue;
            }
            match from {
                None => {
                    user = m.user.clone();
                    password = m.password.clone();
                    from = Some(i);
                }
                Some(j) if (&m.user, &m.password) != (&user, &password) => {
                    return Err(format!(
                        "members {} and {} carry different credentials; etcd's users are \
                         cluster-wide: give them once",
                        j.saturating_add(1),
                        i.saturating_add(1)
                    ));
                }
                Some(_) => {}
            }
        }
        let bases: Vec<String> = members.into_iter().map(|m| m.base).collect();
        Ok(Endpoint {
            base: bases.join(","),
            members: bases,
            password_in_url: password.is_some(),
            user,
            password,
            tls: TlsConfig::default(),
        })
    }

    /// Apply the side's TLS and credential flags. `side` is "src" or "dst", for messages.
    pub fn secure(mut self, sec: &Security, side: &str) -> Result<Endpoint, String> {
        if let Some(user) = &sec.user {
            if self.user.is_some() {
                return Err(format!(
                    "--{side}-user: the {side} URL already names a user"
                ));
            }
            self.user = Some(user.clone());
        }
        if let Some(path) = &sec.password_file {
            if self.password_in_url {
                return Err(format!(
                    "--{side}-password-file: the {side} URL already holds a password"
                ));
            }
            if self.user.is_none() {
                return Err(format!(
                    "--{side}-password-file needs a user: put it in the URL or use --{side}-user"
                ));
            }
            let raw = std::fs::read_to_string(path)
                .map_err(|e| format!("--{side}-password-file: cannot read {path}: {e}"))?;
            self.password = Some(raw.trim_end_matches(['\n', '\r']).to_string());
        }
        let https = self.base.starts_with("https://");
        let tls_flag = sec.ca_file.is_some() || sec.cert_file.is_some() || sec.key_file.is_some();
        if tls_flag && !https {
            return Err(format!(
                "--{side}-ca-file/--{side}-cert-file/--{side}-key-file need an https:// {side} URL"
            ));
        }
        if https {
            self.tls = tls_config(sec, side)?;
        }
        Ok(self)
    }

    /// The user for HTTP basic auth, if any (never the password).
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The user and password, when there is a user (v3 exchanges them for a token).
    pub fn credentials(&self) -> Option<(&str, &str)> {
        let user = self.user.as_deref()?;
        Some((user, self.password.as_deref().unwrap_or("")))
    }

    /// The `Authorization` header value, when there is a user.
    pub fn auth_header(&self) -> Option<String> {
        let user = self.user.as_ref()?;
        let creds = format!("{user}:{}", self.password.as_deref().unwrap_or(""));
        Some(format!("Basic {}", base64(creds.as_bytes())))
    }
}

impl Member {
    /// Parse `http[s]://[user[:password]@]host[:port][/]`. The error never repeats the URL,
    /// since it may hold a password.
    fn parse(url: &str) -> Result<Member, String> {
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
        let (user, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (Some(percent_decode(user)?), Some(percent_decode(pass)?)),
                None => (Some(percent_decode(u)?), None),
            },
        };
        Ok(Member {
            base: format!("{scheme}://{host}:{port}"),
            scheme: scheme.to_string(),
            user,
            password,
        })
    }
}

/// Where distributions keep the system's trusted CA bundle.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

fn read_pem(path: &str, flag: &str) -> Result<Vec<PemItem<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag}: cannot read {path}: {e}"))?;
    ureq::tls::parse_pem(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag}: {path} is not valid PEM: {e}"))
}

fn certificates(items: Vec<PemItem<'static>>) -> Vec<Certificate<'static>> {
    items
        .into_iter()
        .filter_map(|i| match i {
            PemItem::Certificate(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn tls_config(sec: &Security, side: &str) -> Result<TlsConfig, String> {
    let roots = match &sec.ca_file {
        Some(path) => {
            let flag = format!("--{side}-ca-file");
            let certs = certificates(read_pem(path, &flag)?);
            if certs.is_empty() {
                return Err(format!("{flag}: {path} holds no certificate"));
            }
            RootCerts::new_with_certs(&certs)
        }
        None => system_roots(),
    };
    let client_cert = match (&sec.cert_file, &sec.key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let chain = certificates(read_pem(cert, &format!("--{side}-cert-file"))?);
            if chain.is_empty() {
                return Err(format!("--{side}-cert-file: {cert} holds no certificate"));
            }
            let flag = format!("--{side}-key-file");
            let key = read_pem(key, &flag)?
                .into_iter()
                .find_map(|i| match i {
                    PemItem::PrivateKey(k) => Some(k),
                    _ => None,
                })
                .ok_or_else(|| format!("{flag}: {key} holds no private key"))?;
            Some(ClientCert::new_with_certs(&chain, key))
        }
        _ => {
            return Err(format!(
                "--{side}-cert-file and --{side}-key-file go together"
            ))
        }
    };
    Ok(TlsConfig::builder()
        .root_certs(roots)
        .client_cert(client_cert)
        .build())
}

/// The system's CA bundle (`SSL_CERT_FILE` first), or the bundled Mozilla roots if none.
fn system_roots() -> RootCerts {
    let env = std::env::var("SSL_CERT_FILE").ok();
    for path in env.iter().map(String::as_str).chain(SYSTEM_BUNDLES) {
        if !Path::new(path).is_file() {
            continue;
        }
        if let Ok(items) = read_pem(path, "SSL_CERT_FILE") {
            let certs = certificates(items);
            if !certs.is_empty() {
                return RootCerts::new_with_certs(&certs);
            }
        }
    }
    RootCerts::WebPki
}

fn split_host_port(hostport: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(v6) = hostport.strip_prefix('[') {
        let (_, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("garbage after ]")?),
        };
        let host = hostport
            .strip_suffix(after)
            .ok_or("unclosed [ in the host")?;
        return Ok((host, port));
    }
    Ok(match hostport.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    const BAD: &str = "bad %-escape in the credentials";
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        if b == b'%' {
            let (hex, tail) = rest.split_at_checked(2).ok_or(BAD)?;
            rest = tail;
            let hex = std::str::from_utf8(hex).map_err(|_| BAD)?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(BAD.into());
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| BAD)?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| "credentials are not UTF-8".into())
}

/// Standard padded base64 (RFC 4648), as HTTP basic auth and etcd's v3 gateway want it.
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3).saturating_mul(4));
    for chunk in input.chunks(3) {
        let byte = |i: usize| chunk.get(i).copied().map_or(0, u32::from);
        let n = byte(0) << 16 | byte(1) << 8 | byte(2);
        // A chunk of k bytes gives k + 1 digits, then '=' padding.
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            let digit = ALPHABET.get((n >> shift & 63) as usize).copied();
            match digit {
                Some(c) if i <= chunk.len() => out.push(char::from(c)),
                _ => out.push('='),
            }
        }
    }
    out
}

/// Decode standard base64, padded or not; `None` for anything else.
pub fn unbase64(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let data = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(data.len().saturating_mul(3) / 4);
    for chunk in data.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= digit(c)? << (18 - 6 * i as u32);
        }
        // k digits carry k - 1 bytes.
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i as u32)) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_default_ports() {
        let e = Endpoint::parse("http://127.0.0.1:2379").unwrap();
        assert_eq!(e.base, "http://127.0.0.1:2379");
        assert_eq!(e.auth_header(), None);
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
        assert_eq!(e.auth_header().as_deref(), Some("Basic cm9vdDpzQGNyZXQ="));
        assert!(e.password_in_url);
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
    fn member_lists() {
        let e = Endpoint::parse("https://conf1001:2379,https://conf1002:2379, https://conf1003/")
            .unwrap();
        assert_eq!(
            e.members,
            [
                "https://conf1001:2379",
                "https://conf1002:2379",
                "https://conf1003:443"
            ]
        );
        assert_eq!(e.base, e.members.join(","));
        assert_eq!(e.to_string(), e.base);
        // Credentials in one URL, or the same in several, apply to every member.
        for list in [
            "http://root:pw@a:1,http://b:2",
            "http://a:1,http://root:pw@b:2",
            "http://root:pw@a:1,http://root:pw@b:2",
        ] {
            let e = Endpoint::parse(list).unwrap();
            assert_eq!(
                e.auth_header().as_deref(),
                Some("Basic cm9vdDpwdw=="),
                "{list}"
            );
            assert!(e.password_in_url);
            assert_eq!(e.base, "http://a:1,http://b:2");
        }
        let one = Endpoint::parse("http://a:1").unwrap();
        assert_eq!(one.members, ["http://a:1"]);
    }

    #[test]
    fn bad_member_lists_are_refused_by_position() {
        for (list, want) in [
            ("http://a:1,", "member 2: empty"),
            (",http://a:1", "member 1: empty"),
            ("http://a:1,,http://b:2", "member 2: empty"),
            (
                "http://a:1,https://b:2",
                "member 2: https while member 1 is http",
            ),
            (
                "http://a:1,http://a:1/",
                "member 2: http://a:1 is member 1 again",
            ),
            (
                "http://a,http://a:80",
                "member 2: http://a:80 is member 1 again",
            ),
            ("http://a:1,http://u:pw@b:x", "member 2: bad port"),
            ("http://u:pw@a:1,http://u:other@b:2", "members 1 and 2"),
            ("http://u:pw@a:1,http://u@b:2", "different credentials"),
        ] {
            let err = Endpoint::parse(list).unwrap_err();
            assert!(err.contains(want), "{list}: {err}");
            assert!(
                !err.contains("pw") && !err.contains("other"),
                "{list}: {err}"
            );
        }
    }

    #[test]
    fn password_files_and_users() {
        let dir = std::env::temp_dir().join(format!("etcdmirror-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let sec = Security {
            user: Some("root".into()),
            password_file: Some(pw.to_string_lossy().into_owned()),
            ..Security::default()
        };
        let e = Endpoint::parse("http://h:1")
            .unwrap()
            .secure(&sec, "src")
            .unwrap();
        assert_eq!(e.auth_header().as_deref(), Some("Basic cm9vdDpzM2NyZXQ="));
        assert!(!e.password_in_url);
        let no_user = Security {
            user: None,
            ..sec.clone()
        };
        let err = Endpoint::parse("http://h:1")
            .unwrap()
            .secure(&no_user, "dst")
            .unwrap_err();
        assert!(err.contains("--dst-password-file"), "{err}");
        let err = Endpoint::parse("http://u:p@h:1")
            .unwrap()
            .secure(&no_user, "src")
            .unwrap_err();
        assert!(err.contains("already holds a password"), "{err}");
        let ca = Security {
            ca_file: Some(pw.to_string_lossy().into_owned()),
            ..Security::default()
        };
        let err = Endpoint::parse("https://h:1")
            .unwrap()
            .secure(&ca, "src")
            .unwrap_err();
        assert!(
            err.contains("--src-ca-file") && err.contains("no certificate"),
            "{err}"
        );
        let err = Endpoint::parse("http://h:1")
            .unwrap()
            .secure(&ca, "src")
            .unwrap_err();
        assert!(err.contains("https://"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn percent_encode_all(s: &str) -> String {
            s.bytes().map(|b| format!("%{b:02x}")).collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn base64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
                let e = base64(&bytes);
                prop_assert_eq!(e.len(), bytes.len().div_ceil(3) * 4);
                prop_assert_eq!(unbase64(&e), Some(bytes.clone()));
                prop_assert_eq!(unbase64(e.trim_end_matches('=')), Some(bytes));
            }

            #[test]
            fn unbase64_takes_any_text_without_panicking(s in ".*") {
                let _ = unbase64(&s);
            }

            #[test]
            fn percent_decoding(s in any::<String>(), junk in any::<String>()) {
                prop_assert_eq!(percent_decode(&percent_encode_all(&s)), Ok(s.clone()));
                if !s.contains('%') {
                    prop_assert_eq!(percent_decode(&s), Ok(s));
                }
                let _ = percent_decode(&junk);
            }

            /// Whatever the URL, no panic, and the password never shows in an error or
            /// in the endpoint's Display and Debug.
            #[test]
            fn urls_never_leak_the_password(
                raw in any::<String>(),
                pw in "[^/?#]{1,12}",
                host in prop_oneof![Just("h".to_string()), Just("[::1]".to_string()), "[^@/?#]{0,8}"],
                port in prop_oneof![Just(String::new()), ":1".prop_map(String::from), ":[0-9a-z]{0,6}"],
            ) {
                let _ = Endpoint::parse(&raw);
                let secret = format!("Zq{pw}");
                let url = format!("http://u:{secret}@{host}{port}");
                match Endpoint::parse(&url) {
                    Ok(e) => {
                        prop_assert!(e.password_in_url);
                        let shown = format!("{e} {e:?}");
                        prop_assert!(!shown.contains(&secret), "{}", shown);
                        let header = e.auth_header().unwrap();
                        let creds = unbase64(header.strip_prefix("Basic ").unwrap()).unwrap();
                        let decoded = percent_decode(&secret).map(|p| format!("u:{p}"));
                        prop_assert_eq!(Ok(String::from_utf8(creds).unwrap()), decoded);
                    }
                    Err(m) => prop_assert!(!m.contains(&secret), "{}", m),
                }
            }
        }
    }
}
