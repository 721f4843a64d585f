//! `POST configuration/get`: the harmless token check.

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::super::connections::ConnHandle;
use super::super::reply::Reply;
use super::super::state::Shared;
use super::super::{FAKE_ENTERPRISE_ID, RequestRecord};
use super::{Route, open};

/// `POST configuration/get`: `200` with a fake enterprise when the tokens are
/// valid.
///
/// Only `Status` and `Redirect` faults mean something here; any other is
/// consumed and ignored.
pub(super) async fn configuration(
    shared: &Shared,
    conn: &ConnHandle,
    json: Option<&Value>,
    record: &mut RequestRecord,
) -> Reply {
    if let Err(reply) = open(Route::Configuration, shared, conn, json, record).await {
        return reply;
    }
    Reply::Json(
        StatusCode::OK,
        json!({
            "NowUtc": humantime::format_rfc3339_seconds(shared.now()).to_string(),
            "Enterprise": {"Id": FAKE_ENTERPRISE_ID, "Name": "Fake Hotel"},
        }),
    )
}
