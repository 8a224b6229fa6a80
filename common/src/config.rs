//! Layered configuration: defaults, then an optional TOML file, then `<PREFIX>_...` environment
//! variables (`__` separates nesting levels). Unknown fields are rejected by the service's
//! config types (`#[serde(deny_unknown_fields)]`).

use std::path::Path;

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Serialize, de::DeserializeOwned};

/// Loads `T` from its defaults, `file` (if given) and env vars starting with `env_prefix`
/// (for example `CHAT_GATEWAY_`).
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    env_prefix: &str,
) -> Result<T, Box<figment::Error>> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        fig = fig.merge(Toml::file_exact(path));
    }
    fig.merge(Env::prefixed(env_prefix).split("__"))
        .extract()
        .map_err(Box::new)
}

/// Config file path from the first command-line argument `--config FILE` or `-c FILE`.
pub fn config_path_from_args() -> Result<Option<std::path::PathBuf>, String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok(None),
        (Some("--config" | "-c"), Some(path)) => Ok(Some(path.into())),
        (Some(other), _) => Err(format!(
            "unexpected argument `{other}`: usage: [--config FILE] (settings also come from env vars)"
        )),
    }
}
