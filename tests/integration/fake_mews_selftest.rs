//! Tests of the fake Mews server itself (`support::fake_mews`), over
//! real HTTP with reqwest, the client the daemon uses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::support::fake_mews::{
    ADD_PATH, CONFIGURATION_PATH, FAKE_ENTERPRISE_ID, FakeMews, FakeOptions, Fault, GET_ALL_PATH,
    RetryAfter,
};
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(5);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn thread() -> Uuid {
    Uuid::parse_str("7f9325f6-ef44-4911-89a8-ae51010a5aa4").unwrap()
}

/// The tokens the tests below post with.
const TOKENS: [&str; 3] = ["access", "other", "fresh"];

/// Registers [`thread`] as created by this client with each of [`TOKENS`].
fn own(fake: &FakeMews) {
    for token in TOKENS {
        fake.register_threads(token, [thread().to_string()]);
    }
}

/// A fake with default options that owns [`thread`] for [`TOKENS`].
async fn start() -> FakeMews {
    start_with(FakeOptions::default()).await
}

/// A fake with `opts` that owns [`thread`] for [`TOKENS`].
async fn start_with(opts: FakeOptions) -> FakeMews {
    let fake = FakeMews::start_with(opts).await;
    own(&fake);
    fake
}

/// A valid messages/add body with one message per (identifier, text).
fn add_body(messages: &[(Option<&str>, &str)]) -> Value {
    add_body_with_token("access", messages)
}

fn add_body_with_token(access: &str, messages: &[(Option<&str>, &str)]) -> Value {
    let items: Vec<Value> = messages
        .iter()
        .map(|(id, text)| json!({"MessageThreadId": thread(), "Text": text, "Identifier": id}))
        .collect();
    json!({"ClientToken": "client", "AccessToken": access, "Client": "selftest 1.0", "Messages": items})
}

fn get_all_body(count: u64, cursor: Option<&str>) -> Value {
    json!({
        "ClientToken": "client", "AccessToken": "access", "Client": "selftest 1.0",
        "MessageThreadIds": [thread()],
        "Limitation": {"Count": count, "Cursor": cursor},
    })
}

struct Answer {
    status: u16,
    request_id: Option<String>,
    retry_after: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            )
        })
    }

    /// Asserts an error body whose RequestId matches the header.
    fn assert_error(&self, status: u16, message_contains: &str) {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        let message = body["Message"].as_str().unwrap();
        assert!(
            message.contains(message_contains),
            "{message:?} does not contain {message_contains:?}"
        );
        assert_eq!(body["RequestId"].as_str(), self.request_id.as_deref());
        assert_eq!(body["Details"], Value::Null);
    }
}

async fn post_raw(fake: &FakeMews, path: &str, body: Vec<u8>) -> Result<Answer, reqwest::Error> {
    let response = client()
        .post(fake.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (request_id, retry_after, content_type) = (
        header("request-id"),
        header("retry-after"),
        header("content-type"),
    );
    let status = response.status().as_u16();
    let body = response.bytes().await?.to_vec();
    assert!(request_id.is_some(), "every response carries Request-Id");
    Ok(Answer {
        status,
        request_id,
        retry_after,
        content_type,
        body,
    })
}

async fn post(fake: &FakeMews, path: &str, body: &Value) -> Answer {
    post_raw(fake, path, serde_json::to_vec(body).unwrap())
        .await
        .unwrap()
}

/// Maps Identifier -> Message of a 200 messages/add answer.
fn by_identifier(answer: &Answer) -> HashMap<Option<String>, Value> {
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()["Messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["Identifier"].as_str().map(str::to_owned),
                item["Message"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn valid_add_returns_identifiers_mapped_to_stored_messages() {
    let fake = start().await;
    let answer = post(
        &fake,
        ADD_PATH,
        &add_body(&[(Some("a"), "first"), (Some("b"), "second"), (None, "third")]),
    )
    .await;
    let items = by_identifier(&answer);
    assert_eq!(items.len(), 3);
    let accepted = fake.wait_for_accepted(3, WAIT).await;
    for m in &accepted {
        let item = &items[&m.identifier];
        assert_eq!(item["Id"], json!(m.id));
        assert_eq!(item["Text"], json!(m.text));
        assert_eq!(item["MessageThreadId"], json!(thread()));
        assert_eq!(item["CreatedUtc"], json!(m.created_utc));
        assert_eq!(
            item["Sender"],
            json!({"Discriminator": "Application", "Value": null})
        );
        assert_eq!(m.access_token, "access");
        assert!(humantime::parse_rfc3339(&m.created_utc).is_ok());
        assert_eq!(m.created_utc.len(), "2026-11-28T07:15:39Z".len());
    }
    let texts: Vec<_> = accepted.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["first", "second", "third"], "storage order");

    let requests = fake.wait_for_requests(1, WAIT).await;
    let r = &requests[0];
    assert_eq!(
        (r.path.as_str(), r.status, r.message_count),
        (ADD_PATH, 200, 3)
    );
    assert_eq!(
        (
            r.client_token.as_str(),
            r.access_token.as_str(),
            r.client.as_str()
        ),
        ("client", "access", "selftest 1.0")
    );
    assert_eq!(
        r.identifiers,
        [Some("a".to_owned()), Some("b".to_owned()), None]
    );
    assert_eq!(
        r.stored_ids,
        accepted.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    assert_eq!(r.request_id, answer.request_id.unwrap());
}

#[tokio::test]
async fn sender_as_string_and_response_order() {
    let fake = start_with(FakeOptions {
        sender_as_string: true,
        shuffle_responses: false,
        ..Default::default()
    })
    .await;
    let ids: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    let msgs: Vec<_> = ids.iter().map(|i| (Some(i.as_str()), "t")).collect();
    let answer = post(&fake, ADD_PATH, &add_body(&msgs)).await;
    let items = answer.json()["Messages"].as_array().unwrap().clone();
    assert_eq!(items[0]["Message"]["Sender"], json!("Application"));
    let order: Vec<&str> = items
        .iter()
        .map(|i| i["Identifier"].as_str().unwrap())
        .collect();
    assert_eq!(order, ids, "not shuffled when shuffle_responses is false");

    // Shuffled by default: 50 items staying in order has probability 1/50!.
    fake.update_options(|o| o.shuffle_responses = true);
    let answer = post(&fake, ADD_PATH, &add_body(&msgs)).await;
    let order: Vec<String> = answer.json()["Messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["Identifier"].as_str().unwrap().to_owned())
        .collect();
    assert_ne!(order, ids);
    let mut sorted = order.clone();
    sorted.sort_by_key(|s| s.parse::<u32>().unwrap());
    assert_eq!(sorted, ids);
}

#[tokio::test]
async fn invalid_requests_get_400_and_store_nothing() {
    let fake = start().await;
    let good = add_body(&[(Some("1"), "hello")]);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"MessageThreadId": thread(), "Text": "x", "Identifier": i.to_string()}))
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"{not json".to_vec(), "Invalid JSON"),
        ("empty body", Vec::new(), "Invalid JSON"),
        ("JSON array", b"[1,2]".to_vec(), "Invalid JSON"),
        (
            "no ClientToken",
            with(&|v| {
                v.as_object_mut().unwrap().remove("ClientToken");
            }),
            "Invalid ClientToken",
        ),
        (
            "empty AccessToken",
            with(&|v| v["AccessToken"] = json!("")),
            "Invalid AccessToken",
        ),
        (
            "Client not a string",
            with(&|v| v["Client"] = json!(5)),
            "Invalid Client",
        ),
        (
            "Messages missing",
            with(&|v| {
                v.as_object_mut().unwrap().remove("Messages");
            }),
            "Invalid Messages",
        ),
        (
            "Messages empty",
            with(&|v| v["Messages"] = json!([])),
            "Invalid Messages",
        ),
        (
            "1001 messages",
            with(&|v| v["Messages"] = json!(too_many)),
            "Invalid Messages",
        ),
        (
            "item not an object",
            with(&|v| v["Messages"] = json!(["x"])),
            "Invalid Messages[0]",
        ),
        (
            "bad thread id",
            with(&|v| v["Messages"][0]["MessageThreadId"] = json!("nope")),
            "Invalid MessageThreadId",
        ),
        (
            "empty text",
            with(&|v| v["Messages"][0]["Text"] = json!("")),
            "Invalid Text",
        ),
        (
            "missing text",
            with(&|v| {
                v["Messages"][0].as_object_mut().unwrap().remove("Text");
            }),
            "Invalid Text",
        ),
        (
            "numeric identifier",
            with(&|v| v["Messages"][0]["Identifier"] = json!(1)),
            "Invalid Identifier",
        ),
        (
            "duplicate identifiers",
            serde_json::to_vec(&add_body(&[(Some("1"), "a"), (Some("1"), "b")])).unwrap(),
            "duplicate",
        ),
    ];
    for (name, body, expected) in cases {
        let answer = post_raw(&fake, ADD_PATH, body).await.unwrap();
        assert_eq!(answer.status, 400, "{name}");
        answer.assert_error(400, expected);
    }
    // Absent and null identifiers are not duplicates; 1000 items is fine.
    let answer = post(&fake, ADD_PATH, &add_body(&[(None, "a"), (None, "b")])).await;
    assert_eq!(answer.status, 200);
    let thousand: Vec<Value> = (0..1000)
        .map(|i| json!({"MessageThreadId": thread(), "Text": format!("m{i}")}))
        .collect();
    let mut body = good.clone();
    body["Messages"] = json!(thousand);
    assert_eq!(post(&fake, ADD_PATH, &body).await.status, 200);
    assert_eq!(fake.accepted().len(), 1002);
}

#[tokio::test]
async fn unknown_tokens_get_401_unknown_paths_404() {
    let fake = start_with(FakeOptions {
        valid_tokens: Some(vec![("client".into(), "access".into())]),
        ..Default::default()
    })
    .await;
    let wrong = add_body_with_token("other", &[(Some("1"), "x")]);
    post(&fake, ADD_PATH, &wrong)
        .await
        .assert_error(401, "Invalid access token");
    assert!(fake.accepted().is_empty());
    assert_eq!(
        post(&fake, ADD_PATH, &add_body(&[(Some("1"), "x")]))
            .await
            .status,
        200
    );

    let config =
        |access: &str| json!({"ClientToken": "client", "AccessToken": access, "Client": "t"});
    let ok = post(&fake, CONFIGURATION_PATH, &config("access")).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["Enterprise"]["Id"], json!(FAKE_ENTERPRISE_ID));
    post(&fake, CONFIGURATION_PATH, &config("other"))
        .await
        .assert_error(401, "Invalid");

    post(&fake, "/api/connector/v1/messages/Add", &add_body(&[]))
        .await
        .assert_error(404, "Not found");
    let get = client().get(fake.url(ADD_PATH)).send().await.unwrap();
    assert_eq!(get.status(), 405);
    assert!(get.headers().contains_key("request-id"));

    // configuration/get and 404s are not in requests(), only in all_requests();
    // the GET to the messages/add path is (with status 405).
    let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 200, 405]);
    assert_eq!(fake.all_requests().len(), 6);
}

#[tokio::test]
async fn status_and_raw_faults_store_nothing_then_normal() {
    let fake = start().await;
    fake.script([
        Fault::status_retry_after(503, "7"),
        Fault::Status {
            code: 408,
            retry_after: None,
            message: "too heavy".into(),
        },
        Fault::raw(200, "text/html", "<html>maintenance</html>"),
        Fault::raw(200, "application/json", "{\"Messages\":[{\"Ident"),
    ]);
    let body = add_body(&[(Some("1"), "x")]);
    let a = post(&fake, ADD_PATH, &body).await;
    a.assert_error(503, "Scripted");
    assert_eq!(a.retry_after.as_deref(), Some("7"));
    post(&fake, ADD_PATH, &body)
        .await
        .assert_error(408, "too heavy");
    let html = post(&fake, ADD_PATH, &body).await;
    assert_eq!(
        (html.status, html.content_type.as_deref()),
        (200, Some("text/html"))
    );
    assert_eq!(html.body, b"<html>maintenance</html>");
    let truncated = post(&fake, ADD_PATH, &body).await;
    assert!(serde_json::from_slice::<Value>(&truncated.body).is_err());
    assert!(fake.accepted().is_empty());
    assert_eq!(fake.pending_faults(), 0);

    assert_eq!(post(&fake, ADD_PATH, &body).await.status, 200);
    assert_eq!(fake.accepted().len(), 1);
    let faults: Vec<Option<u16>> = fake
        .requests()
        .iter()
        .map(|r| r.fault.as_ref().map(|_| r.status))
        .collect();
    assert_eq!(faults, [Some(503), Some(408), Some(200), Some(200), None]);
}

#[tokio::test]
async fn raw_fault_sends_a_10_mb_body() {
    let fake = start().await;
    fake.script([Fault::raw(200, "application/json", vec![b' '; 10 << 20])]);
    let answer = post(&fake, ADD_PATH, &add_body(&[(Some("1"), "x")])).await;
    assert_eq!(answer.body.len(), 10 << 20);
    // Debug output stays short.
    assert!(format!("{:?}", fake.requests()[0].fault).len() < 300);
}

/// Asserts that the request failed with a connection error, not a hang:
/// the client's 10 s timeout would report `is_timeout()` (no wall clock
/// needed, so a loaded machine cannot fail it).
async fn assert_dropped(fake: &FakeMews, body: &Value) {
    let err = post_raw(fake, ADD_PATH, serde_json::to_vec(body).unwrap())
        .await
        .err()
        .expect("the connection should be dropped without a response");
    assert!(!err.is_timeout(), "{err:?}");
    assert!(err.is_request(), "{err:?}");
}

#[tokio::test]
async fn drop_faults_give_a_connection_error() {
    let fake = start().await;
    fake.script([Fault::DropBeforeStore, Fault::DropAfterStore]);
    assert_dropped(&fake, &add_body(&[(Some("1"), "before")])).await;
    assert!(fake.accepted().is_empty());
    assert_dropped(&fake, &add_body(&[(Some("2"), "after")])).await;
    let accepted = fake.wait_for_accepted(1, WAIT).await;
    assert_eq!(accepted[0].text, "after");
    let requests = fake.wait_for_requests(2, WAIT).await;
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [0, 0]
    );
    assert_eq!(requests[1].stored_ids, [accepted[0].id]);

    // The same client (pooled connection) recovers on the next request.
    let http = client();
    fake.script([Fault::DropBeforeStore]);
    let url = fake.url(ADD_PATH);
    let body = add_body(&[(Some("3"), "x")]);
    assert!(http.post(&url).json(&body).send().await.is_err());
    assert_eq!(
        http.post(&url).json(&body).send().await.unwrap().status(),
        200
    );
    // Exactly one request per attempt: the client did not silently retry.
    assert_eq!(fake.requests().len(), 4);
}

#[tokio::test]
async fn ambiguous_and_mismatched_success_faults() {
    let fake = start().await;
    fake.script([
        Fault::DelayThenNormal(Duration::from_millis(200)),
        Fault::StoreThenStatus(500),
        Fault::OmitIdentifiers(1),
        Fault::ExtraIdentifier,
    ]);
    let started = Instant::now();
    let delayed = post(&fake, ADD_PATH, &add_body(&[(Some("d"), "delayed")])).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(by_identifier(&delayed).len(), 1);

    post(&fake, ADD_PATH, &add_body(&[(Some("s"), "stored")]))
        .await
        .assert_error(500, "Unexpected");
    assert_eq!(fake.accepted().len(), 2, "StoreThenStatus stores");

    let omitted = post(
        &fake,
        ADD_PATH,
        &add_body(&[(Some("o1"), "a"), (Some("o2"), "b"), (Some("o3"), "c")]),
    )
    .await;
    let items = by_identifier(&omitted);
    assert_eq!(items.len(), 2);
    assert!(
        !items.contains_key(&Some("o3".to_owned())),
        "the last one is left out"
    );
    assert_eq!(fake.accepted().len(), 5);

    let extra = post(&fake, ADD_PATH, &add_body(&[(Some("e"), "e")])).await;
    let items = by_identifier(&extra);
    assert_eq!(items.len(), 2);
    assert!(items.contains_key(&Some("e".to_owned())));
    assert_eq!(fake.accepted().len(), 6, "the extra item is not stored");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let fake = start_with(FakeOptions {
        rate_limit: Some((2, Duration::from_secs(30))),
        ..Default::default()
    })
    .await;
    let body = add_body(&[(None, "x")]);
    assert_eq!(post(&fake, ADD_PATH, &body).await.status, 200);
    // getAll counts toward the same window.
    assert_eq!(
        post(&fake, GET_ALL_PATH, &get_all_body(10, None))
            .await
            .status,
        200
    );
    let limited = post(&fake, ADD_PATH, &body).await;
    limited.assert_error(429, "Too many requests");
    let secs: u64 = limited.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((29..=30).contains(&secs), "Retry-After {secs}");
    assert_eq!(
        post(&fake, GET_ALL_PATH, &get_all_body(10, None))
            .await
            .status,
        429
    );
    assert_eq!(fake.accepted().len(), 1);

    // Another AccessToken has its own window.
    let other = add_body_with_token("other", &[(None, "y")]);
    assert_eq!(post(&fake, ADD_PATH, &other).await.status, 200);

    // A short window lets requests through again once it has passed.
    fake.set_rate_limit(Some((1, Duration::from_millis(300))));
    let fresh = add_body_with_token("fresh", &[(None, "z")]);
    assert_eq!(post(&fake, ADD_PATH, &fresh).await.status, 200);
    let limited = post(&fake, ADD_PATH, &fresh).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.retry_after.as_deref(), Some("1"));
    tokio::time::sleep(Duration::from_millis(350)).await; // let the window pass
    assert_eq!(post(&fake, ADD_PATH, &fresh).await.status, 200);

    fake.set_rate_limit(None);
    assert_eq!(post(&fake, ADD_PATH, &body).await.status, 200);
}

#[tokio::test]
async fn poison_rejects_the_whole_request() {
    let fake = start_with(FakeOptions {
        poison: Some(Arc::new(|t: &str| t.contains("BAD"))),
        ..Default::default()
    })
    .await;
    let long_bad = format!("BAD {}", "é".repeat(100));
    let answer = post(
        &fake,
        ADD_PATH,
        &add_body(&[(Some("1"), "fine"), (Some("2"), &long_bad)]),
    )
    .await;
    answer.assert_error(403, "poisoned: BAD é");
    assert!(answer.json()["Message"].as_str().unwrap().len() < 100);
    assert!(fake.accepted().is_empty());

    fake.set_poison(|t| t == "fine");
    assert_eq!(
        post(&fake, ADD_PATH, &add_body(&[(None, "fine")]))
            .await
            .status,
        403
    );
    fake.clear_poison();
    assert_eq!(
        post(&fake, ADD_PATH, &add_body(&[(None, "fine")]))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn get_all_pages_newest_first() {
    let fake = start().await;
    for i in 0..5 {
        let text = format!("m{i}");
        post(&fake, ADD_PATH, &add_body(&[(None, &text)])).await;
    }
    // Another thread and another token are not returned.
    let mut other_thread = add_body(&[(None, "other thread")]);
    let another = Uuid::new_v4();
    fake.register_threads("access", [another.to_string()]);
    other_thread["Messages"][0]["MessageThreadId"] = json!(another);
    post(&fake, ADD_PATH, &other_thread).await;
    post(
        &fake,
        ADD_PATH,
        &add_body_with_token("other", &[(None, "other token")]),
    )
    .await;

    let mut texts = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = post(&fake, GET_ALL_PATH, &get_all_body(2, cursor.as_deref())).await;
        assert_eq!(page.status, 200);
        let page = page.json();
        pages += 1;
        for m in page["Messages"].as_array().unwrap() {
            assert!(m.get("Identifier").is_none());
            texts.push(m["Text"].as_str().unwrap().to_owned());
        }
        match page["Cursor"].as_str() {
            Some(c) => {
                assert_eq!(page["Messages"][1]["Id"].as_str(), Some(c));
                cursor = Some(c.to_owned());
            }
            None => break,
        }
    }
    assert_eq!(texts, ["m4", "m3", "m2", "m1", "m0"]);
    assert_eq!(pages, 3);
    assert_eq!(fake.requests().len(), 7 + 3);

    // CreatedUtc: Start == End is an equality filter; [Start, End) otherwise.
    let created = fake.accepted()[0].created_utc.clone();
    let mut body = get_all_body(100, None);
    body["CreatedUtc"] = json!({"StartUtc": created, "EndUtc": created});
    let same_second = post(&fake, GET_ALL_PATH, &body).await.json();
    assert!(!same_second["Messages"].as_array().unwrap().is_empty());
    body["CreatedUtc"] =
        json!({"StartUtc": "2000-01-01T00:00:00Z", "EndUtc": "2000-01-02T00:00:00+01:00"});
    let none = post(&fake, GET_ALL_PATH, &body).await.json();
    assert_eq!(none["Messages"], json!([]));
    assert_eq!(none["Cursor"], Value::Null);

    // Validation.
    let mut bad = get_all_body(0, None);
    post(&fake, GET_ALL_PATH, &bad)
        .await
        .assert_error(400, "Count");
    bad = get_all_body(1, Some("not-a-uuid"));
    post(&fake, GET_ALL_PATH, &bad)
        .await
        .assert_error(400, "Cursor");
    bad = get_all_body(1, None);
    bad["MessageThreadIds"] = json!([]);
    post(&fake, GET_ALL_PATH, &bad)
        .await
        .assert_error(400, "MessageThreadIds");
    bad = get_all_body(1, None);
    bad["CreatedUtc"] =
        json!({"StartUtc": "2000-01-01T00:00:00Z", "EndUtc": "2000-03-01T00:00:00Z"});
    post(&fake, GET_ALL_PATH, &bad)
        .await
        .assert_error(400, "month");
    bad = get_all_body(1, None);
    bad.as_object_mut().unwrap().remove("Limitation");
    post(&fake, GET_ALL_PATH, &bad)
        .await
        .assert_error(400, "Limitation");
}

#[tokio::test]
async fn waits_are_event_driven() {
    let fake = Arc::new(start().await);
    let waiter = {
        let fake = Arc::clone(&fake);
        tokio::spawn(async move { fake.wait_for_accepted(2, WAIT).await.len() })
    };
    post(&fake, ADD_PATH, &add_body(&[(None, "a"), (None, "b")])).await;
    assert_eq!(waiter.await.unwrap(), 2);
}

#[tokio::test]
#[should_panic(expected = "waiting for 3 accepted messages; 1 arrived")]
async fn wait_for_accepted_panics_with_a_clear_message() {
    let fake = start().await;
    post(&fake, ADD_PATH, &add_body(&[(None, "only one")])).await;
    fake.wait_for_accepted(3, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn stop_frees_the_port_and_drop_closes_connections() {
    // Not 127.0.0.1: once freed, an ephemeral port there may be taken by a
    // parallel test's fake or connection before it is bound again. Nothing
    // else binds 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux).
    let fake = FakeMews::start_on(([127, 0, 0, 2], 0).into(), FakeOptions::default())
        .await
        .unwrap();
    own(&fake);
    let addr = fake.addr;
    let http = client();
    let body = add_body(&[(None, "x")]);
    assert_eq!(
        http.post(fake.url(ADD_PATH))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    fake.stop().await;
    // The pooled keep-alive connection was closed too.
    assert!(
        http.post(format!("http://{addr}{ADD_PATH}"))
            .json(&body)
            .send()
            .await
            .is_err()
    );

    let again = FakeMews::start_on(addr, FakeOptions::default())
        .await
        .unwrap();
    own(&again);
    assert_eq!(
        http.post(again.url(ADD_PATH))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(again.accepted().len(), 1, "a fresh fake starts empty");
}

#[tokio::test]
async fn get_all_faults_are_scripted_apart_from_add_faults() {
    let fake = start().await;
    fake.script_get_all([Fault::status(500), Fault::status_retry_after(429, "3")]);
    let add = post(&fake, ADD_PATH, &add_body(&[(Some("1"), "kept")])).await;
    assert_eq!(add.status, 200, "add faults are a separate queue");
    post(&fake, GET_ALL_PATH, &get_all_body(10, None))
        .await
        .assert_error(500, "Scripted");
    let throttled = post(&fake, GET_ALL_PATH, &get_all_body(10, None)).await;
    throttled.assert_error(429, "Scripted");
    assert_eq!(throttled.retry_after.as_deref(), Some("3"));
    let page = post(&fake, GET_ALL_PATH, &get_all_body(10, None)).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.json()["Messages"][0]["Text"], "kept");
    let faults: Vec<Option<u16>> = fake
        .requests()
        .iter()
        .map(|r| match &r.fault {
            Some(Fault::Status { code, .. }) => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(faults, [None, Some(500), Some(429), None]);
}

#[tokio::test]
async fn every_request_counts_in_the_rate_window_and_early_arrivals_are_counted() {
    let fake = start_with(FakeOptions {
        rate_limit: Some((3, Duration::from_secs(60))),
        valid_tokens: Some(vec![("client".into(), "access".into())]),
        ..FakeOptions::default()
    })
    .await;
    // A scripted failure, a 401 and a configuration/get fill the window.
    fake.script([Fault::status(500)]);
    post(&fake, ADD_PATH, &add_body(&[(Some("1"), "a")]))
        .await
        .assert_error(500, "Scripted failure 500");
    let mut wrong_client = add_body(&[(Some("2"), "b")]);
    wrong_client["ClientToken"] = json!("wrong");
    post(&fake, ADD_PATH, &wrong_client)
        .await
        .assert_error(401, "Invalid access token");
    let check = json!({"ClientToken": "client", "AccessToken": "access", "Client": "selftest 1.0"});
    assert_eq!(post(&fake, CONFIGURATION_PATH, &check).await.status, 200);
    let limited = post(&fake, GET_ALL_PATH, &get_all_body(10, None)).await;
    limited.assert_error(429, "Too many requests");
    assert_eq!(limited.retry_after.as_deref(), Some("60"));
    assert_eq!(fake.retry_after_violations(), 0);

    // Too early, on another endpoint: counted; the HTTP-date form is made
    // when the answer is.
    fake.update_options(|o| o.retry_after_as_date = true);
    let dated = post(&fake, CONFIGURATION_PATH, &check).await;
    assert_eq!(dated.status, 429);
    let at = httpdate::parse_http_date(dated.retry_after.as_deref().unwrap()).unwrap();
    assert!(at > SystemTime::now() + Duration::from_secs(55), "{at:?}");
    assert_eq!(fake.retry_after_violations(), 1);

    // Scripted faults carry either form, made at response time, and the
    // stretch of 429s answers every endpoint.
    let other = start().await;
    other.script([Fault::status_retry_at(
        503,
        RetryAfter::DateIn(Duration::from_secs(30)),
    )]);
    let answer = post(&other, ADD_PATH, &add_body(&[(Some("1"), "a")])).await;
    assert_eq!(answer.status, 503);
    let at = httpdate::parse_http_date(answer.retry_after.as_deref().unwrap()).unwrap();
    assert!(at >= SystemTime::now() + Duration::from_secs(28), "{at:?}");
    other.throttle_until(
        Instant::now() + Duration::from_secs(60),
        Some(RetryAfter::Seconds(Duration::ZERO)),
    );
    let answer = post(&other, GET_ALL_PATH, &get_all_body(10, None)).await;
    assert_eq!(
        (answer.status, answer.retry_after.as_deref()),
        (429, Some("0"))
    );
    assert_eq!(
        other.retry_after_violations(),
        1,
        "the getAll came before the 503's date"
    );
}

fn thread_add_body(access: &str, sender: &str, subject: &str) -> Value {
    json!({
        "ClientToken": "client", "AccessToken": access, "Client": "selftest 1.0",
        "OriginalSender": sender, "Subject": subject,
    })
}

fn thread_id(answer: &Answer) -> Uuid {
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let threads = answer.json()["MessageThreads"].as_array().unwrap().clone();
    assert_eq!(threads.len(), 1);
    Uuid::parse_str(threads[0]["Id"].as_str().unwrap()).unwrap()
}

fn add_to(access: &str, threads: &[Uuid]) -> Value {
    let items: Vec<Value> = threads
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"MessageThreadId": t, "Text": format!("to {t}"), "Identifier": i.to_string()}))
        .collect();
    json!({"ClientToken": "client", "AccessToken": access, "Client": "selftest 1.0", "Messages": items})
}

#[tokio::test]
async fn only_threads_created_with_the_token_take_messages_and_a_request_is_judged_whole() {
    use crate::support::fake_mews::THREADS_ADD_PATH;
    let fake = FakeMews::start().await; // owns nothing
    let created = post(
        &fake,
        THREADS_ADD_PATH,
        &thread_add_body("access", "John Doe", "Hi"),
    )
    .await;
    let body = created.json();
    let t = &body["MessageThreads"][0];
    assert_eq!(t["OriginalSender"], "John Doe");
    assert_eq!(t["Subject"], "Hi");
    assert_eq!(t["IsResolved"], false);
    assert_eq!(t["CreatedUtc"], t["UpdatedUtc"]);
    let own = thread_id(&created);
    let registered = Uuid::new_v4();
    fake.register_threads("access", [registered.to_string()]);
    let threads = fake.message_threads();
    assert_eq!(
        threads
            .iter()
            .map(|t| (t.id, t.access_token.as_str()))
            .collect::<Vec<_>>(),
        [(own, "access"), (registered, "access")]
    );

    assert_eq!(
        post(&fake, ADD_PATH, &add_to("access", &[own, registered]))
            .await
            .status,
        200
    );
    // Another token did not create them; an unknown thread nobody did.
    let foreign = Uuid::new_v4();
    post(&fake, ADD_PATH, &add_to("other", &[own]))
        .await
        .assert_error(
            403,
            &format!("Message thread {own} was not created by this client"),
        );
    post(
        &fake,
        ADD_PATH,
        &add_to("access", &[own, foreign, registered]),
    )
    .await
    .assert_error(
        403,
        &format!("Message thread {foreign} was not created by this client"),
    );
    assert_eq!(fake.accepted().len(), 2, "a refused request stores nothing");

    // OriginalSender and Subject are required, non-empty strings.
    for (sender, subject, what) in [("", "s", "OriginalSender"), ("a", "", "Subject")] {
        post(
            &fake,
            THREADS_ADD_PATH,
            &thread_add_body("access", sender, subject),
        )
        .await
        .assert_error(400, &format!("Invalid {what}"));
    }
    let mut no_subject = thread_add_body("access", "a", "b");
    no_subject.as_object_mut().unwrap().remove("Subject");
    post(&fake, THREADS_ADD_PATH, &no_subject)
        .await
        .assert_error(400, "Invalid Subject");
    post(
        &fake,
        THREADS_ADD_PATH,
        &json!({"AccessToken": "access", "Client": "c", "OriginalSender": "a", "Subject": "b"}),
    )
    .await
    .assert_error(400, "Invalid ClientToken");
    assert_eq!(
        fake.message_threads().len(),
        2,
        "an invalid request creates nothing"
    );

    fake.update_options(|o| o.enforce_thread_ownership = false);
    assert_eq!(
        post(&fake, ADD_PATH, &add_to("other", &[foreign]))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn message_threads_get_all_pages_newest_first_within_the_token() {
    use crate::support::fake_mews::{THREADS_ADD_PATH, THREADS_GET_ALL_PATH};
    let fake = FakeMews::start().await;
    let mut made = Vec::new();
    for i in 0..5 {
        let answer = post(
            &fake,
            THREADS_ADD_PATH,
            &thread_add_body("access", "g", &format!("s{i}")),
        )
        .await;
        made.push(thread_id(&answer));
    }
    let other =
        thread_id(&post(&fake, THREADS_ADD_PATH, &thread_add_body("other", "g", "x")).await);
    let now = SystemTime::now();
    let window = json!({
        "StartUtc": humantime::format_rfc3339_seconds(now - Duration::from_secs(3600)).to_string(),
        "EndUtc": humantime::format_rfc3339_seconds(now + Duration::from_secs(3600)).to_string(),
    });
    let page_body = |cursor: Option<&str>| {
        json!({
            "ClientToken": "client", "AccessToken": "access", "Client": "selftest 1.0",
            "CreatedUtc": window, "Limitation": {"Count": 2, "Cursor": cursor},
        })
    };
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = post(&fake, THREADS_GET_ALL_PATH, &page_body(cursor.as_deref())).await;
        assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
        let page = page.json();
        let ids: Vec<Uuid> = page["MessageThreads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| Uuid::parse_str(t["Id"].as_str().unwrap()).unwrap())
            .collect();
        sizes.push(ids.len());
        seen.extend(ids);
        match page["Cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    made.reverse();
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(seen, made, "newest first, every thread of the token once");
    assert!(!seen.contains(&other));

    // By id; a filter is required; the interval is at most three months.
    let by_id = json!({
        "ClientToken": "client", "AccessToken": "access", "Client": "selftest 1.0",
        "MessageThreadIds": [made[0], other], "Limitation": {"Count": 10},
    });
    let found = post(&fake, THREADS_GET_ALL_PATH, &by_id).await.json();
    assert_eq!(found["MessageThreads"].as_array().unwrap().len(), 1);
    assert_eq!(found["MessageThreads"][0]["Id"], json!(made[0]));
    let mut unfiltered = page_body(None);
    unfiltered.as_object_mut().unwrap().remove("CreatedUtc");
    post(&fake, THREADS_GET_ALL_PATH, &unfiltered)
        .await
        .assert_error(400, "Invalid filter");
    let mut long = page_body(None);
    long["CreatedUtc"]["StartUtc"] = json!("2020-01-01T00:00:00Z");
    long["CreatedUtc"]["EndUtc"] = json!("2020-06-01T00:00:00Z");
    post(&fake, THREADS_GET_ALL_PATH, &long)
        .await
        .assert_error(400, "longer than three months");
    post(
        &fake,
        THREADS_GET_ALL_PATH,
        &page_body(Some(&Uuid::new_v4().to_string())),
    )
    .await
    .assert_error(400, "Invalid Limitation.Cursor");
}

#[tokio::test]
async fn message_thread_requests_take_scripted_faults_and_count_in_the_window() {
    use crate::support::fake_mews::{THREADS_ADD_PATH, THREADS_GET_ALL_PATH};
    let fake = FakeMews::start_with(FakeOptions {
        rate_limit: Some((4, Duration::from_secs(60))),
        ..FakeOptions::default()
    })
    .await;
    fake.script_threads_add([Fault::status(500)]);
    fake.script_threads_get_all([Fault::status(503)]);
    let add = thread_add_body("access", "a", "b");
    post(&fake, THREADS_ADD_PATH, &add)
        .await
        .assert_error(500, "Scripted failure 500");
    assert!(
        fake.message_threads().is_empty(),
        "a scripted failure creates nothing"
    );
    let id = thread_id(&post(&fake, THREADS_ADD_PATH, &add).await);
    let get = json!({
        "ClientToken": "client", "AccessToken": "access", "Client": "selftest 1.0",
        "MessageThreadIds": [id], "Limitation": {"Count": 10},
    });
    post(&fake, THREADS_GET_ALL_PATH, &get)
        .await
        .assert_error(503, "Scripted failure 503");
    assert_eq!(post(&fake, THREADS_GET_ALL_PATH, &get).await.status, 200);
    // The four above, scripted failures included, filled the token's window.
    let limited = post(&fake, THREADS_ADD_PATH, &add).await;
    assert_eq!(limited.status, 429);
    // Until the first of the four leaves the 60 s window (a few ms ago).
    let wait: u64 = limited.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((55..=60).contains(&wait), "Retry-After: {wait}");
    assert_eq!(fake.message_threads().len(), 1);
}

#[tokio::test]
async fn a_thread_add_can_create_the_thread_and_then_lose_the_answer() {
    use crate::support::fake_mews::THREADS_ADD_PATH;
    let fake = start().await;
    fake.script_threads_add([Fault::DropAfterStore, Fault::StoreThenStatus(503)]);
    let add = thread_add_body("access", "Ada", "Your stay");
    assert!(
        post_raw(&fake, THREADS_ADD_PATH, serde_json::to_vec(&add).unwrap())
            .await
            .is_err(),
        "the connection closes without an answer"
    );
    assert_eq!(post(&fake, THREADS_ADD_PATH, &add).await.status, 503);
    let threads: Vec<_> = fake
        .threads_of("access")
        .into_iter()
        .filter(|t| t.subject == "Your stay")
        .collect();
    assert_eq!(threads.len(), 2, "both were created before the failure");
    assert_eq!(fake.threads_per_subject()["Your stay"], 2);
    let records = fake.thread_add_requests();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].stored_ids, [threads[0].id]);
    let unknown = json!({
        "ClientToken": "client", "AccessToken": "access", "Client": "selftest 1.0",
        "OriginalSender": "Ada", "Subject": "S", "Extra": 1,
    });
    post(&fake, THREADS_ADD_PATH, &unknown)
        .await
        .assert_error(400, "Invalid Extra");
}
