#[tokio::main]
async fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("migrate-store") {
        return migrate_store().await;
    }
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

/// `sequencer migrate-store [--config FILE]`: the store schema of the configuration the
/// service would run with (same file, same `CHAT_SEQUENCER_*` variables).
async fn migrate_store() -> std::process::ExitCode {
    chat_common::init_telemetry();
    let args: Vec<String> = std::env::args().skip(2).collect();
    let file = match args.as_slice() {
        [] => None,
        [flag, path] if flag == "--config" || flag == "-c" => Some(std::path::PathBuf::from(path)),
        _ => {
            eprintln!("sequencer: usage: sequencer migrate-store [--config FILE]");
            return std::process::ExitCode::from(2);
        }
    };
    let config: chat_sequencer::Config =
        match chat_common::config::load(file.as_deref(), "CHAT_SEQUENCER_") {
            Ok(config) => config,
            Err(err) => {
                eprintln!("sequencer: bad configuration: {err}");
                return std::process::ExitCode::from(2);
            }
        };
    match chat_sequencer::migrate_store(&config).await {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("sequencer: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
