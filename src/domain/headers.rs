//! Which origin headers end at runcache, shared by the origin client (what reaches a client)
//! and the configuration (what an entry may keep).

/// Hop-by-hop headers (RFC 9110 section 7.6.1), which end at runcache. Every `Proxy-*`
/// header does too (see [`is_hop_by_hop`]).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Headers runcache sets itself on every view answer (or that describe the origin's own
/// connection and server, which nginx's `proxy_pass` drops too): the origin's copy would
/// contradict or duplicate them.
const SET_BY_RUNCACHE: [&str; 9] = [
    "content-length",
    "content-type",
    "etag",
    "age",
    "date",
    "server",
    "x-cache",
    "cache-status",
    "x-request-id",
];

/// Whether `name` (lower case) is hop-by-hop.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name) || name.starts_with("proxy-")
}

/// Whether runcache sets `name` (lower case) itself.
pub fn is_set_by_runcache(name: &str) -> bool {
    SET_BY_RUNCACHE.contains(&name)
}
