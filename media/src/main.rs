//! The media service binary: config, signals and listeners; everything else is in the library.

use anyhow::Context;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    chat_common::service_main(
        "media",
        "CHAT_MEDIA_",
        |config: chat_media::Config, shutdown| async move {
            // Refuse a bad config (auth keys, limits) before binding anything.
            config.validate().context("bad configuration")?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let admin = chat_common::bind_optional(&config.admin_listen).await?;
            chat_media::run(config, listener, admin, shutdown).await
        },
    )
    .await
}
