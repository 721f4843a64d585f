//! How an error is shown to an operator: its message, then each cause once.
//!
//! The rule every error enum here follows: a variant either names its cause
//! in its message and has no `source()`, or has a source and leaves it out
//! of its message. Printing the chain then shows each cause exactly once,
//! whether at the binary's edge (anyhow's `{:#}`) or in a log line
//! ([`ErrorChain`]), which a bare `%e` would not: it would drop the causes.

use std::error::Error;
use std::fmt;

/// Displays an error and its `source()` chain as `message: cause: cause`,
/// the text anyhow's `{:#}` prints at the binary's edge.
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot do the thing")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_shows_each_cause_after_the_message() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot do the thing: disk on fire"
        );
        assert_eq!(
            ErrorChain(&e).to_string(),
            format!("{:#}", anyhow::Error::new(e)),
            "the same text as at the binary's edge"
        );
    }
}
