//! `server.admin_prefix`: the path prefix under which runcache serves its own routes (admin,
//! events, operations, docs, dashboard), so that a gateway leaves the origin's paths (its own
//! `/health`, say) to the origin. Empty by default: the routes are where SPEC section 1 puts
//! them.

/// runcache's own routes, relative to the prefix (`*` ends a prefix of paths): what no view
/// may take, and what moves under `server.admin_prefix`.
pub const OWN_PATHS: [&str; 9] = [
    "/cache/*",
    "/events/*",
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    "/docs*",
    "/dashboard*",
    "/api/v1/models/cache/*",
];

/// A checked `server.admin_prefix`: empty, or `/` and segments of `[A-Za-z0-9._~-]`, no
/// trailing `/`, no empty, `.` or `..` segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminPrefix(String);

impl AdminPrefix {
    /// Checks `raw`; the error says what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Ok(Self::default());
        }
        if !raw.starts_with('/') {
            return Err("must start with '/' (or be empty)".into());
        }
        if raw.ends_with('/') {
            return Err("must not end with '/'".into());
        }
        if raw.len() > 128 {
            return Err("must be at most 128 characters".into());
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-' | b'/'))
        {
            return Err("may hold only A-Z, a-z, 0-9, '.', '_', '~', '-' and '/'".into());
        }
        if raw[1..]
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err("must not contain '//' or a '.' or '..' segment".into());
        }
        Ok(Self(raw.to_owned()))
    }

    /// The prefix (`""` when unset).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether no prefix is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where runcache serves its route `path` (`/health` → `/_runcache/health`).
    pub fn join(&self, path: &str) -> String {
        let mut out = String::with_capacity(self.0.len() + path.len());
        out.push_str(&self.0);
        out.push_str(path);
        out
    }

    /// `path` as runcache's routes see it, when it is under the prefix (any path, when no
    /// prefix is set): `/_runcache/health` → `/health`.
    pub fn strip<'a>(&self, path: &'a str) -> Option<&'a str> {
        if self.0.is_empty() {
            return Some(path);
        }
        match path.strip_prefix(self.0.as_str()) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => Some(rest),
            _ => None,
        }
    }

    /// Whether `path` is runcache's own: under the prefix when one is set, else one of
    /// [`OWN_PATHS`] (`/docs*` being `/docs` and what is under it, not `/docsearch`).
    pub fn owns(&self, path: &str) -> bool {
        if !self.0.is_empty() {
            return self.strip(path).is_some();
        }
        OWN_PATHS.iter().any(|own| match own.strip_suffix('*') {
            Some(dir) if dir.ends_with('/') => path.starts_with(dir),
            Some(page) => path
                .strip_prefix(page)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            None => path == *own,
        })
    }

    /// The paths no view may take (`*` ending a prefix): [`OWN_PATHS`], or everything under
    /// the prefix.
    pub fn reserved(&self) -> Vec<String> {
        if self.0.is_empty() {
            OWN_PATHS.iter().map(|p| (*p).to_owned()).collect()
        } else {
            vec![self.0.clone(), self.join("/*")]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_checked() {
        for ok in ["", "/_runcache", "/a/b-c.d~e_f", "/x1"] {
            assert!(AdminPrefix::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "_runcache",
            "/",
            "/a/",
            "//a",
            "/a//b",
            "/a b",
            "/a?b",
            "/a%20",
            "/./a",
            "/a/..",
        ] {
            assert!(AdminPrefix::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_under_the_prefix_are_runcache_s() {
        let p = AdminPrefix::parse("/_runcache").expect("prefix");
        assert_eq!(p.strip("/_runcache/health"), Some("/health"));
        assert_eq!(p.strip("/_runcache"), Some(""));
        assert_eq!(p.strip("/_runcachex/health"), None);
        assert_eq!(p.strip("/health"), None);
        assert!(p.owns("/_runcache/cache/stats") && !p.owns("/cache/stats"));
        assert_eq!(p.join("/health"), "/_runcache/health");
        let none = AdminPrefix::default();
        assert_eq!(none.strip("/health"), Some("/health"));
        assert!(none.owns("/health") && none.owns("/cache/stats") && none.owns("/docs/"));
        assert!(none.owns("/dashboard") && none.owns("/dashboard/assets/dashboard.js"));
        assert!(!none.owns("/api/v1/models/train/1") && !none.owns("/docsearch"));
        assert!(!none.owns("/healthz") && !none.owns("/cache"));
    }
}
