//! How many bytes a `messages/add` request takes, and packing claimed rows
//! into requests no larger than `delivery.max_request_bytes`, as pure
//! functions. The claim already bounds a batch by its raw text bytes; JSON
//! escaping can make the body larger, so the real size is counted here.

use crate::store::{ClaimedRow, RowOutcome};

/// Bytes `s` takes as a JSON string the way `serde_json` writes it, quotes
/// included: `"` `\` and the short control escapes take 2 bytes, other
/// control characters `\u00XX` 6, everything else (UTF-8 included) itself.
pub fn json_string_bytes(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Bytes of one item of `Messages` for `row`, as sent (see
/// `mews::wire::OutgoingMessage`).
pub fn message_bytes(row: &ClaimedRow) -> usize {
    r#"{"MessageThreadId":,"Text":,"Identifier":}"#.len()
        + json_string_bytes(&row.message_thread_id)
        + json_string_bytes(row.text.as_deref().unwrap_or_default())
        + json_string_bytes(&row.id.to_string())
}

/// Rows packed into requests, and the rows no request can carry.
#[derive(Debug, Default)]
pub struct Packed {
    /// Requests to send, in claim order, each at most the bound.
    pub requests: Vec<Vec<ClaimedRow>>,
    /// Rows whose message alone makes a request larger than the bound: dead.
    pub oversize: Vec<(i64, RowOutcome)>,
}

/// Packs `rows` (in order) into requests of at most `max_request_bytes`,
/// where an empty request takes `envelope_bytes` (tokens, client name,
/// `"Messages":[]`).
pub fn pack(rows: Vec<ClaimedRow>, envelope_bytes: usize, max_request_bytes: usize) -> Packed {
    let mut packed = Packed::default();
    let mut current: Vec<ClaimedRow> = Vec::new();
    let mut current_bytes = envelope_bytes;
    for row in rows {
        let bytes = message_bytes(&row);
        if envelope_bytes + bytes > max_request_bytes {
            packed.oversize.push((
                row.id,
                RowOutcome::Dead {
                    error: format!(
                        "message too large: {bytes} bytes as JSON, and a request carrying it \
                         alone would be {} bytes, over delivery.max_request_bytes = \
                         {max_request_bytes}; split the text into several rows, or raise \
                         delivery.max_request_bytes and requeue it (mews-outbox dead requeue --id {})",
                        envelope_bytes + bytes,
                        row.id
                    ),
                },
            ));
            continue;
        }
        // Items after the first are preceded by a comma.
        let comma = usize::from(!current.is_empty());
        if current_bytes + comma + bytes > max_request_bytes {
            packed.requests.push(std::mem::take(&mut current));
            current_bytes = envelope_bytes;
        }
        current_bytes += usize::from(!current.is_empty()) + bytes;
        current.push(row);
    }
    if !current.is_empty() {
        packed.requests.push(current);
    }
    packed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mews::OutgoingMessage;

    fn row(id: i64, text: &str) -> ClaimedRow {
        let mut r = crate::store::test_rows(id..=id).remove(0);
        r.text = Ok(text.to_owned());
        r
    }

    fn serialised(rows: &[ClaimedRow]) -> usize {
        let messages: Vec<OutgoingMessage<'_>> = rows
            .iter()
            .map(|r| OutgoingMessage {
                message_thread_id: &r.message_thread_id,
                text: r.text.as_deref().unwrap(),
                identifier: r.id.to_string(),
            })
            .collect();
        serde_json::to_vec(&messages).unwrap().len()
    }

    #[test]
    fn the_counted_size_is_the_serialised_size() {
        let texts = [
            "hello",
            "quote \" backslash \\ slash /",
            "\n\r\t\u{8}\u{c}",
            "\u{0}\u{1}\u{1f}\u{7f}",
            "čaj ☕ 𝄞 \u{a0}\u{2028}",
            "",
        ];
        for (i, text) in texts.iter().enumerate() {
            let r = row(i64::try_from(i).unwrap() * 1_000_003, text);
            // A one-item array is the item plus its brackets.
            assert_eq!(message_bytes(&r) + 2, serialised(&[r]), "{text:?}");
        }
    }

    #[test]
    fn requests_are_packed_in_order_up_to_the_bound_and_oversize_rows_are_dead() {
        let envelope = 100;
        let rows: Vec<_> = [10, 10, 10, 500, 10]
            .iter()
            .enumerate()
            .map(|(i, n)| row(i64::try_from(i).unwrap() + 1, &"x".repeat(*n)))
            .collect();
        let one = message_bytes(&rows[0]);
        // Room for exactly two small messages.
        let bound = envelope + 2 * one + 1;
        let packed = pack(rows.clone(), envelope, bound);
        let ids: Vec<Vec<i64>> = packed
            .requests
            .iter()
            .map(|b| b.iter().map(|r| r.id).collect())
            .collect();
        assert_eq!(ids, [vec![1, 2], vec![3, 5]]);
        for request in &packed.requests {
            // The envelope's "[]" is already counted in `envelope`.
            assert!(envelope + serialised(request) - 2 <= bound);
        }
        assert_eq!(packed.oversize.len(), 1);
        let (id, RowOutcome::Dead { error }) = &packed.oversize[0] else {
            panic!("{:?}", packed.oversize)
        };
        assert_eq!(*id, 4);
        let alone = envelope + message_bytes(&rows[3]);
        assert!(
            error.contains(&format!("{alone} bytes"))
                && error.contains(&format!("delivery.max_request_bytes = {bound}")),
            "{error}"
        );
    }
}
