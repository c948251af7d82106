//! Integration tests: one binary, one file per feature, real Redis and a real origin.
#![allow(unreachable_pub, missing_docs)]

mod access;
mod admin;
mod cluster;
mod cluster_consistency;
mod dashboard;
mod edges;
mod events;
mod fallback;
mod freshness;
mod grafana;
mod headers;
mod helpers;
mod jwt;
mod lane;
mod managed;
mod near;
mod ops;
mod regressions;
mod resilience;
mod security;
mod sentinel;
mod snapshots;
mod stream;
mod views;
