//! Comparing a database's schema with the binary's migrations, for the
//! read-only commands, which never migrate (both stores).

/// How a database's applied migrations compare with the binary's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaProblem {
    #[error(
        "has no outbox tables yet; start the daemon (`systemctl start mews-outbox`) or run `mews-outbox migrate`"
    )]
    Missing,
    #[error(
        "has an older outbox schema (migrations {missing:?} not applied); start the daemon of this version or run `mews-outbox migrate`, which this read-only command does not do"
    )]
    Older { missing: Vec<i64> },
    #[error(
        "was migrated by a newer mews-outbox (unknown migrations {unknown:?}); use that version's binary"
    )]
    Newer { unknown: Vec<i64> },
}

/// Compares the migration versions applied to a database with those the
/// binary knows. Newer wins over older: a database both lacks and has
/// extra migrations only when another build wrote it.
pub fn schema_verdict(applied: &[i64], known: &[i64]) -> Result<(), SchemaProblem> {
    let unknown: Vec<i64> = applied
        .iter()
        .copied()
        .filter(|v| !known.contains(v))
        .collect();
    if !unknown.is_empty() {
        return Err(SchemaProblem::Newer { unknown });
    }
    let missing: Vec<i64> = known
        .iter()
        .copied()
        .filter(|v| !applied.contains(v))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else if applied.is_empty() {
        Err(SchemaProblem::Missing)
    } else {
        Err(SchemaProblem::Older { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_is_compared_with_the_binarys_migrations() {
        assert_eq!(schema_verdict(&[1, 2, 3], &[1, 2, 3]), Ok(()));
        assert_eq!(schema_verdict(&[], &[1, 2]), Err(SchemaProblem::Missing));
        assert_eq!(
            schema_verdict(&[1], &[1, 2, 3]),
            Err(SchemaProblem::Older {
                missing: vec![2, 3]
            })
        );
        assert_eq!(
            schema_verdict(&[1, 2, 4], &[1, 2]),
            Err(SchemaProblem::Newer { unknown: vec![4] })
        );
    }
}
