//! What the integration tests share: the daemon harness (`daemon`) and the
//! fake Mews Connector API (`fake_mews`).
pub mod daemon;
pub mod fake_mews;
