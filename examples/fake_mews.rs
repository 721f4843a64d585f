//! Runs the fake Mews Connector API (the one the integration tests use) by
//! hand, e.g. to point a locally running `mews-outbox` at it:
//!
//! ```text
//! cargo run --example fake_mews -- --port 8088
//! cargo run --example fake_mews -- --rate-limit 5/10s --sender-as-string
//! ```
//!
//! Messages go only to threads made with `messageThreads/add` and the same
//! AccessToken, as at Mews, unless `--any-thread` is given.
//! Accepts any non-empty tokens unless `--token CLIENT:ACCESS` is given,
//! prints one line per request and per stored message, runs until Ctrl-C.

// The same module tree the tests use (`crate::support::fake_mews` there).
// This program only starts and stops the server; the scripting and assertion
// half of the fake's API is for the tests, hence the allow.
#[path = "../tests/integration/support/fake_mews/mod.rs"]
#[allow(dead_code)]
mod fake_mews;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use fake_mews::{FakeMews, FakeOptions};

/// Fake Mews Connector API (messages/add, messages/getAll, messageThreads/add,
/// messageThreads/getAll, configuration/get).
#[derive(Debug, Parser)]
struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = 8088)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Only accept this ClientToken:AccessToken pair (repeatable); default:
    /// any non-empty tokens.
    #[arg(long = "token", value_name = "CLIENT:ACCESS", value_parser = parse_token_pair)]
    tokens: Vec<(String, String)>,
    /// Render Sender as the string "Application" instead of an object.
    #[arg(long)]
    sender_as_string: bool,
    /// Answer messages/add items in request order instead of shuffled.
    #[arg(long)]
    no_shuffle: bool,
    /// Sliding-window rate limit per AccessToken, e.g. "200/30s".
    #[arg(long, value_name = "N/WINDOW", value_parser = parse_rate_limit)]
    rate_limit: Option<(usize, Duration)>,
    /// Accept messages to any thread (Mews, and the fake by default, only
    /// take threads created with the same AccessToken via messageThreads/add).
    #[arg(long)]
    any_thread: bool,
}

fn parse_token_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((c, a)) if !c.is_empty() && !a.is_empty() => Ok((c.to_owned(), a.to_owned())),
        _ => Err("expected CLIENT_TOKEN:ACCESS_TOKEN".to_owned()),
    }
}

fn parse_rate_limit(s: &str) -> Result<(usize, Duration), String> {
    let (n, window) = s
        .split_once('/')
        .ok_or_else(|| "expected N/WINDOW, e.g. 200/30s".to_owned())?;
    let n = n
        .parse()
        .map_err(|e| format!("bad request count {n:?}: {e}"))?;
    let window =
        humantime::parse_duration(window).map_err(|e| format!("bad window {window:?}: {e}"))?;
    Ok((n, window))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let opts = FakeOptions {
        valid_tokens: (!args.tokens.is_empty()).then_some(args.tokens),
        sender_as_string: args.sender_as_string,
        shuffle_responses: !args.no_shuffle,
        rate_limit: args.rate_limit,
        retry_after_as_date: false,
        poison: None,
        verbose: true,
        enforce_thread_ownership: !args.any_thread,
        ..FakeOptions::default()
    };
    println!("[fake-mews] options: {opts:?}");
    let fake = FakeMews::start_on(SocketAddr::new(args.host, args.port), opts).await?;
    println!(
        "[fake-mews] listening on {} (POST {}), Ctrl-C to stop",
        fake.base_url,
        fake.url(fake_mews::ADD_PATH)
    );
    tokio::signal::ctrl_c().await?;
    println!(
        "[fake-mews] stopping: {} messages stored, {} requests",
        fake.accepted().len(),
        fake.all_requests().len()
    );
    fake.stop().await;
    Ok(())
}
