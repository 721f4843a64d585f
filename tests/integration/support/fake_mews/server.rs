//! The running fake ([`FakeMews`]): start and stop, scripting, and the
//! queries and waits the tests assert with.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::connections::{ConnHandle, FakeListener};
use super::routes::handle;
use super::state::{ServerState, Shared, StoredEntry, whole_seconds};
use super::{
    ADD_PATH, FakeOptions, Fault, GET_ALL_PATH, MAX_REQUEST_BODY, RequestRecord, RetryAfter,
    StoredMessage, StoredThread,
};

/// A running fake Mews server. The server task is aborted and all its
/// connections are closed on drop (use [`FakeMews::stop`] to also wait until
/// the port is free again).
pub struct FakeMews {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    /// Address the server listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeMews {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeMews")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl FakeMews {
    /// Starts a fake with default options on `127.0.0.1:0`.
    pub async fn start() -> FakeMews {
        Self::start_with(FakeOptions::default()).await
    }

    /// Starts a fake with `opts` on `127.0.0.1:0`. Panics if it cannot bind.
    pub async fn start_with(opts: FakeOptions) -> FakeMews {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        match Self::start_on(addr, opts).await {
            Ok(fake) => fake,
            Err(e) => panic!("FakeMews: cannot bind {addr}: {e}"),
        }
    }

    /// Starts a fake on `addr` (e.g. a fixed port for the example, or the
    /// port of a previously [stopped](FakeMews::stop) fake).
    pub async fn start_on(addr: SocketAddr, opts: FakeOptions) -> io::Result<FakeMews> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState {
                opts,
                faults: VecDeque::new(),
                get_all_faults: VecDeque::new(),
                configuration_faults: VecDeque::new(),
                threads_add_faults: VecDeque::new(),
                threads_get_all_faults: VecDeque::new(),
                stored: Vec::new(),
                threads: Vec::new(),
                requests: Vec::new(),
                add_arrivals: 0,
                windows: Default::default(),
                retry_after_ends: Default::default(),
                throttle: None,
            }),
            next_seq: AtomicU64::new(0),
            changed,
            connections: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
            .with_state(Arc::clone(&shared));
        let listener = FakeListener {
            inner: listener,
            shared: Arc::clone(&shared),
        };
        let task = tokio::spawn(async move {
            let service = router.into_make_service_with_connect_info::<ConnHandle>();
            // Only returns on a fatal error; there is nobody to report it to.
            let _ = axum::serve(listener, service).await;
        });
        Ok(FakeMews {
            base_url: format!("http://{addr}"),
            addr,
            shared,
            task: Some(task),
        })
    }

    /// Stops the server, closes every connection and waits until the
    /// listening socket is closed, so the port can be bound again.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.shared.close_connections();
    }

    /// Full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Queues faults; each `messages/add` request pops one (if any) and
    /// applies it. When the queue is empty requests behave normally.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().faults.extend(faults);
    }

    /// Queues faults for `messages/getAll` requests, one per request. Only
    /// `Status`, `Raw`, `DropBeforeStore` and `DelayThenNormal` mean
    /// something there; any other fault is consumed and ignored.
    pub fn script_get_all(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().get_all_faults.extend(faults);
    }

    /// Queues faults for `configuration/get` requests, one per request. Only
    /// `Status` and `Redirect` mean something there.
    pub fn script_configuration(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().configuration_faults.extend(faults);
    }

    /// Queues faults for `messageThreads/add` requests, one per request,
    /// with the meaning they have on `messages/add` (the thread is what is
    /// stored: `DropAfterStore`, `StoreThenDelay` and the like create it
    /// and then fail to answer).
    pub fn script_threads_add(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().threads_add_faults.extend(faults);
    }

    /// Queues faults for `messageThreads/getAll` requests, one per request.
    /// Only those acting at arrival (`Status`, `StatusRetryAt`, `Raw`,
    /// `Redirect`, `DropBeforeStore`, `DelayThenNormal`) mean something
    /// there; any other fault is consumed and ignored.
    pub fn script_threads_get_all(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().threads_get_all_faults.extend(faults);
    }

    /// Registers threads as created "earlier by this client" with
    /// `access_token` (as `messageThreads/add` would have): `messages/add`
    /// with that token may then add to them. Panics on an id that is not a
    /// uuid (a test's mistake).
    pub fn register_threads<I>(&self, access_token: &str, ids: I)
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        for id in ids {
            let id = id.as_ref();
            let uuid = Uuid::parse_str(id)
                .unwrap_or_else(|e| panic!("register_threads: {id:?} is not a uuid: {e}"));
            self.shared.add_thread(
                access_token,
                uuid,
                "Registered by the test",
                "Registered thread",
            );
        }
    }

    /// Every thread known (created or registered), in creation order.
    pub fn message_threads(&self) -> Vec<StoredThread> {
        self.shared
            .state()
            .threads
            .iter()
            .map(|e| e.thread.clone())
            .collect()
    }

    /// Threads created (or registered) with `access_token`, in creation order.
    pub fn threads_of(&self, access_token: &str) -> Vec<StoredThread> {
        self.message_threads()
            .into_iter()
            .filter(|t| t.access_token == access_token)
            .collect()
    }

    /// How many threads were created (or registered) per `Subject`.
    pub fn threads_per_subject(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for t in self.message_threads() {
            *counts.entry(t.subject).or_insert(0) += 1;
        }
        counts
    }

    /// Only the `messageThreads/add` requests, in arrival order.
    pub fn thread_add_requests(&self) -> Vec<RequestRecord> {
        self.shared.records(|p| p == super::THREADS_ADD_PATH)
    }

    /// Waits until at least `n` threads exist (created or registered) and
    /// returns them. Panics after `timeout`.
    pub async fn wait_for_threads(&self, n: usize, timeout: Duration) -> Vec<StoredThread> {
        if self
            .wait_until(timeout, |st| st.threads.len() >= n)
            .await
            .is_err()
        {
            panic!(
                "FakeMews::wait_for_threads: {} of {n} threads within {timeout:?}",
                self.message_threads().len()
            );
        }
        self.message_threads()
    }

    /// Number of scripted faults not consumed yet.
    pub fn pending_faults(&self) -> usize {
        self.shared.state().faults.len()
    }

    /// Drops every scripted fault not consumed yet.
    pub fn clear_faults(&self) {
        self.shared.state().faults.clear();
    }

    /// Sets the poison predicate (see [`FakeOptions::poison`]).
    pub fn set_poison(&self, poison: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.shared.state().opts.poison = Some(Arc::new(poison));
    }

    /// Removes the poison predicate.
    pub fn clear_poison(&self) {
        self.shared.state().opts.poison = None;
    }

    /// Changes the rate limit (see [`FakeOptions::rate_limit`]); the request
    /// history of each token is kept.
    pub fn set_rate_limit(&self, rate_limit: Option<(usize, Duration)>) {
        self.shared.state().opts.rate_limit = rate_limit;
    }

    /// Changes any option while the server runs.
    pub fn update_options(&self, f: impl FnOnce(&mut FakeOptions)) {
        f(&mut self.shared.state().opts);
    }

    /// Until `until`, every request on every endpoint is answered `429`,
    /// with `retry_after` (made at response time) if given. Such requests
    /// count in the rate window like any other.
    pub fn throttle_until(&self, until: Instant, retry_after: Option<RetryAfter>) {
        self.shared.state().throttle = Some((until, retry_after));
    }

    /// Requests (any endpoint) that arrived before the end of the latest
    /// `Retry-After` the fake had sent for their `AccessToken`.
    pub fn retry_after_violations(&self) -> usize {
        self.shared
            .records(|_| true)
            .iter()
            .filter(|r| r.early)
            .count()
    }

    /// Stores a message as if someone (another program, a person in Mews)
    /// had added it `age` ago by the fake's clock, with this `AccessToken`;
    /// it is listed by `getAll` like any other. Returns it.
    pub fn seed_message(
        &self,
        access_token: &str,
        thread: Uuid,
        text: &str,
        age: Duration,
    ) -> StoredMessage {
        let created = whole_seconds(self.shared.now() - age);
        let msg = StoredMessage {
            id: Uuid::new_v4(),
            message_thread_id: thread,
            text: text.to_owned(),
            created_utc: humantime::format_rfc3339_seconds(created).to_string(),
            access_token: access_token.to_owned(),
            identifier: None,
        };
        self.shared.state().stored.push(StoredEntry {
            msg: msg.clone(),
            created,
        });
        self.shared.notify();
        msg
    }

    /// Every message stored, in storage order.
    pub fn accepted(&self) -> Vec<StoredMessage> {
        self.shared
            .state()
            .stored
            .iter()
            .map(|e| e.msg.clone())
            .collect()
    }

    /// Every `messages/add` and `messages/getAll` request, in arrival order
    /// (a request appears once it has been answered).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.records(is_messages_path)
    }

    /// Only the `messages/add` requests, in arrival order.
    pub fn add_requests(&self) -> Vec<RequestRecord> {
        self.shared.records(|p| p == ADD_PATH)
    }

    /// Every request of any path (including `configuration/get` and `404`s).
    pub fn all_requests(&self) -> Vec<RequestRecord> {
        self.shared.records(|_| true)
    }

    /// Waits until at least `n` messages are stored and returns all of them.
    /// Panics after `timeout` with how many arrived.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<StoredMessage> {
        if self
            .wait_until(timeout, |st| st.stored.len() >= n)
            .await
            .is_err()
        {
            let got = self.accepted();
            let texts: Vec<&str> = got.iter().take(20).map(|m| m.text.as_str()).collect();
            panic!(
                "FakeMews::wait_for_accepted: timed out after {timeout:?} waiting for {n} \
                 accepted messages; {} arrived (first texts: {texts:?}); {} messages/add \
                 requests seen",
                got.len(),
                self.add_requests().len(),
            );
        }
        self.accepted()
    }

    /// Waits until at least `n` entries are in [`FakeMews::requests`] and
    /// returns them. Panics after `timeout` with how many arrived.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RequestRecord> {
        let count = |st: &ServerState| {
            st.requests
                .iter()
                .filter(|(_, r)| is_messages_path(&r.path))
                .count()
        };
        if self.wait_until(timeout, |st| count(st) >= n).await.is_err() {
            let got = self.requests();
            let summary: Vec<(String, u16)> = got
                .iter()
                .take(20)
                .map(|r| (r.path.clone(), r.status))
                .collect();
            panic!(
                "FakeMews::wait_for_requests: timed out after {timeout:?} waiting for {n} \
                 requests; {} arrived (path, status): {summary:?}",
                got.len(),
            );
        }
        self.requests()
    }

    /// Waits until `n` `messages/add` requests have arrived, answered or not
    /// (a request shows in [`FakeMews::requests`] only once answered).
    /// Panics after `timeout`.
    pub async fn wait_for_add_arrivals(&self, n: usize, timeout: Duration) {
        if self
            .wait_until(timeout, |st| st.add_arrivals >= n)
            .await
            .is_err()
        {
            panic!(
                "FakeMews::wait_for_add_arrivals: {} of {n} messages/add requests arrived within {timeout:?}",
                self.shared.state().add_arrivals
            );
        }
    }

    /// Waits (on the change notification, no polling) until `cond` holds.
    async fn wait_until(
        &self,
        timeout: Duration,
        cond: impl Fn(&ServerState) -> bool,
    ) -> Result<(), ()> {
        let mut rx = self.shared.changed.subscribe();
        let wait = rx.wait_for(|_| cond(&self.shared.state()));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            // The sender lives in `self.shared`, so it cannot be closed here.
            Ok(Err(_)) | Err(_) => Err(()),
        }
    }
}

impl Drop for FakeMews {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.shared.close_connections();
    }
}

fn is_messages_path(path: &str) -> bool {
    path == ADD_PATH || path == GET_ALL_PATH
}
