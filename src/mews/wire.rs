//! JSON shapes of the Connector API calls we make, as documented.

use serde::{Deserialize, Serialize};

/// Body of `messages/add`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddMessagesRequest<'a> {
    pub client_token: &'a str,
    pub access_token: &'a str,
    pub client: &'a str,
    pub messages: &'a [OutgoingMessage<'a>],
}

/// One message to add; `identifier` is unique within the request.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct OutgoingMessage<'a> {
    pub message_thread_id: &'a str,
    pub text: &'a str,
    pub identifier: String,
}

/// Success body of `messages/add`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddMessagesResponse {
    pub messages: Vec<AddedMessageResult>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddedMessageResult {
    pub identifier: Option<String>,
    pub message: AddedMessage,
}

/// A message as Mews stored it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddedMessage {
    pub id: String,
    #[serde(default)]
    pub message_thread_id: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    pub sender: Sender,
    pub created_utc: String,
}

/// `Sender` is `{"Discriminator":"Application","Value":null}` in the current
/// documentation and a plain `"Application"` in older renderings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Sender {
    Plain(String),
    Tagged {
        #[serde(rename = "Discriminator")]
        discriminator: String,
        #[serde(rename = "Value", default)]
        value: Option<serde_json::Value>,
    },
}

impl Sender {
    /// The sender kind, e.g. `Application`.
    pub fn kind(&self) -> &str {
        match self {
            Sender::Plain(kind) => kind,
            Sender::Tagged { discriminator, .. } => discriminator,
        }
    }
}

/// Body of `messages/getAll`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetMessagesRequest<'a> {
    pub client_token: &'a str,
    pub access_token: &'a str,
    pub client: &'a str,
    pub message_thread_ids: &'a [&'a str],
    pub created_utc: TimeInterval,
    pub limitation: Limitation<'a>,
}

/// `CreatedUtc` filter: `StartUtc <= CreatedUtc < EndUtc`, at most one month.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TimeInterval {
    pub start_utc: String,
    pub end_utc: String,
}

/// Paging: at most `count` (1..=1000) messages, older than `cursor`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Limitation<'a> {
    pub count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<&'a str>,
}

/// Success body of `messages/getAll`: newest first; `Cursor` is the Id of the
/// last (oldest) message returned.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetMessagesResponse {
    pub messages: Vec<AddedMessage>,
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Body of `messageThreads/add` (`MessageThreadAddParameters`).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddThreadRequest<'a> {
    pub client_token: &'a str,
    pub access_token: &'a str,
    pub client: &'a str,
    pub original_sender: &'a str,
    pub subject: &'a str,
}

/// A message thread as Mews returns it (`MessageThread`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MessageThread {
    pub id: String,
    pub original_sender: String,
    pub subject: String,
    pub created_utc: String,
    #[serde(default)]
    pub updated_utc: Option<String>,
    #[serde(default)]
    pub is_resolved: Option<bool>,
}

/// Success body of `messageThreads/add` (`MessageThreadAddResult`) and of
/// `messageThreads/getAll` (`MessageThreadResult`: newest first, `Cursor`
/// the Id of the oldest thread returned).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MessageThreadsResponse {
    pub message_threads: Vec<MessageThread>,
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Body of `messageThreads/getAll` (`MessageThreadFilterParameters`), by
/// `CreatedUtc` only.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetThreadsRequest<'a> {
    pub client_token: &'a str,
    pub access_token: &'a str,
    pub client: &'a str,
    pub created_utc: TimeInterval,
    pub limitation: Limitation<'a>,
}

/// Error body: `{"Message": ..., "RequestId": ..., "Details": ...}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ApiError {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sender_forms_are_accepted() {
        let tagged: AddedMessage = serde_json::from_str(
            r#"{"Id":"a","Sender":{"Discriminator":"Application","Value":null},"CreatedUtc":"2022-03-09T13:19:46Z"}"#,
        )
        .unwrap();
        let plain: AddedMessage = serde_json::from_str(
            r#"{"Id":"a","Sender":"Application","CreatedUtc":"2022-03-09T13:19:46Z"}"#,
        )
        .unwrap();
        assert_eq!(tagged.sender.kind(), "Application");
        assert_eq!(plain.sender.kind(), "Application");
    }

    #[test]
    fn the_get_all_body_is_the_documented_one() {
        let threads = ["7f9325f6-ef44-4911-89a8-ae51010a5aa4"];
        let body = serde_json::to_value(GetMessagesRequest {
            client_token: "c",
            access_token: "a",
            client: "mews-outbox 0.1.0",
            message_thread_ids: &threads,
            created_utc: TimeInterval {
                start_utc: "2026-11-28T07:00:00Z".into(),
                end_utc: "2026-11-28T08:00:00Z".into(),
            },
            limitation: Limitation {
                count: 1000,
                cursor: None,
            },
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "ClientToken": "c", "AccessToken": "a", "Client": "mews-outbox 0.1.0",
                "MessageThreadIds": ["7f9325f6-ef44-4911-89a8-ae51010a5aa4"],
                "CreatedUtc": {"StartUtc": "2026-11-28T07:00:00Z", "EndUtc": "2026-11-28T08:00:00Z"},
                "Limitation": {"Count": 1000}
            })
        );
    }

    #[test]
    fn the_thread_add_body_is_the_documented_one() {
        let body = serde_json::to_value(AddThreadRequest {
            client_token: "c",
            access_token: "a",
            client: "mews-outbox 0.1.0",
            original_sender: "John Doe",
            subject: "Example subject",
        })
        .unwrap();
        // MessageThreadAddParameters: exactly these properties
        // (additionalProperties: false), all required.
        assert_eq!(
            body,
            serde_json::json!({
                "ClientToken": "c", "AccessToken": "a", "Client": "mews-outbox 0.1.0",
                "OriginalSender": "John Doe", "Subject": "Example subject"
            })
        );
    }

    #[test]
    fn the_thread_get_all_body_is_the_documented_one() {
        let body = serde_json::to_value(GetThreadsRequest {
            client_token: "c",
            access_token: "a",
            client: "mews-outbox 0.1.0",
            created_utc: TimeInterval {
                start_utc: "2022-03-03T00:00:00Z".into(),
                end_utc: "2022-03-14T00:00:00Z".into(),
            },
            limitation: Limitation {
                count: 10,
                cursor: Some("e7f26210-10e7-462e-9da8-ae8300be8ab7"),
            },
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "ClientToken": "c", "AccessToken": "a", "Client": "mews-outbox 0.1.0",
                "CreatedUtc": {"StartUtc": "2022-03-03T00:00:00Z", "EndUtc": "2022-03-14T00:00:00Z"},
                "Limitation": {"Cursor": "e7f26210-10e7-462e-9da8-ae8300be8ab7", "Count": 10}
            })
        );
    }

    #[test]
    fn the_documented_thread_responses_are_read() {
        // The examples of the fragment, verbatim.
        let added: MessageThreadsResponse = serde_json::from_str(
            r#"{"MessageThreads":[{"Id":"7f9325f6-ef44-4911-89a8-ae51010a5aa4","OriginalSender":"John Doe","Subject":"Example subject","CreatedUtc":"2022-03-08T12:06:50Z","UpdatedUtc":"2022-03-08T12:06:50Z","IsResolved":false}]}"#,
        )
        .unwrap();
        assert_eq!(
            added.message_threads[0].id,
            "7f9325f6-ef44-4911-89a8-ae51010a5aa4"
        );
        assert_eq!(added.message_threads[0].created_utc, "2022-03-08T12:06:50Z");
        assert_eq!(added.cursor, None);
        let page: MessageThreadsResponse = serde_json::from_str(
            r#"{"MessageThreads":[{"Id":"7f9325f6-ef44-4911-89a8-ae51010a5aa4","OriginalSender":"John Doe","Subject":"Example subject","CreatedUtc":"2022-03-07T16:09:45Z","UpdatedUtc":"2022-03-07T16:09:45Z"}],"Cursor":"7f9325f6-ef44-4911-89a8-ae51010a5aa4"}"#,
        )
        .unwrap();
        assert_eq!(page.message_threads[0].subject, "Example subject");
        assert_eq!(page.message_threads[0].original_sender, "John Doe");
        assert_eq!(
            page.cursor.as_deref(),
            Some("7f9325f6-ef44-4911-89a8-ae51010a5aa4")
        );
    }

    #[test]
    fn the_request_body_is_the_documented_one() {
        let messages = [OutgoingMessage {
            message_thread_id: "7f9325f6-ef44-4911-89a8-ae51010a5aa4",
            text: "Hello",
            identifier: "42".into(),
        }];
        let body = serde_json::to_value(AddMessagesRequest {
            client_token: "c",
            access_token: "a",
            client: "mews-outbox 0.1.0",
            messages: &messages,
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "ClientToken": "c", "AccessToken": "a", "Client": "mews-outbox 0.1.0",
                "Messages": [{"MessageThreadId": "7f9325f6-ef44-4911-89a8-ae51010a5aa4",
                              "Text": "Hello", "Identifier": "42"}]
            })
        );
    }
}
