//! Any status, `Retry-After` header and body Mews (or a proxy in front of
//! it) could send must map to exactly one outcome without panicking.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mews_outbox::mews::{Outcome, classify};
use mews_outbox::retry::{MAX_RETRY_AFTER, parse_retry_after};

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<3>() else {
        return;
    };
    let status = 100 + u16::from_le_bytes([head[0], head[1]]) % 500;
    let header_len = usize::from(head[2]).min(body.len());
    let (header, body) = body.split_at(header_len);
    let header = std::str::from_utf8(header).ok();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);

    let outcome = classify(status, header, body, now);
    if status != 200 {
        assert!(!matches!(outcome, Outcome::Accepted { .. }));
    }
    if let Some(value) = header
        && let Some(wait) = parse_retry_after(value, now)
    {
        assert!(wait <= MAX_RETRY_AFTER);
    }
});
