//! The test-only TLS files of `testkit/fixtures/tls/` (its README says what each is) and the
//! nats-server `tls` block that uses them.

use std::path::PathBuf;

/// Path of a file of `testkit/fixtures/tls/`, e.g. `"test-only-ca.pem"`.
pub fn fixture(name: &str) -> PathBuf {
    crate::workspace_root()
        .join("testkit/fixtures/tls")
        .join(name)
}

/// nats-server configuration: TLS required with the test-only server certificate, and client
/// certificates signed by the test-only CA verified (`verify: true`); `extra` goes inside the
/// block (e.g. `handshake_first: true`). For [`crate::NatsServer::start_with_config`].
pub fn server_config(extra: &str) -> String {
    format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  {extra}\n}}\n",
        fixture("test-only-server.pem"),
        fixture("test-only-server-key.pem"),
        fixture("test-only-ca.pem"),
    )
}
