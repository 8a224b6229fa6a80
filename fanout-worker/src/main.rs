use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    chat_common::init_telemetry();
    let config = match chat_common::config::config_path_from_args()
        .map_err(|e| e.to_string())
        .and_then(|path| {
            chat_common::config::load::<chat_fanout::Config>(path.as_deref(), "CHAT_FANOUT_")
                .map_err(|e| e.to_string())
        }) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("fanout-worker: bad configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let admin = match chat_common::bind_optional(&config.admin_listen).await {
        Ok(admin) => admin,
        Err(err) => {
            eprintln!("fanout-worker: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    match chat_fanout::run(config, admin, chat_common::shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fanout-worker: {err:#}");
            ExitCode::FAILURE
        }
    }
}
