//! runcache: an HTTP cache in front of an ML platform's model-run views, backed by Redis,
//! falling back to a bounded in-process store, invalidated by training events.
//!
//! Reading order: [`config`] → [`startup`] → [`http`] → [`cache`] → [`origin`] →
//! [`invalidation`] → [`metrics`].
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod invalidation;
pub mod metrics;
pub mod origin;
pub mod sample_origin;
pub mod shutdown;
pub mod startup;
pub mod state;
pub mod telemetry;

pub use http::build_app;
pub use startup::Application;
pub use state::AppState;
