//! Where each token comes from: the TOML, a file, a systemd credential
//! (`$CREDENTIALS_DIRECTORY/<name>`) or, for the demo environment, its
//! public tokens; the checks that keep them private (a file with a token
//! must not be readable by every user on the machine); redaction.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

/// Public demo ClientToken (Mews Connector API documentation, "Environments").
pub const DEMO_CLIENT_TOKEN: &str =
    "E0D439EE522F44368DC78E1BFB03710C-D24FB11DBE31D4621C4817E028D9E1D";
/// Public demo AccessToken, used for the `default` account when none is configured.
pub const DEMO_ACCESS_TOKEN: &str =
    "C66EF7B239D24632943D115EDE9CB810-EA00F8FD8294692C940F6B5A8F9453D";

/// Credential holding the ClientToken (`LoadCredential=mews-outbox.client_token:...`).
pub const CLIENT_TOKEN_CREDENTIAL: &str = "mews-outbox.client_token";
/// Prefix of each account's AccessToken credential: `mews-outbox.access_token.<account>`.
pub const ACCESS_TOKEN_CREDENTIAL_PREFIX: &str = "mews-outbox.access_token.";

/// Credential holding the PostgreSQL password (`LoadCredential=mews-outbox.database_password:...`),
/// for a `database.url` without one.
pub const DATABASE_PASSWORD_CREDENTIAL: &str = "mews-outbox.database_password";

/// The credential name of an account's AccessToken.
pub fn access_token_credential(account: &str) -> String {
    format!("{ACCESS_TOKEN_CREDENTIAL_PREFIX}{account}")
}

/// A token that cannot be had: given twice, empty, missing, or in a file
/// that cannot be used. Messages name the key, the file and the fix, never
/// the token.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("configuration: `{key}` and `{key}_file` are both set: keep one")]
    InlineAndFile { key: String },
    #[error(
        "configuration: `{key}` is set in the configuration and also passed as the systemd credential {}: keep one",
        .credential.display()
    )]
    AlsoCredential { key: String, credential: PathBuf },
    #[error("configuration: `{key}` must not be empty")]
    Empty { key: String },
    #[error(
        "configuration: `mews.client_token` is required when mews.base_url is not the public demo environment"
    )]
    ClientTokenMissing,
    #[error(
        "configuration: `{key}` is required for each account (or `{key}_file`, or the systemd credential {credential})"
    )]
    AccessTokenMissing {
        key: String,
        /// The credential's name, e.g. `mews-outbox.access_token.hotel`.
        credential: String,
    },
    /// `database.url` holds a password and a file or credential gives one too.
    #[error("configuration: `database.url` holds a password and {other} gives one too: keep one")]
    PasswordTwice {
        /// "`database.password_file`" or "the systemd credential `<path>`".
        other: String,
    },
    /// The path is neither shown nor kept (`Debug`): it may be a token
    /// pasted into `*_file`.
    /// The cause (the `io::Error`, which never holds the path) is the source.
    #[error("configuration: cannot read the file named by `{key}`")]
    Unreadable {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "configuration: {what} {path} is readable by every user on this machine (mode {mode:04o}); \
         run `chmod o-rwx {path}` (e.g. `chmod 0640 {path}`, owner root, group mews-outbox), \
         or set mews.allow_world_readable_token_files = true to accept this"
    )]
    WorldReadable {
        /// What the file is: "`accounts.x.access_token_file`", "the configuration file (it holds a token)".
        what: String,
        path: PathBuf,
        mode: u32,
    },
}

/// Where a configuration's tokens may come from besides the TOML, and
/// whether a world-readable token file is accepted.
pub struct TokenSources<'a> {
    /// `$CREDENTIALS_DIRECTORY`, set by systemd when it passes credentials.
    pub credentials_directory: Option<&'a str>,
    pub allow_world_readable: bool,
}

impl TokenSources<'_> {
    /// `mews.client_token`: as given, else the demo's public one when
    /// talking to the demo environment.
    pub fn client_token(
        &self,
        inline: Option<SecretString>,
        file: Option<PathBuf>,
        is_demo_url: bool,
    ) -> Result<SecretString, SecretError> {
        self.resolve("mews.client_token", inline, file, CLIENT_TOKEN_CREDENTIAL)?
            .or_else(|| is_demo_url.then(|| SecretString::from(DEMO_CLIENT_TOKEN)))
            .ok_or(SecretError::ClientTokenMissing)
    }

    /// `accounts.<account>.access_token`, which every account needs.
    pub fn access_token(
        &self,
        account: &str,
        inline: Option<SecretString>,
        file: Option<PathBuf>,
    ) -> Result<SecretString, SecretError> {
        let key = format!("accounts.{account}.access_token");
        let credential = access_token_credential(account);
        self.resolve(&key, inline, file, &credential)?
            .ok_or(SecretError::AccessTokenMissing { key, credential })
    }

    /// The PostgreSQL password when `database.url` has none: from
    /// `database.password_file` or the systemd credential
    /// [`DATABASE_PASSWORD_CREDENTIAL`] (not both); `None` when neither is
    /// given (the server may not ask for one: peer or certificate
    /// authentication). A URL with a password and another source is refused.
    pub fn database_password(
        &self,
        url_has_password: bool,
        file: Option<PathBuf>,
    ) -> Result<Option<SecretString>, SecretError> {
        if url_has_password {
            if file.is_some() {
                return Err(SecretError::PasswordTwice {
                    other: "`database.password_file`".into(),
                });
            }
            if let Some(path) = credential(self.credentials_directory, DATABASE_PASSWORD_CREDENTIAL)
            {
                return Err(SecretError::PasswordTwice {
                    other: format!("the systemd credential {}", path.display()),
                });
            }
            return Ok(None);
        }
        self.resolve(
            "database.password",
            None,
            file,
            DATABASE_PASSWORD_CREDENTIAL,
        )
    }

    /// A token given inline, in a file, or as the systemd credential
    /// `credential_name` (exactly one of them, or none); empty is refused.
    fn resolve(
        &self,
        key: &str,
        inline: Option<SecretString>,
        file: Option<PathBuf>,
        credential_name: &str,
    ) -> Result<Option<SecretString>, SecretError> {
        let credential = credential(self.credentials_directory, credential_name);
        let allow_world_readable = self.allow_world_readable;
        let file_key = format!("{key}_file");
        let value = match (inline, file, credential) {
            (Some(_), Some(_), _) => {
                return Err(SecretError::InlineAndFile {
                    key: key.to_owned(),
                });
            }
            (Some(_), None, Some(credential)) | (None, Some(_), Some(credential)) => {
                return Err(SecretError::AlsoCredential {
                    key: key.to_owned(),
                    credential,
                });
            }
            (Some(value), None, None) => value,
            (None, Some(path), None) => read_token_file(&file_key, &path, allow_world_readable)?,
            (None, None, Some(path)) => {
                read_token_file(&format!("{key} credential"), &path, allow_world_readable)?
            }
            (None, None, None) => return Ok(None),
        };
        if value.expose_secret().trim().is_empty() {
            return Err(SecretError::Empty {
                key: key.to_owned(),
            });
        }
        Ok(Some(value))
    }
}

/// Reads a token from `path`, trimmed, refusing a world-readable file unless
/// `allow_world_readable`.
pub fn read_token_file(
    key: &str,
    path: &Path,
    allow_world_readable: bool,
) -> Result<SecretString, SecretError> {
    let unreadable = |source| SecretError::Unreadable {
        key: key.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    // Checked on the open file, so a rename in between cannot swap it.
    let mode = file.metadata().map_err(unreadable)?.permissions().mode();
    if !allow_world_readable {
        refuse_world_readable(&format!("`{key}`"), path, mode)?;
    }
    let text = std::io::read_to_string(file).map_err(unreadable)?;
    Ok(SecretString::from(text.trim().to_owned()))
}

/// Refuses a file whose mode lets every user read it.
pub fn refuse_world_readable(what: &str, path: &Path, mode: u32) -> Result<(), SecretError> {
    if mode & 0o004 != 0 {
        return Err(SecretError::WorldReadable {
            what: what.to_owned(),
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Checks the configuration file when it holds a token itself.
pub fn check_config_file(path: &Path, allow_world_readable: bool) -> Result<(), SecretError> {
    if allow_world_readable {
        return Ok(());
    }
    let mode = std::fs::metadata(path)
        .map_err(|source| SecretError::Unreadable {
            key: "--config".into(),
            source,
        })?
        .permissions()
        .mode();
    refuse_world_readable("the configuration file (it holds a token)", path, mode)
}

/// The path of credential `name` when systemd passed it, i.e. when
/// `credentials_directory` is set and the file exists there.
pub fn credential(credentials_directory: Option<&str>, name: &str) -> Option<PathBuf> {
    // Only the first entry: systemd sets a single directory.
    let dir = credentials_directory?.split(':').next()?;
    if dir.is_empty() || name.contains('/') {
        return None;
    }
    let path = Path::new(dir).join(name);
    path.is_file().then_some(path)
}

/// Replaces every occurrence of each secret in `text` with `<redacted>`.
/// For messages built from input that might echo a token (a parse error
/// quoting a line of the configuration, an error body from Mews).
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for secret in secrets {
        let secret = secret.trim();
        // Very short values would redact ordinary words; no real token is that short.
        if secret.len() >= 4 && out.contains(secret) {
            out = out.replace(secret, "<redacted>");
        }
    }
    out
}

/// Token values as they appear in a TOML text, including a truncated one
/// (an unterminated string), so an error quoting the line can be redacted.
pub fn token_values_in_toml(text: &str) -> Vec<String> {
    values_in_toml(text, |key| key.ends_with("token"))
}

/// Every value in a TOML text, for redacting an error about any key: a
/// token pasted into the wrong key is the case to catch.
pub fn all_values_in_toml(text: &str) -> Vec<String> {
    values_in_toml(text, |_| true)
}

fn values_in_toml(text: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut values = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_matches('"').to_ascii_lowercase();
        if !keep(&key) {
            continue;
        }
        let value = value.trim();
        let unquoted = value
            .trim_start_matches(['"', '\''])
            .trim_end_matches(['"', '\''])
            .trim();
        for candidate in [value, unquoted] {
            if !candidate.is_empty() {
                values.push(candidate.to_owned());
            }
        }
    }
    // Longest first, so a value is replaced before a part of it.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_world_readable_token_file_is_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "t", "SECRET-VALUE\n", 0o644);
        let e = read_token_file("accounts.a.access_token_file", &path, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("chmod"), "{e}");
        assert!(e.contains("0644"), "{e}");
        assert!(e.contains("accounts.a.access_token_file"), "{e}");
        assert!(!e.contains("SECRET-VALUE"), "{e}");

        let allowed = read_token_file("k", &path, true).unwrap();
        assert_eq!(allowed.expose_secret(), "SECRET-VALUE");
    }

    #[test]
    fn an_unreadable_token_file_names_the_key_and_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_token_file(
            "accounts.a.access_token_file",
            &dir.path().join("gone"),
            false,
        )
        .unwrap_err();
        let chain = crate::error_chain::ErrorChain(&e).to_string();
        assert_eq!(
            chain.matches("No such file or directory").count(),
            1,
            "{chain}"
        );
        assert_eq!(
            chain.matches("accounts.a.access_token_file").count(),
            1,
            "{chain}"
        );
        assert!(!chain.contains("gone"), "the path may be a token: {chain}");
    }

    /// The texts the configuration gave before token resolution moved
    /// here, word for word: they name keys and files, never a value.
    #[test]
    fn a_token_given_twice_empty_or_missing_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let file = write(dir.path(), "t", "from-file", 0o600);
        let credential = write(dir.path(), CLIENT_TOKEN_CREDENTIAL, "from-cred", 0o400);
        let none = TokenSources {
            credentials_directory: None,
            allow_world_readable: false,
        };
        let systemd = TokenSources {
            credentials_directory: Some(d),
            allow_world_readable: false,
        };
        let inline = || Some(SecretString::from("INLINE-1"));
        let refused = |r: Result<SecretString, SecretError>| r.unwrap_err().to_string();
        assert_eq!(
            refused(none.client_token(inline(), Some(file.clone()), true)),
            "configuration: `mews.client_token` and `mews.client_token_file` are both set: keep one"
        );
        assert_eq!(
            refused(systemd.client_token(inline(), None, true)),
            format!(
                "configuration: `mews.client_token` is set in the configuration and also passed as the systemd credential {}: keep one",
                credential.display()
            )
        );
        assert_eq!(
            refused(none.access_token("hotel", Some(SecretString::from("  ")), None)),
            "configuration: `accounts.hotel.access_token` must not be empty"
        );
        assert_eq!(
            refused(none.client_token(None, None, false)),
            "configuration: `mews.client_token` is required when mews.base_url is not the public demo environment"
        );
        assert_eq!(
            refused(none.access_token("hotel", None, None)),
            "configuration: `accounts.hotel.access_token` is required for each account (or `accounts.hotel.access_token_file`, or the systemd credential mews-outbox.access_token.hotel)"
        );
        assert_eq!(
            none.client_token(None, None, true).unwrap().expose_secret(),
            DEMO_CLIENT_TOKEN
        );
        assert_eq!(
            systemd
                .client_token(None, None, false)
                .unwrap()
                .expose_secret(),
            "from-cred"
        );
        assert_eq!(
            none.access_token("hotel", None, Some(file))
                .unwrap()
                .expose_secret(),
            "from-file"
        );
    }

    #[test]
    fn a_group_readable_token_file_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "t", "  tok-1 \n", 0o640);
        assert_eq!(
            read_token_file("k", &path, false).unwrap().expose_secret(),
            "tok-1"
        );
    }

    #[test]
    fn credentials_are_found_only_when_systemd_passed_them() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), CLIENT_TOKEN_CREDENTIAL, "c", 0o400);
        let d = dir.path().to_str().unwrap();
        assert!(credential(Some(d), CLIENT_TOKEN_CREDENTIAL).is_some());
        assert!(credential(Some(d), &access_token_credential("x")).is_none());
        assert!(credential(None, CLIENT_TOKEN_CREDENTIAL).is_none());
        assert!(credential(Some(d), "../etc/passwd").is_none());
    }

    #[test]
    fn token_values_are_found_even_in_a_broken_line() {
        let text = "[mews]\nclient_token = \"ABCDEF-1\nbase_url = \"x\"\n[accounts.a]\naccess_token='GHIJ-2'\n";
        let values = token_values_in_toml(text);
        let message = "TOML parse error at line 2: client_token = \"ABCDEF-1 ... 'GHIJ-2'";
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let redacted = redact(message, &refs);
        assert!(!redacted.contains("ABCDEF-1"), "{redacted}");
        assert!(!redacted.contains("GHIJ-2"), "{redacted}");
        assert!(redacted.contains("line 2"), "{redacted}");
    }
}
