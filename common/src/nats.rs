//! Connecting to NATS: the servers, how a service authenticates, and its inbox prefix.
//!
//! Every service has a `nats_auth` setting block (env `CHAT_<SERVICE>_NATS_AUTH__<FIELD>`) with
//! at most one way to authenticate: a user and password (as `nats/auth.conf` declares them), an
//! nkey seed file, or a credentials file (JWT and seed, for operator/account deployments). None:
//! no authentication (the development server, `nats/dev.conf`). Secrets are never logged.
//!
//! Each service's replies and JetStream acks arrive under its own inbox prefix
//! (`_INBOX.<service>.`), so its NATS user may subscribe to its own inboxes only and no other
//! service's replies can be read or forged by it (`nats/auth.conf`).

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Deserializer, Serialize};

/// How a service authenticates to NATS: at most one of user and password, `nkey_seed_file` or
/// `creds_file`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsAuth {
    /// User name (with `password` or `password_file`).
    pub user: Option<String>,
    /// Password of `user`. Never logged.
    #[serde(deserialize_with = "lenient_string")]
    pub password: Option<String>,
    /// File holding the password of `user` (trailing newline ignored), e.g. a mounted secret.
    pub password_file: Option<PathBuf>,
    /// File holding an nkey seed (`SU...`): the server knows the user by its public key.
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and nkey seed), for decentralized JWT authentication.
    pub creds_file: Option<PathBuf>,
}

// Hand-written so the password never reaches a log line.
impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .finish()
    }
}

/// Env values that look like numbers or booleans reach serde as such (figment parses them):
/// a password of digits only must still be a string.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(Option::<Any>::deserialize(d)?.map(|v| match v {
        Any::S(s) => s,
        Any::I(i) => i.to_string(),
        Any::U(u) => u.to_string(),
        Any::F(f) => f.to_string(),
        Any::B(b) => b.to_string(),
    }))
}

impl NatsAuth {
    /// Checks that at most one method is set, and that a password goes with a user.
    pub fn validate(&self) -> anyhow::Result<()> {
        let methods = usize::from(self.user.is_some())
            + usize::from(self.nkey_seed_file.is_some())
            + usize::from(self.creds_file.is_some());
        anyhow::ensure!(
            methods <= 1,
            "nats_auth: set at most one of `user`, `nkey_seed_file`, `creds_file` ({methods} are)"
        );
        let passwords =
            usize::from(self.password.is_some()) + usize::from(self.password_file.is_some());
        anyhow::ensure!(
            passwords == 0 || self.user.is_some(),
            "nats_auth: `password` and `password_file` need `user`"
        );
        anyhow::ensure!(
            passwords <= 1,
            "nats_auth: set `password` or `password_file`, not both"
        );
        if let Some(user) = &self.user {
            anyhow::ensure!(!user.is_empty(), "nats_auth: `user` is empty");
        }
        Ok(())
    }

    /// Connect options carrying these credentials (files are read now).
    pub async fn options(&self) -> anyhow::Result<async_nats::ConnectOptions> {
        self.validate()?;
        let read = |path: &PathBuf, what: &str| read_secret(path, what);
        if let Some(user) = &self.user {
            let password = match (&self.password, &self.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(path)) => read(path, "password file")?,
                (None, None) => String::new(),
            };
            return Ok(async_nats::ConnectOptions::with_user_and_password(
                user.clone(),
                password,
            ));
        }
        if let Some(path) = &self.nkey_seed_file {
            return Ok(async_nats::ConnectOptions::with_nkey(read(
                path,
                "nkey seed file",
            )?));
        }
        if let Some(path) = &self.creds_file {
            return async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .with_context(|| {
                    format!("nats_auth: cannot read the creds file {}", path.display())
                });
        }
        Ok(async_nats::ConnectOptions::new())
    }
}

/// TLS to NATS (`nats_tls`): the CA that signed the servers' certificates, and the client
/// certificate to present when the servers verify clients (`tls { verify: true }`). A
/// `tls://` URL, or a server that requires TLS, upgrades the connection; with any of these set
/// every connection must be TLS. Nothing set and TLS still asked for: the system's roots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of the CA certificate(s) trusted for the servers (instead of the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM file of this service's client certificate (chain), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Start TLS before the server's `INFO` (servers with `handshake_first: true`).
    pub handshake_first: bool,
}

impl NatsTls {
    /// Whether anything is configured (then TLS is required).
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.handshake_first
    }

    /// The rustls client configuration these settings describe (files are read now); the
    /// errors name the file and what is wrong with it.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs = |path: &PathBuf, what: &str| -> anyhow::Result<Vec<CertificateDer<'static>>> {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("nats_tls: the {what} {}: {e}", path.display()))?;
            anyhow::ensure!(
                !certs.is_empty(),
                "nats_tls: the {what} {} holds no PEM certificate",
                path.display()
            );
            Ok(certs)
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in certs(path, "CA file")? {
                    roots.add(cert).map_err(|e| {
                        anyhow::anyhow!("nats_tls: the CA file {}: {e}", path.display())
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("nats_tls: TLS versions")?
            .with_root_certificates(roots);
        match (&self.cert_file, &self.key_file) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(cert), Some(key)) => {
                let chain = certs(cert, "certificate file")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    anyhow::anyhow!("nats_tls: the key file {}: {e}", key.display())
                })?;
                builder.with_client_auth_cert(chain, key).context(
                    "nats_tls: `cert_file` and `key_file` do not make a client certificate",
                )
            }
            _ => anyhow::bail!("nats_tls: `cert_file` and `key_file` go together"),
        }
    }

    /// `options` with these settings (unchanged when nothing is set: async-nats then does TLS
    /// with the system's roots where the URL or the server asks for it).
    pub fn apply(
        &self,
        options: async_nats::ConnectOptions,
    ) -> anyhow::Result<async_nats::ConnectOptions> {
        if !self.is_set() {
            return Ok(options);
        }
        let options = options
            .tls_client_config(self.client_config()?)
            .require_tls(true);
        Ok(if self.handshake_first {
            options.tls_first()
        } else {
            options
        })
    }
}

/// The contents of a file of `nats_auth` (a password, a seed, credentials) without its
/// trailing line breaks; the error names the file (`what`: "password file", ...), never its
/// contents.
pub fn read_secret(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
        .with_context(|| format!("nats_auth: cannot read the {what} {}", path.display()))
}

/// The inbox prefix of a service (`_INBOX.<service>`): its replies, JetStream acks and pull
/// deliveries arrive below it.
pub fn inbox_prefix(service: &str) -> String {
    format!("_INBOX.{service}")
}

/// Connects to the NATS server(s) of `url` as `service` (over TLS as `tls` says): the client
/// name that shows in
/// `nats server report connections`, and the inbox prefix [`inbox_prefix`]`(service)`.
pub async fn connect(
    url: &str,
    service: &str,
    auth: &NatsAuth,
    tls: &NatsTls,
) -> anyhow::Result<async_nats::Client> {
    tls.apply(auth.options().await?)?
        .name(service)
        .custom_inbox_prefix(inbox_prefix(service))
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(5))
        .connect(crate::nats_servers(url)?)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_method_and_a_password_needs_a_user() {
        assert!(NatsAuth::default().validate().is_ok());
        let user = NatsAuth {
            user: Some("gateway".into()),
            password: Some("pw".into()),
            ..Default::default()
        };
        assert!(user.validate().is_ok());
        let two = NatsAuth {
            creds_file: Some("/x.creds".into()),
            ..user.clone()
        };
        assert!(
            two.validate()
                .unwrap_err()
                .to_string()
                .contains("at most one")
        );
        let orphan = NatsAuth {
            password: Some("pw".into()),
            ..Default::default()
        };
        assert!(orphan.validate().is_err());
        let both = NatsAuth {
            password_file: Some("/pw".into()),
            ..user
        };
        assert!(both.validate().is_err());
    }

    #[test]
    fn debug_never_shows_the_password() {
        let auth = NatsAuth {
            user: Some("gateway".into()),
            password: Some("s3cret-pw".into()),
            ..Default::default()
        };
        let shown = format!("{auth:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn a_password_of_digits_from_the_environment_is_a_string() {
        use figment::providers::Format;
        #[derive(Deserialize, Serialize, Default)]
        #[serde(default)]
        struct C {
            nats_auth: NatsAuth,
        }
        let c: C = figment::Figment::from(figment::providers::Serialized::defaults(C::default()))
            .merge(figment::providers::Toml::string(
                "[nats_auth]\nuser = \"u\"\npassword = 123456\n",
            ))
            .extract()
            .unwrap();
        assert_eq!(c.nats_auth.password.as_deref(), Some("123456"));
    }

    #[tokio::test]
    async fn the_password_file_is_read_without_its_newline() {
        let file = tempfile_path();
        std::fs::write(&file, "from-file\n").unwrap();
        let auth = NatsAuth {
            user: Some("u".into()),
            password_file: Some(file.clone()),
            ..Default::default()
        };
        assert!(auth.options().await.is_ok());
        let _ = std::fs::remove_file(file);
        let missing = NatsAuth {
            nkey_seed_file: Some("/nonexistent/seed".into()),
            ..Default::default()
        };
        let err = missing.options().await.unwrap_err().to_string();
        assert!(err.contains("/nonexistent/seed"), "{err}");
    }

    use chat_testkit::tls::fixture as tls_fixture;

    #[test]
    fn tls_settings_load_or_name_the_file_and_the_fault() {
        assert!(!NatsTls::default().is_set());
        let good = NatsTls {
            ca_file: Some(tls_fixture("test-only-ca.pem")),
            cert_file: Some(tls_fixture("test-only-client.pem")),
            key_file: Some(tls_fixture("test-only-client-key.pem")),
            handshake_first: false,
        };
        assert!(good.is_set());
        assert!(
            good.client_config()
                .unwrap()
                .client_auth_cert_resolver
                .has_certs()
        );
        let fault = |tls: NatsTls| tls.client_config().unwrap_err().to_string();
        let err = fault(NatsTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        });
        assert!(err.contains("the CA file /nonexistent/ca.pem"), "{err}");
        // A key is not a certificate.
        let err = fault(NatsTls {
            ca_file: Some(tls_fixture("test-only-client-key.pem")),
            ..Default::default()
        });
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = fault(NatsTls {
            cert_file: good.cert_file.clone(),
            ..Default::default()
        });
        assert!(err.contains("go together"), "{err}");
        // The server's key with the client's certificate: not a pair.
        let err = fault(NatsTls {
            key_file: Some(tls_fixture("test-only-server-key.pem")),
            ..good.clone()
        });
        assert!(err.contains("do not make a client certificate"), "{err}");
    }

    fn tempfile_path() -> PathBuf {
        std::env::temp_dir().join(format!("chat-common-nats-auth-{}", std::process::id()))
    }
}
