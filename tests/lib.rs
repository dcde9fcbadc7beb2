//! kiln-e2e: the end-to-end tests of the per-service binaries (in `tests/`), and the
//! pieces of test kit that more than one test suite uses, so they are written once:
//!
//! - [`tools`]: finding a tool the tests need (`.tools/bin`, then `PATH`) or saying, in
//!   one printed line, that the test skips without it;
//! - [`promtool`]: `promtool check metrics` on an exposition, with the one report that
//!   OpenMetrics expositions always draw accepted;
//! - [`envoy`]: Envoy sidecars doing mTLS in front of a service in mesh mode;
//! - [`services`]: the per-service binaries started from a test PKI, as pods.

#[path = "kit/envoy.rs"]
pub mod envoy;
#[path = "kit/promtool.rs"]
pub mod promtool;
#[path = "kit/services.rs"]
pub mod services;
#[path = "kit/tools.rs"]
pub mod tools;
