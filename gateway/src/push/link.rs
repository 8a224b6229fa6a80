//! The push connection's byte stream: plain TCP, or TLS over it once the server's `INFO` (or,
//! with `handshake_first`, the connect itself) asks for it.

use std::{
    io,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use async_nats::ServerAddr;
use chat_common::nats::NatsTls;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector, client::TlsStream, rustls::ClientConfig, rustls::pki_types::ServerName,
};

/// How the push connection does TLS: the gateway's `nats_tls`, read at startup.
#[derive(Clone)]
pub(crate) struct PushTls {
    settings: NatsTls,
    /// Built at startup when TLS is configured or a URL is `tls://`; otherwise the first time
    /// a server requires TLS (the system's roots, as async-nats does).
    config: Arc<OnceLock<Arc<ClientConfig>>>,
}

impl PushTls {
    /// Checks and loads `settings` now (a bad file stops the gateway at startup, not at the
    /// first connect) when they are set or some server of `servers` is `tls://`.
    pub(crate) fn load(settings: &NatsTls, servers: &[ServerAddr]) -> anyhow::Result<Self> {
        let tls = Self {
            settings: settings.clone(),
            config: Arc::default(),
        };
        if settings.is_set() || servers.iter().any(ServerAddr::tls_required) {
            tls.client_config()?;
        }
        Ok(tls)
    }

    pub(crate) fn handshake_first(&self) -> bool {
        self.settings.handshake_first
    }

    /// TLS is asked for by this side: `nats_tls` is set or the URL is `tls://`.
    pub(crate) fn wanted(&self, server: &ServerAddr) -> bool {
        self.settings.is_set() || server.tls_required()
    }

    fn client_config(&self) -> anyhow::Result<Arc<ClientConfig>> {
        if let Some(config) = self.config.get() {
            return Ok(config.clone());
        }
        let config = Arc::new(self.settings.client_config()?);
        Ok(self.config.get_or_init(|| config).clone())
    }
}

/// Whether a server's `INFO` says it accepts TLS (`tls_available`: TLS optional there).
pub(crate) fn offers_tls(info: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Tls {
        #[serde(default)]
        tls_required: bool,
        #[serde(default)]
        tls_available: bool,
    }
    serde_json::from_slice::<Tls>(info).is_ok_and(|t| t.tls_required || t.tls_available)
}

/// A connection to one server.
pub(crate) enum Link {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Link {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
    }

    /// Runs the TLS handshake over this TCP connection, verifying the server's certificate
    /// for the URL's host.
    pub(crate) async fn upgrade(self, tls: &PushTls, server: &ServerAddr) -> io::Result<Self> {
        let Link::Plain(tcp) = self else {
            return Ok(self);
        };
        let config = tls
            .client_config()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:#}")))?;
        let name = ServerName::try_from(server.host().to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a TLS server name: {e}", server.host()),
            )
        })?;
        let stream = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
        Ok(Link::Tls(Box::new(stream)))
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Link::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Link::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_flush(cx),
            Link::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Link::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
