//! `check-config --online`: proves each account's tokens work by calling
//! Mews `configuration/get` (a read-only call) and says what came back,
//! never the tokens.

use std::time::Duration;

use crate::config::Settings;
use crate::mews::{ClientError, MewsClient};

/// One account's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountCheck {
    pub account: String,
    /// `Ok` when Mews answered 200.
    pub passed: bool,
    /// "HTTP 200 in 35 ms (Request-Id ...)" or the error Mews gave.
    pub detail: String,
}

/// Calls `configuration/get` once per account, one after the other.
pub async fn check_accounts(settings: &Settings) -> Result<Vec<AccountCheck>, ClientError> {
    let client = MewsClient::new(&settings.mews)?;
    let mut checks = Vec::with_capacity(settings.accounts.len());
    for (name, account) in &settings.accounts {
        let reply = client.check_tokens(&account.access_token).await;
        let elapsed = humantime::format_duration(Duration::from_millis(
            u64::try_from(reply.elapsed.as_millis()).unwrap_or(u64::MAX),
        ));
        let request_id = reply
            .request_id
            .as_deref()
            .map(|id| format!(" (Request-Id {id})"))
            .unwrap_or_default();
        // The body of configuration/get is not a messages/add body, so the
        // status decides; the outcome only supplies the error text.
        let (passed, detail) = match reply.http_status {
            Some(200) => (true, format!("HTTP 200 in {elapsed}{request_id}")),
            _ => (
                false,
                match reply.outcome.error() {
                    Some(error) => format!("{error} (after {elapsed})"),
                    None => format!("unexpected answer in {elapsed}{request_id}"),
                },
            ),
        };
        checks.push(AccountCheck {
            account: name.clone(),
            passed,
            detail,
        });
    }
    Ok(checks)
}

/// The report printed by the CLI: one line per account.
pub fn render(checks: &[AccountCheck]) -> String {
    let width = checks.iter().map(|c| c.account.len()).max().unwrap_or(0);
    checks
        .iter()
        .map(|c| {
            format!(
                "{:<6} {:<width$}  configuration/get: {}",
                if c.passed { "ok" } else { "FAILED" },
                c.account,
                c.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
