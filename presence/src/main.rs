#[tokio::main]
async fn main() -> std::process::ExitCode {
    chat_common::service_main(
        "presence",
        "CHAT_PRESENCE_",
        |config: chat_presence::Config, shutdown| async move {
            let admin = chat_common::bind_optional(&config.admin_listen).await?;
            chat_presence::run(config, admin, shutdown).await
        },
    )
    .await
}
