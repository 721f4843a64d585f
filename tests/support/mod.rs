#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
pub mod daemon;
pub mod fake_mews;
pub mod postgres;
