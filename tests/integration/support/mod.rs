//! What the integration tests share: the daemon harness (`daemon`), the
//! fake Mews Connector API (`fake_mews`) and a throwaway PostgreSQL
//! (`postgres`).
pub mod daemon;
pub mod fake_mews;
pub mod postgres;
