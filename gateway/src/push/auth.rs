//! How the push connection logs in: with the gateway's `nats_auth` (the same user, nkey or
//! credentials file its async-nats client uses, `chat_common::nats`), read once at startup.
//! Without `nats_auth`, a user and password (or a token) in `nats_url` are sent.
//!
//! An nkey or a credentials file proves who it is by signing the `nonce` of the server's `INFO`
//! with the seed: `CONNECT` carries the signature (`sig`, base64url without padding) and the
//! public key (`nkey`) or the user JWT (`jwt`), as every NATS client does.

use std::{fmt, sync::Arc};

use anyhow::Context;
use async_nats::ServerAddr;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chat_common::nats::{NatsAuth, read_secret};
use nkeys::KeyPair;

use super::proto::Credentials;

/// The push connection's credentials (cheap to clone; secrets never shown by `Debug`).
#[derive(Clone, Default)]
pub(crate) enum PushAuth {
    /// No `nats_auth`: whatever `nats_url` carries.
    #[default]
    FromUrl,
    /// `nats_auth.user` with `password` or `password_file`.
    User { user: String, password: String },
    /// `nats_auth.nkey_seed_file`.
    Nkey(Arc<KeyPair>),
    /// `nats_auth.creds_file`: the user JWT and the seed that signs for it.
    Jwt { jwt: String, key: Arc<KeyPair> },
}

impl fmt::Debug for PushAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FromUrl => f.write_str("FromUrl"),
            Self::User { user, .. } => f.debug_struct("User").field("user", user).finish(),
            Self::Nkey(key) => f.debug_tuple("Nkey").field(&key.public_key()).finish(),
            Self::Jwt { key, .. } => f.debug_tuple("Jwt").field(&key.public_key()).finish(),
        }
    }
}

impl PushAuth {
    /// Reads the files `auth` names and checks the seeds (a bad one fails startup, not every
    /// connect).
    pub(crate) fn load(auth: &NatsAuth) -> anyhow::Result<Self> {
        auth.validate()?;
        if let Some(user) = &auth.user {
            let password = match (&auth.password, &auth.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(path)) => read_secret(path, "password file")?,
                (None, None) => String::new(),
            };
            return Ok(Self::User {
                user: user.clone(),
                password,
            });
        }
        if let Some(path) = &auth.nkey_seed_file {
            let seed = read_secret(path, "nkey seed file")?;
            let key = KeyPair::from_seed(seed.trim())
                .with_context(|| format!("nats_auth: no valid nkey seed in {}", path.display()))?;
            return Ok(Self::Nkey(Arc::new(key)));
        }
        if let Some(path) = &auth.creds_file {
            let (jwt, key) = parse_creds(&read_secret(path, "creds file")?)
                .with_context(|| format!("nats_auth: the creds file {}", path.display()))?;
            return Ok(Self::Jwt {
                jwt,
                key: Arc::new(key),
            });
        }
        Ok(Self::FromUrl)
    }

    /// The credential fields of the `CONNECT` to `server`, whose `INFO` carried `nonce`.
    pub(crate) fn credentials(
        &self,
        server: &ServerAddr,
        nonce: &str,
    ) -> Result<Credentials, nkeys::error::Error> {
        let sign = |key: &KeyPair| {
            key.sign(nonce.as_bytes())
                .map(|s| URL_SAFE_NO_PAD.encode(s))
        };
        Ok(match self {
            Self::FromUrl => {
                let (user, pass) = (server.username(), server.password());
                match pass {
                    Some(pass) => Credentials {
                        user: user.map(str::to_owned),
                        pass: Some(pass.to_owned()),
                        ..Credentials::default()
                    },
                    None => Credentials {
                        auth_token: user.map(str::to_owned),
                        ..Credentials::default()
                    },
                }
            }
            Self::User { user, password } => Credentials {
                user: Some(user.clone()),
                pass: Some(password.clone()),
                ..Credentials::default()
            },
            Self::Nkey(key) => Credentials {
                nkey: Some(key.public_key()),
                sig: Some(sign(key)?),
                ..Credentials::default()
            },
            Self::Jwt { jwt, key } => Credentials {
                jwt: Some(jwt.clone()),
                sig: Some(sign(key)?),
                ..Credentials::default()
            },
        })
    }
}

/// The user JWT and the seed of a `.creds` file: the first and the second value framed by
/// `-----BEGIN ...-----` / `------END ...------` lines (what `nsc` writes).
fn parse_creds(contents: &str) -> anyhow::Result<(String, KeyPair)> {
    let lines: Vec<&str> = contents.lines().map(str::trim).collect();
    let is_frame = |l: &str| l.starts_with("---") && l.ends_with("---");
    let mut values = lines.windows(3).filter_map(|w| {
        (is_frame(w[0]) && !w[1].is_empty() && !is_frame(w[1]) && is_frame(w[2])).then_some(w[1])
    });
    let jwt = values.next().context("no user JWT in it")?;
    let seed = values.next().context("no nkey seed in it")?;
    let key = KeyPair::from_seed(seed).context("its nkey seed is not valid")?;
    Ok((jwt.to_owned(), key))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn write(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn creds(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }

    fn verify(public: &str, nonce: &str, sig: &str) {
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .expect("base64url without padding");
        KeyPair::from_public_key(public)
            .unwrap()
            .verify(nonce.as_bytes(), &sig)
            .expect("the signature is the seed's, over the nonce");
    }

    #[test]
    fn every_way_of_nats_auth_becomes_connect_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let server: ServerAddr = "nats://127.0.0.1:4222".parse().unwrap();
        let nonce = "pK5cPEpmMc1MJl4";

        let none = PushAuth::load(&NatsAuth::default()).unwrap();
        assert!(matches!(none, PushAuth::FromUrl));
        let c = none.credentials(&server, nonce).unwrap();
        assert_eq!((c.user, c.pass, c.auth_token), (None, None, None));

        let password_file = write(dir.path(), "pw", "from-file\n");
        let user = PushAuth::load(&NatsAuth {
            user: Some("gateway".into()),
            password_file: Some(password_file),
            ..Default::default()
        })
        .unwrap();
        let c = user.credentials(&server, nonce).unwrap();
        assert_eq!(c.user.as_deref(), Some("gateway"));
        assert_eq!(c.pass.as_deref(), Some("from-file"));
        assert!(!format!("{user:?}").contains("from-file"));

        let key = KeyPair::new_user();
        let seed_file = write(dir.path(), "seed", &format!("{}\n", key.seed().unwrap()));
        let nkey = PushAuth::load(&NatsAuth {
            nkey_seed_file: Some(seed_file),
            ..Default::default()
        })
        .unwrap();
        let c = nkey.credentials(&server, nonce).unwrap();
        assert_eq!(c.nkey.as_deref(), Some(key.public_key().as_str()));
        verify(&key.public_key(), nonce, c.sig.as_deref().unwrap());
        assert!(!format!("{nkey:?}").contains(&key.seed().unwrap()));

        let key = KeyPair::new_user();
        let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln";
        let creds_file = write(dir.path(), "u.creds", &creds(jwt, &key.seed().unwrap()));
        let creds = PushAuth::load(&NatsAuth {
            creds_file: Some(creds_file),
            ..Default::default()
        })
        .unwrap();
        let c = creds.credentials(&server, nonce).unwrap();
        assert_eq!(c.jwt.as_deref(), Some(jwt));
        assert_eq!(c.nkey, None);
        verify(&key.public_key(), nonce, c.sig.as_deref().unwrap());
    }

    #[test]
    fn url_credentials_are_used_without_nats_auth() {
        let with_pass: ServerAddr = "nats://u:p@127.0.0.1:4222".parse().unwrap();
        let c = PushAuth::FromUrl.credentials(&with_pass, "").unwrap();
        assert_eq!(
            (c.user.as_deref(), c.pass.as_deref()),
            (Some("u"), Some("p"))
        );
        let with_token: ServerAddr = "nats://s3cret@127.0.0.1:4222".parse().unwrap();
        let c = PushAuth::FromUrl.credentials(&with_token, "").unwrap();
        assert_eq!((c.user, c.auth_token.as_deref()), (None, Some("s3cret")));
    }

    #[test]
    fn bad_files_fail_at_load_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let seed = write(dir.path(), "seed", "not a seed\n");
        let err = PushAuth::load(&NatsAuth {
            nkey_seed_file: Some(seed.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            format!("{err:#}").contains(&seed.display().to_string()),
            "{err:#}"
        );
        let creds = write(
            dir.path(),
            "x.creds",
            "-----BEGIN NATS USER JWT-----\nabc\n",
        );
        let err = PushAuth::load(&NatsAuth {
            creds_file: Some(creds),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("no user JWT"), "{err:#}");
        let missing = PushAuth::load(&NatsAuth {
            creds_file: Some("/nonexistent/x.creds".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{missing:#}").contains("/nonexistent/x.creds"));
    }
}
