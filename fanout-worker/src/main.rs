#[tokio::main]
async fn main() -> std::process::ExitCode {
    chat_common::service_main(
        "fanout-worker",
        "CHAT_FANOUT_",
        |config: chat_fanout::Config, shutdown| async move {
            let admin = chat_common::bind_optional(&config.admin_listen).await?;
            chat_fanout::run(config, admin, shutdown).await
        },
    )
    .await
}
