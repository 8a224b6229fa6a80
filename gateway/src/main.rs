//! The gateway binary: config, signals and listeners; everything else is in the library.

use anyhow::Context;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    chat_common::service_main(
        "gateway",
        "CHAT_GATEWAY_",
        |config: chat_gateway::Config, shutdown| async move {
            // Refuse a bad config (auth keys, limits) before binding anything.
            config.validate().context("bad configuration")?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let admin = chat_common::bind_optional(&config.admin_listen).await?;
            chat_gateway::run(config, listener, admin, shutdown).await
        },
    )
    .await
}
