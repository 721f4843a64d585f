//! The trigger-kept `outbox_thread_head` table always equals its definition
//! (each thread's oldest unfinished row), whatever producers, the daemon and
//! operators do to `outbox`: random sequences of inserts, status changes,
//! reschedules, account and thread corrections and deletes, checked after
//! every step against the definition computed from scratch. Rows may name
//! their thread by `thread_key` (migration `..07_threads`): such a row's
//! thread is its *effective* thread, `coalesce(message_thread_id,
//! keyed_thread_id)`, and it has none (no head, blocks nothing) until its
//! key's thread is created, as the daemon's statement does it.

use std::path::Path;
use std::time::Duration;

use mews_outbox::store::SqliteStore;
use proptest::prelude::*;

const THREADS: [&str; 3] = [
    "7f9325f6-ef44-4911-89a8-ae51010a5aa4",
    "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11",
    "3fa85f64-5717-4562-b3fc-2c963f66afa6",
];
const STATUSES: [&str; 4] = ["pending", "sending", "delivered", "dead"];
const ACCOUNTS: [&str; 2] = ["default", "other"];
/// Thread keys of `outbox_threads`; key `k` is created as Mews thread
/// `THREADS[k]`, so keyed rows share threads with rows named by id.
const KEYS: [&str; 2] = ["booking-1", "booking-2"];

#[derive(Debug, Clone)]
enum Op {
    Insert {
        thread: usize,
        account: usize,
    },
    InsertWithStatus {
        thread: usize,
        status: usize,
    },
    SetStatus {
        row: usize,
        status: usize,
    },
    Reschedule {
        row: usize,
        seconds: u32,
    },
    SetAccount {
        row: usize,
        account: usize,
    },
    MoveThread {
        row: usize,
        thread: usize,
    },
    Delete {
        row: usize,
    },
    /// A producer's message naming its thread by key.
    InsertKeyed {
        key: usize,
        account: usize,
    },
    /// The daemon records the key's thread (of `account`) created, with
    /// its statement for the waiting rows.
    CreateThread {
        key: usize,
        account: usize,
    },
    /// An operator's correction of a keyed row's thread (`None`: back to waiting).
    SetKeyedThread {
        row: usize,
        thread: Option<usize>,
    },
    /// The daemon's claim statement.
    Claim {
        account: usize,
        limit: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..2usize).prop_map(|(thread, account)| Op::Insert { thread, account }),
        1 => (0..3usize, 0..4usize).prop_map(|(thread, status)| Op::InsertWithStatus { thread, status }),
        4 => (0..64usize, 0..4usize).prop_map(|(row, status)| Op::SetStatus { row, status }),
        1 => (0..64usize, 0..100u32).prop_map(|(row, seconds)| Op::Reschedule { row, seconds }),
        1 => (0..64usize, 0..2usize).prop_map(|(row, account)| Op::SetAccount { row, account }),
        1 => (0..64usize, 0..3usize).prop_map(|(row, thread)| Op::MoveThread { row, thread }),
        1 => (0..64usize).prop_map(|row| Op::Delete { row }),
        2 => (0..2usize, 1..4u8).prop_map(|(account, limit)| Op::Claim { account, limit }),
        3 => (0..2usize, 0..2usize).prop_map(|(key, account)| Op::InsertKeyed { key, account }),
        1 => (0..2usize, 0..2usize).prop_map(|(key, account)| Op::CreateThread { key, account }),
        1 => (0..64usize, prop::option::of(0..3usize)).prop_map(|(row, thread)| Op::SetKeyedThread { row, thread }),
    ]
}

/// A database with the daemon's schema, made once and copied per case.
fn template() -> &'static Path {
    static TEMPLATE: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("template.db");
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let store = SqliteStore::open(&path, Duration::from_secs(5))
                    .await
                    .unwrap();
                store.close().await;
            });
            dir
        })
        .path()
}

fn heads(conn: &rusqlite::Connection, sql: &str) -> Vec<(String, i64, String, Option<String>)> {
    conn.prepare(sql)
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

const KEPT: &str = "SELECT message_thread_id, head_id, account, ready_at
                    FROM outbox_thread_head ORDER BY message_thread_id";
const DEFINITION: &str = "
    SELECT coalesce(o.message_thread_id, o.keyed_thread_id) AS thread, o.id, o.account,
           CASE WHEN o.status = 'pending' THEN o.next_attempt_at END
    FROM outbox AS o
    WHERE o.id = (SELECT min(e.id) FROM outbox AS e
                  WHERE coalesce(e.message_thread_id, e.keyed_thread_id)
                            = coalesce(o.message_thread_id, o.keyed_thread_id)
                    AND e.status IN ('pending', 'sending'))
    ORDER BY thread";

/// The id of the `n`-th row (modulo the row count), if any row exists.
fn nth_row(conn: &rusqlite::Connection, n: usize) -> Option<i64> {
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM outbox ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    (!ids.is_empty()).then(|| ids[n % ids.len()])
}

fn apply(conn: &rusqlite::Connection, op: &Op) {
    let insert =
        "INSERT INTO outbox (message_thread_id, text, account, status) VALUES (?1, 'x', ?2, ?3)";
    match *op {
        Op::Insert { thread, account } => {
            conn.execute(insert, (THREADS[thread], ACCOUNTS[account], "pending"))
                .unwrap();
        }
        Op::InsertWithStatus { thread, status } => {
            // A producer may not insert daemon columns (migration
            // ..06_producer_contract): inserted pending, then set.
            conn.execute(insert, (THREADS[thread], ACCOUNTS[0], "pending"))
                .unwrap();
            conn.execute(
                "UPDATE outbox SET status = ?1 WHERE id = last_insert_rowid()",
                [STATUSES[status]],
            )
            .unwrap();
        }
        Op::SetStatus { row, status } => {
            if let Some(id) = nth_row(conn, row) {
                conn.execute(
                    "UPDATE outbox SET status = ?2 WHERE id = ?1",
                    (id, STATUSES[status]),
                )
                .unwrap();
            }
        }
        Op::Reschedule { row, seconds } => {
            if let Some(id) = nth_row(conn, row) {
                conn.execute(
                    "UPDATE outbox SET next_attempt_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2 || ' seconds') WHERE id = ?1",
                    (id, seconds),
                )
                .unwrap();
            }
        }
        Op::SetAccount { row, account } => {
            if let Some(id) = nth_row(conn, row) {
                conn.execute(
                    "UPDATE outbox SET account = ?2 WHERE id = ?1",
                    (id, ACCOUNTS[account]),
                )
                .unwrap();
            }
        }
        Op::MoveThread { row, thread } => {
            if let Some(id) = nth_row(conn, row) {
                conn.execute(
                    "UPDATE outbox SET message_thread_id = ?2 WHERE id = ?1 AND thread_key IS NULL",
                    (id, THREADS[thread]),
                )
                .unwrap();
            }
        }
        Op::Delete { row } => {
            if let Some(id) = nth_row(conn, row) {
                conn.execute("DELETE FROM outbox WHERE id = ?1", [id])
                    .unwrap();
            }
        }
        Op::InsertKeyed { key, account } => {
            conn.execute(
                "INSERT INTO outbox (thread_key, text, account) VALUES (?1, 'x', ?2)",
                (KEYS[key], ACCOUNTS[account]),
            )
            .unwrap();
        }
        Op::CreateThread { key, account } => {
            conn.execute(
                "INSERT INTO outbox_threads (account, thread_key, subject, original_sender)
                 VALUES (?1, ?2, 's', 'o') ON CONFLICT (account, thread_key) DO NOTHING",
                (ACCOUNTS[account], KEYS[key]),
            )
            .unwrap();
            let changed = conn
                .execute(
                    "UPDATE outbox_threads SET status = 'created', mews_thread_id = ?3
                     WHERE account = ?1 AND thread_key = ?2 AND status <> 'created'",
                    (ACCOUNTS[account], KEYS[key], THREADS[key]),
                )
                .unwrap();
            if changed == 1 {
                conn.execute(
                    mews_outbox::store::sqlite::sql::RESOLVE_WAITING,
                    (ACCOUNTS[account], KEYS[key], THREADS[key], "held: ", "none"),
                )
                .unwrap();
            }
        }
        Op::SetKeyedThread { row, thread } => {
            if let Some(id) = nth_row(conn, row) {
                conn.execute(
                    "UPDATE outbox SET keyed_thread_id = ?2 WHERE id = ?1 AND thread_key IS NOT NULL",
                    (id, thread.map(|t| THREADS[t])),
                )
                .unwrap();
            }
        }
        Op::Claim { account, limit } => {
            let claimed: Vec<(i64, String)> = conn
                .prepare(mews_outbox::store::sqlite::sql::CLAIM)
                .unwrap()
                .query_map(
                    (
                        ACCOUNTS[account],
                        "9999-12-31T00:00:00.000Z",
                        limit,
                        i64::MAX,
                    ),
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for (id, thread) in claimed {
                let earlier: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM outbox
                         WHERE coalesce(message_thread_id, keyed_thread_id) = ?1 AND id < ?2
                           AND status IN ('pending', 'sending')",
                        (&thread, id),
                        |r| r.get(0),
                    )
                    .unwrap();
                assert_eq!(
                    earlier, 0,
                    "claimed row {id} has an unfinished row before it"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_heads_table_always_equals_its_definition(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("o.db");
        std::fs::copy(template().join("template.db"), &db).unwrap();
        let conn = rusqlite::Connection::open(&db).unwrap();
        for (step, op) in ops.iter().enumerate() {
            apply(&conn, op);
            prop_assert_eq!(
                heads(&conn, KEPT),
                heads(&conn, DEFINITION),
                "after step {} ({:?})", step, op
            );
        }
    }
}
