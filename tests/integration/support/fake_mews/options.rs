//! The fake's behaviour knobs ([`FakeOptions`]), set at start and changeable
//! while it runs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Predicate on a message `Text`: `true` poisons the whole request.
pub type PoisonFn = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Behaviour knobs of the fake. All of them can also be changed while the
/// server runs ([`FakeMews::update_options`], [`FakeMews::set_poison`], ...).
#[derive(Clone)]
pub struct FakeOptions {
    /// `None`: accept any non-empty tokens. `Some(pairs)`: only these
    /// `(ClientToken, AccessToken)` pairs are valid, anything else gets `401`.
    pub valid_tokens: Option<Vec<(String, String)>>,
    /// Render `Sender` as the plain string `"Application"` (older
    /// documentation) instead of `{"Discriminator":"Application","Value":null}`.
    pub sender_as_string: bool,
    /// Return the `Messages` array of a `messages/add` response in a random
    /// order. Default `true`: the order is not documented by Mews.
    pub shuffle_responses: bool,
    /// Sliding window per `AccessToken`: when `N` requests (`messages/add`
    /// and `messages/getAll`) were admitted within the window, the next one
    /// gets `429` with `Retry-After: <delta-seconds>` (ceiling of the time
    /// until the oldest admitted request leaves the window, at least 1), or
    /// the same time as an HTTP-date with [`FakeOptions::retry_after_as_date`].
    /// Every request on every endpoint counts, whatever it is answered
    /// (scripted faults, `401`, `400`); only the limiter's own `429`s do not
    /// enter the window.
    pub rate_limit: Option<(usize, Duration)>,
    /// The limiter's `Retry-After` as an HTTP-date (made when the response
    /// is) instead of delta-seconds.
    pub retry_after_as_date: bool,
    /// If any message `Text` of a `messages/add` request matches, the whole
    /// request gets `403 {"Message":"poisoned: <text prefix>", ..}` and
    /// nothing is stored.
    pub poison: Option<PoisonFn>,
    /// Print one line per request and per stored message to stdout.
    pub verbose: bool,
    /// `messages/getAll` answers the last page's `Cursor` too (the Id of its
    /// oldest message, as for every other page) instead of `null`, so a
    /// client must stop on a page that is not full, not on a null cursor.
    pub cursor_on_last_page: bool,
    /// How far the fake's clock is from the real one, in milliseconds
    /// (positive: ahead), as for a Mews whose clock differs from ours. It
    /// shifts `CreatedUtc`, the `getAll` filter and the `Date` header alike.
    pub clock_offset_ms: i64,
    /// Like Mews, `messages/add` only adds to threads created with the
    /// request's `AccessToken` (by `messageThreads/add` or
    /// [`FakeMews::register_threads`]); a request with a message for any
    /// other thread gets `403` naming it and stores nothing. Default `true`.
    pub enforce_thread_ownership: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            valid_tokens: None,
            sender_as_string: false,
            shuffle_responses: true,
            rate_limit: None,
            retry_after_as_date: false,
            poison: None,
            verbose: false,
            cursor_on_last_page: false,
            clock_offset_ms: 0,
            enforce_thread_ownership: true,
        }
    }
}

impl fmt::Debug for FakeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeOptions")
            .field("valid_tokens", &self.valid_tokens)
            .field("sender_as_string", &self.sender_as_string)
            .field("shuffle_responses", &self.shuffle_responses)
            .field("rate_limit", &self.rate_limit)
            .field("retry_after_as_date", &self.retry_after_as_date)
            .field("poison", &self.poison.as_ref().map(|_| "<fn>"))
            .field("verbose", &self.verbose)
            .field("cursor_on_last_page", &self.cursor_on_last_page)
            .field("clock_offset_ms", &self.clock_offset_ms)
            .field("enforce_thread_ownership", &self.enforce_thread_ownership)
            .finish()
    }
}
