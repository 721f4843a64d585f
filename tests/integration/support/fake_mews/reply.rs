//! What a route decided to answer ([`Reply`]) and how it becomes an HTTP
//! response with `Request-Id` and `Date`.

use std::time::SystemTime;

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// What the handler decided to answer.
pub(super) enum Reply {
    Json(StatusCode, Value),
    Error {
        status: StatusCode,
        message: String,
        retry_after: Option<String>,
    },
    Raw {
        status: StatusCode,
        content_type: String,
        body: Vec<u8>,
    },
    /// A 3xx with a `Location` header.
    Redirect {
        status: StatusCode,
        location: String,
    },
    /// A `200` whose body stalled and whose connection was then shut down
    /// (by the handler, through [`ConnHandle::write_raw`]).
    Stalled,
    /// The connection was shut down; whatever is returned is never received.
    Dropped,
}

impl Reply {
    pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        Reply::Error {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Reply {
        Reply::error(StatusCode::BAD_REQUEST, message)
    }

    /// The `Retry-After` header this reply carries.
    pub(super) fn retry_after(&self) -> Option<&str> {
        match self {
            Reply::Error { retry_after, .. } => retry_after.as_deref(),
            _ => None,
        }
    }

    /// Status recorded in [`RequestRecord::status`].
    pub(super) fn status_code(&self) -> u16 {
        match self {
            Reply::Json(s, _)
            | Reply::Error { status: s, .. }
            | Reply::Raw { status: s, .. }
            | Reply::Redirect { status: s, .. } => s.as_u16(),
            Reply::Stalled => 200,
            Reply::Dropped => 0,
        }
    }

    pub(super) fn into_response(self, request_id: &str, date: SystemTime) -> Response {
        let mut response = match self {
            Reply::Json(status, body) => (status, axum::Json(body)).into_response(),
            Reply::Error {
                status,
                message,
                retry_after,
            } => {
                let body = json!({"Message": message, "RequestId": request_id, "Details": null});
                let mut response = (status, axum::Json(body)).into_response();
                if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    response.headers_mut().insert(header::RETRY_AFTER, v);
                }
                response
            }
            Reply::Raw {
                status,
                content_type,
                body,
            } => {
                let mut response = (status, body).into_response();
                response.headers_mut().remove(header::CONTENT_TYPE);
                if let Ok(v) = HeaderValue::from_str(&content_type)
                    && !content_type.is_empty()
                {
                    response.headers_mut().insert(header::CONTENT_TYPE, v);
                }
                response
            }
            Reply::Redirect { status, location } => {
                let mut response = status.into_response();
                if let Ok(v) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, v);
                }
                response
            }
            Reply::Stalled | Reply::Dropped => {
                let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
        };
        if let Ok(v) = HeaderValue::from_str(request_id) {
            response
                .headers_mut()
                .insert(HeaderName::from_static("request-id"), v);
        }
        // Set explicitly: hyper's own `Date` follows the real clock.
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(date)) {
            response.headers_mut().insert(header::DATE, v);
        }
        response
    }
}

pub(super) fn status_or_500(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
