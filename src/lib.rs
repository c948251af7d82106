//! runcache: an HTTP cache in front of an ML platform's model-run views, backed by Redis,
//! falling back to a bounded in-process store, invalidated by training events.
//!
//! Reading order, following the layers (each depends only on those after it):
//! [`config`] → [`startup`] → [`http`] → [`serve`] → [`invalidation`] → [`store`] →
//! [`domain`], with [`origin`], [`security`], [`metrics`] and [`tasks`] beside them.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod invalidation;
pub mod metrics;
pub mod origin;
pub mod sample_origin;
pub mod security;
pub mod serve;
pub mod shutdown;
pub mod startup;
pub mod state;
pub mod store;
pub mod tasks;
pub mod telemetry;

pub use http::build_app;
pub use startup::Application;
pub use state::AppState;
