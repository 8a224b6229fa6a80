#[tokio::main]
async fn main() -> std::process::ExitCode {
    chat_common::service_main(
        "sequencer",
        "CHAT_SEQUENCER_",
        |config: chat_sequencer::Config, shutdown| async move {
            let admin = chat_common::bind_optional(&config.admin_listen).await?;
            chat_sequencer::run(config, admin, shutdown).await
        },
    )
    .await
}
