//! The `chat` command line: arguments (clap derive) and one function per command.

use std::{io::BufRead, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use chat_protocol::{
    auth::{mint_dev_token, mint_dev_token_for_key},
    frames::{ErrorCode, ServerFrame},
    ids::{ConvId, DeviceId, UserId},
    jetstream::{self, Overrides, ProvisionError},
};
use clap::{Args, Parser, Subcommand};
use tokio::sync::mpsc;

use crate::{
    Client, ClientError, HistoryQuery, format,
    format::{error_line, message_line},
};

/// Default gateway WebSocket URL (the gateway's default listen address).
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080/ws";
/// Default HS256 development secret; `scripts/dev.sh` gives the gateway the same one.
pub const DEFAULT_SECRET: &str = "dev-secret-change-me";
/// Default NATS URL for `chat admin provision`.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Lifetime of the token minted for one run with `--as`.
const SESSION_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// Messages `/history` shows without a count.
const TALK_HISTORY_DEFAULT: u32 = 20;

const AFTER_HELP: &str = "\
Quick start (with ./scripts/dev.sh running):
  chat watch --as bob                      # terminal 1: bob sees every message
  chat send --as alice bob hello           # terminal 2: prints `sent to bob: seq 1`
  chat talk --as alice bob                 # interactive; /history [n], /quit
  chat history --as bob --with alice
  chat group create --as alice g~team --name Team bob carol
  chat send --as bob g~team hi all         # a group id instead of a user
  chat convs --as carol                    # conversations, unread counts
  chat token alice                         # a token for other clients (ws://...?token=...&device=...)

`--as USER` mints a development token signed with --secret; `--token` uses a given one.";

/// Terminal client for the chat backend.
#[derive(Debug, Parser)]
#[command(name = "chat", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The development secret tokens are minted with.
#[derive(Debug, Clone, Args)]
pub struct DevSecret {
    /// HS256 secret used to mint development tokens (the gateway's `auth.hs256_secret`)
    #[arg(
        long,
        env = "CHAT_DEV_SECRET",
        default_value = DEFAULT_SECRET,
        hide_env_values = true
    )]
    pub secret: String,
}

/// How the commands that talk to a gateway reach it, and as whom.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Gateway WebSocket URL
    #[arg(
        long,
        env = "CHAT_URL",
        default_value = DEFAULT_URL,
        hide_env_values = true
    )]
    pub url: String,
    /// Act as this user, with a development token minted from --secret
    #[arg(long = "as", value_name = "USER", value_parser = parse_user)]
    pub as_user: Option<UserId>,
    /// Access token (JWT) to use instead of --as
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub secret: DevSecret,
    /// Device id [default: random per run]
    #[arg(long, value_parser = parse_device)]
    pub device: Option<DeviceId>,
    /// Seconds to wait for the server's answers
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a development access token (HS256) for a user
    Token {
        /// The user the token names (its `sub`): a user id, 1-64 of [A-Za-z0-9_-]
        #[arg(value_parser = parse_user)]
        user: UserId,
        /// Lifetime in seconds
        #[arg(long, value_name = "SECS", default_value_t = SESSION_TOKEN_TTL_SECS)]
        ttl: u64,
        /// Key id for the token's header (`kid`): the gateway verifies it with its key of that
        /// id only. Needed when every key the gateway has carries a `kid` (key rotation)
        #[arg(long, value_name = "ID", value_parser = parse_kid)]
        kid: Option<String>,
        #[command(flatten)]
        secret: DevSecret,
    },
    /// Send one message to another user or a group and wait for its sequence number
    Send {
        /// Recipient: a user, or a group id (`g~<id>`)
        #[arg(value_parser = parse_target)]
        to: Target,
        /// Message text (several words are joined with spaces)
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        #[command(flatten)]
        global: Global,
    },
    /// Print every incoming message (and error) until Ctrl-C
    Watch {
        #[command(flatten)]
        global: Global,
    },
    /// Chat interactively with another user: each line you type is sent
    Talk {
        #[arg(value_parser = parse_user)]
        to: UserId,
        #[command(flatten)]
        global: Global,
    },
    /// Print a page of the conversation with another user or of a group
    History {
        /// The other user of the conversation, or a group id (`g~<id>`)
        #[arg(long, value_name = "USER|GROUP", value_parser = parse_target)]
        with: Target,
        /// Most messages to return (the server caps it)
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Only messages with a smaller seq (older)
        #[arg(long, value_name = "SEQ", conflicts_with = "after")]
        before: Option<u64>,
        /// Only messages with a larger seq (newer)
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        #[command(flatten)]
        global: Global,
    },
    /// Create and change groups
    #[command(subcommand)]
    Group(GroupCommand),
    /// List your conversations: groups and one-to-one, with unread counts
    Convs {
        #[command(flatten)]
        global: Global,
    },
    /// Whether users are online, or when they were last seen (only users you share a
    /// conversation with)
    Presence {
        #[arg(required = true, num_args = 1.., value_parser = parse_user)]
        users: Vec<UserId>,
        #[command(flatten)]
        global: Global,
    },
    /// Administration
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// A recipient: a user (the one-to-one conversation with it) or a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(UserId),
    Group(ConvId),
}

fn parse_target(s: &str) -> Result<Target, String> {
    if s.starts_with("g~") {
        return ConvId::parse(s)
            .map(Target::Group)
            .map_err(|e| e.to_string());
    }
    parse_user(s).map(Target::User)
}

fn parse_group(s: &str) -> Result<ConvId, String> {
    match ConvId::parse(s) {
        Ok(c) if c.is_group() => Ok(c),
        Ok(_) => Err("a group id looks like g~<id>".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group (you become its admin) with these other members
    Create {
        #[arg(value_parser = parse_group)]
        group: ConvId,
        #[arg(long)]
        name: String,
        #[arg(value_parser = parse_user)]
        members: Vec<UserId>,
        #[command(flatten)]
        global: Global,
    },
    /// Add members (admins only)
    Add {
        #[arg(value_parser = parse_group)]
        group: ConvId,
        #[arg(required = true, value_parser = parse_user)]
        members: Vec<UserId>,
        #[command(flatten)]
        global: Global,
    },
    /// Remove members (admins only)
    Remove {
        #[arg(value_parser = parse_group)]
        group: ConvId,
        #[arg(required = true, value_parser = parse_user)]
        members: Vec<UserId>,
        #[command(flatten)]
        global: Global,
    },
    /// Leave a group
    Leave {
        #[arg(value_parser = parse_group)]
        group: ConvId,
        #[command(flatten)]
        global: Global,
    },
    /// Rename a group
    Rename {
        #[arg(value_parser = parse_group)]
        group: ConvId,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        global: Global,
    },
    /// Make members admins (admins only)
    Promote {
        #[arg(value_parser = parse_group)]
        group: ConvId,
        #[arg(required = true, value_parser = parse_user)]
        members: Vec<UserId>,
        #[command(flatten)]
        global: Global,
    },
    /// Take the admin role from members (admins only)
    Demote {
        #[arg(value_parser = parse_group)]
        group: ConvId,
        #[arg(required = true, value_parser = parse_user)]
        members: Vec<UserId>,
        #[command(flatten)]
        global: Global,
    },
    /// Show a group's name and members
    Info {
        #[arg(value_parser = parse_group)]
        group: ConvId,
        #[command(flatten)]
        global: Global,
    },
}

/// How `chat admin` logs in to NATS (the `admin` user of `nats/auth.conf`); none: no
/// authentication (`nats/dev.conf`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsLogin {
    /// NATS user
    #[arg(long, env = "CHAT_NATS_USER")]
    pub nats_user: Option<String>,
    /// Password of --nats-user
    #[arg(long, env = "CHAT_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// A NATS .creds file (JWT and seed), instead of a user and password
    #[arg(long, env = "CHAT_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// TLS: PEM file of the CA that signed the NATS servers' certificates
    #[arg(long, env = "CHAT_NATS_CA", value_name = "FILE")]
    pub nats_ca: Option<std::path::PathBuf>,
    /// TLS: PEM client certificate, for servers that verify clients (with --nats-key)
    #[arg(
        long,
        env = "CHAT_NATS_CERT",
        value_name = "FILE",
        requires = "nats_key"
    )]
    pub nats_cert: Option<std::path::PathBuf>,
    /// TLS: PEM private key of --nats-cert
    #[arg(
        long,
        env = "CHAT_NATS_KEY",
        value_name = "FILE",
        requires = "nats_cert"
    )]
    pub nats_key: Option<std::path::PathBuf>,
}

impl NatsLogin {
    fn auth(&self) -> chat_common::nats::NatsAuth {
        chat_common::nats::NatsAuth {
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            creds_file: self.nats_creds.clone(),
            ..Default::default()
        }
    }

    fn tls(&self) -> chat_common::nats::NatsTls {
        chat_common::nats::NatsTls {
            ca_file: self.nats_ca.clone(),
            cert_file: self.nats_cert.clone(),
            key_file: self.nats_key.clone(),
            handshake_first: false,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create or update the JetStream streams and consumers declared in nats/
    Provision {
        /// NATS server URL
        #[arg(
            long,
            env = "CHAT_NATS_URL",
            default_value = DEFAULT_NATS_URL,
            hide_env_values = true
        )]
        nats: String,
        #[command(flatten)]
        login: NatsLogin,
        /// Override num_replicas of every stream and consumer (3 in production)
        #[arg(long, value_name = "N")]
        replicas: Option<u64>,
        /// Number of conversation partitions (a deployment choice; see nats/README.md)
        #[arg(long, value_name = "N", default_value_t = chat_protocol::subjects::DEFAULT_PARTITIONS,
              value_parser = clap::value_parser!(u32).range(1..=chat_protocol::subjects::MAX_PARTITIONS as i64))]
        partitions: u32,
    },
    /// Grow the partition count of a live system to a whole multiple of the current one,
    /// keeping every conversation's order (see nats/README.md)
    Repartition {
        /// NATS server URL
        #[arg(
            long,
            env = "CHAT_NATS_URL",
            default_value = DEFAULT_NATS_URL,
            hide_env_values = true
        )]
        nats: String,
        #[command(flatten)]
        login: NatsLogin,
        /// The new partition count
        #[arg(long, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=chat_protocol::subjects::MAX_PARTITIONS as i64))]
        partitions: u32,
        /// num_replicas of the new consumers (as the streams')
        #[arg(long, value_name = "N")]
        replicas: Option<u64>,
    },
    /// Write the stream and consumer files for a partition count (for the nats CLI)
    Render {
        /// Directory to write streams/ and consumers/ into (e.g. nats)
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Number of conversation partitions
        #[arg(long, value_name = "N", default_value_t = chat_protocol::subjects::DEFAULT_PARTITIONS,
              value_parser = clap::value_parser!(u32).range(1..=chat_protocol::subjects::MAX_PARTITIONS as i64))]
        partitions: u32,
    },
}

fn parse_user(s: &str) -> Result<UserId, String> {
    UserId::parse(s).map_err(|e| e.to_string())
}

fn parse_kid(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("an empty key id: leave --kid out instead".into());
    }
    Ok(s.to_owned())
}

fn parse_device(s: &str) -> Result<DeviceId, String> {
    DeviceId::parse(s).map_err(|e| e.to_string())
}

impl Global {
    /// The token to connect with: minted for `--as` if given, else `--token`.
    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(user) = &self.as_user {
            return Ok(mint_dev_token(
                self.secret.secret.as_bytes(),
                user,
                SESSION_TOKEN_TTL_SECS,
            ));
        }
        match &self.token {
            Some(token) => Ok(token.clone()),
            None => bail!(
                "who are you? give --as <user> (mints a development token) or --token <jwt> (env CHAT_TOKEN)"
            ),
        }
    }

    /// The options a printed hint must repeat so that, copied as printed, it reaches the same
    /// gateway: `--url` when it was given on the command line (not the default, not from
    /// `CHAT_URL`, which the copied command picks up again). Secrets and tokens are never
    /// printed.
    fn repeated_options(&self) -> String {
        let from_env = std::env::var("CHAT_URL").is_ok_and(|u| u == self.url);
        if self.url == DEFAULT_URL || from_env {
            String::new()
        } else {
            format!(" --url {}", self.url)
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        let token = self.token()?;
        let device = self
            .device
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(crate::new_device_id);
        let client = Client::connect(&self.url, &token, &device).await?;
        if let Some(me) = &self.as_user
            && client.user() != me
        {
            bail!(
                "the gateway says this token is for {}, not {me}",
                client.user()
            );
        }
        Ok(client)
    }
}

/// Runs the parsed command line; errors are printed as `chat: error: ...` with exit code 1.
pub async fn run(cli: Cli) -> ExitCode {
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chat: error: {}", error_text(&err));
            if let Some(ClientError::Connect { url, .. }) = err.downcast_ref::<ClientError>() {
                eprintln!(
                    "chat: hint: is a gateway listening at {url}? ./scripts/dev.sh starts one; --url (env CHAT_URL) points elsewhere"
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, skipping causes whose text the line already holds
/// (several error types repeat their source in their own message).
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let s = cause.to_string();
        if text.contains(&s) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Token {
            user,
            ttl,
            kid,
            secret,
        } => {
            let secret = secret.secret.as_bytes();
            println!(
                "{}",
                mint_dev_token_for_key(secret, kid.as_deref(), &user, ttl)
            );
            Ok(())
        }
        Command::Send { to, text, global } => send(&global, &to, &text.join(" ")).await,
        Command::Group(command) => group(command).await,
        Command::Convs { global } => convs(&global).await,
        Command::Presence { users, global } => presence(&global, &users).await,
        Command::Watch { global } => watch(&global).await,
        Command::Talk { to, global } => talk(&global, &to).await,
        Command::History {
            with,
            limit,
            before,
            after,
            global,
        } => {
            history(
                &global,
                &with,
                HistoryQuery {
                    before,
                    after,
                    limit,
                },
            )
            .await
        }
        Command::Admin(AdminCommand::Provision {
            nats,
            login,
            replicas,
            partitions,
        }) => provision(&nats, &login, replicas, partitions).await,
        Command::Admin(AdminCommand::Render { out, partitions }) => render(&out, partitions),
        Command::Admin(AdminCommand::Repartition {
            nats,
            login,
            partitions,
            replicas,
        }) => repartition(&nats, &login, partitions, replicas).await,
    }
}

fn conversation(me: &UserId, other: &UserId) -> anyhow::Result<ConvId> {
    if me == other {
        bail!("{me} cannot start a conversation with itself; name another user");
    }
    ConvId::direct(me, other).with_context(|| format!("no conversation between {me} and {other}"))
}

/// The conversation a target names, for the connected user.
fn target_conv(me: &UserId, to: &Target) -> anyhow::Result<ConvId> {
    match to {
        Target::User(user) => conversation(me, user),
        Target::Group(conv) => Ok(conv.clone()),
    }
}

fn target_name(to: &Target) -> String {
    match to {
        Target::User(u) => u.to_string(),
        Target::Group(c) => c.to_string(),
    }
}

async fn send(g: &Global, to: &Target, text: &str) -> anyhow::Result<()> {
    if let (Some(me), Target::User(user)) = (g.as_user.as_ref(), to)
        && me == user
    {
        conversation(me, user)?;
    }
    let mut client = g.connect().await?;
    let conv = target_conv(client.user(), to)?;
    let m = client.send_and_wait(&conv, text, g.timeout()).await?;
    println!("sent to {}: seq {}", target_name(to), m.seq);
    client.close().await;
    Ok(())
}

async fn group(command: GroupCommand) -> anyhow::Result<()> {
    use chat_protocol::frames::GroupOp;
    let (op, conv, name, members, g) = match command {
        GroupCommand::Info { group, global } => return group_info(&global, &group).await,
        GroupCommand::Create {
            group,
            name,
            members,
            global,
        } => (GroupOp::Create, group, Some(name), members, global),
        GroupCommand::Add {
            group,
            members,
            global,
        } => (GroupOp::Add, group, None, members, global),
        GroupCommand::Remove {
            group,
            members,
            global,
        } => (GroupOp::Remove, group, None, members, global),
        GroupCommand::Leave { group, global } => (GroupOp::Leave, group, None, vec![], global),
        GroupCommand::Rename {
            group,
            name,
            global,
        } => (GroupOp::Rename, group, Some(name), vec![], global),
        GroupCommand::Promote {
            group,
            members,
            global,
        } => (GroupOp::Promote, group, None, members, global),
        GroupCommand::Demote {
            group,
            members,
            global,
        } => (GroupOp::Demote, group, None, members, global),
    };
    let g = &g;
    let mut client = g.connect().await?;
    let m = client
        .group_and_wait(op, &conv, name.as_deref(), &members, g.timeout())
        .await?;
    println!("{}", message_line(&m));
    client.close().await;
    Ok(())
}

async fn group_info(g: &Global, conv: &ConvId) -> anyhow::Result<()> {
    let mut client = g.connect().await?;
    let (name, members, seq) = client
        .request(
            "the group's members",
            g.timeout(),
            |req| chat_protocol::frames::ClientFrame::GroupInfo {
                req,
                conv: conv.to_string(),
            },
            |req, f| match f {
                ServerFrame::GroupInfo {
                    req: r,
                    name,
                    members,
                    seq,
                    ..
                } if r == req => Some((name.clone(), members.clone(), *seq)),
                _ => None,
            },
        )
        .await?;
    println!(
        "{} \"{}\": {} members (as of #{seq})",
        conv,
        format::terminal_safe(&name),
        members.len()
    );
    for m in members {
        let role = if m.admin { " (admin)" } else { "" };
        println!("  {}{role}, since #{}", m.user, m.joined);
    }
    client.close().await;
    Ok(())
}

async fn presence(g: &Global, users: &[UserId]) -> anyhow::Result<()> {
    let mut client = g.connect().await?;
    let asked: Vec<String> = users.iter().map(UserId::to_string).collect();
    let states = client
        .request(
            "the presence answer",
            g.timeout(),
            |req| chat_protocol::frames::ClientFrame::Presence {
                req,
                users: asked.clone(),
            },
            |req, f| match f {
                ServerFrame::Presence {
                    req: Some(r),
                    users,
                } if r == req => Some(users.clone()),
                _ => None,
            },
        )
        .await?;
    for user in &asked {
        match states.iter().find(|s| &s.user == user) {
            Some(s) => println!("{}", format::presence_line(s)),
            None => println!("{user}: unknown (no conversation shared)"),
        }
    }
    client.close().await;
    Ok(())
}

async fn convs(g: &Global) -> anyhow::Result<()> {
    let mut client = g.connect().await?;
    let mut after = None;
    loop {
        let (convs, next) = client
            .request(
                "the conversation list",
                g.timeout(),
                |req| chat_protocol::frames::ClientFrame::Conversations {
                    req,
                    after: after.clone(),
                    limit: None,
                },
                |req, f| match f {
                    ServerFrame::Conversations {
                        req: r,
                        convs,
                        next,
                        ..
                    } if r == req => Some((convs.clone(), next.clone())),
                    _ => None,
                },
            )
            .await?;
        for c in &convs {
            println!("{}", format::conversation_line(c));
        }
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    client.close().await;
    Ok(())
}

/// How often watch and talk send an application `ping`, so that idle connections stay alive
/// through proxies and heartbeat checks.
fn keepalive_period(client: &Client) -> Duration {
    match client.session().heartbeat_ms {
        0 => Duration::from_secs(15),
        ms => Duration::from_millis((ms / 2).max(1000)),
    }
}

/// Prints one incoming frame the way watch and talk show it.
fn print_frame(frame: &ServerFrame) {
    match frame {
        ServerFrame::Message(m) => println!("{}", message_line(m)),
        ServerFrame::Error(e) => println!("{}", error_line(e)),
        ServerFrame::History { messages, more, .. } => {
            if messages.is_empty() {
                println!("(no messages)");
            }
            for m in messages {
                println!("{}", message_line(m));
            }
            if *more {
                println!("(there are more)");
            }
        }
        ServerFrame::Receipt(r) => println!(
            "[{}] {} has up to #{} (read up to #{})",
            r.conv, r.user, r.delivered, r.read
        ),
        ServerFrame::Typing {
            conv,
            user,
            active: true,
            ..
        } => println!("[{conv}] {user} is typing"),
        ServerFrame::Presence { users, .. } => {
            for p in users {
                let state = if p.online { "online" } else { "offline" };
                println!("{} is {state}", p.user);
            }
        }
        ServerFrame::Hello { .. }
        | ServerFrame::Sent { .. }
        | ServerFrame::Sync { .. }
        | ServerFrame::Receipts { .. }
        | ServerFrame::Conversations { .. }
        | ServerFrame::GroupInfo { .. }
        | ServerFrame::PresenceSettings { .. }
        | ServerFrame::Typing { .. }
        | ServerFrame::Pong => {}
    }
}

/// Handles a receive error in watch or talk: fatal ones end the command.
fn on_receive_error(err: ClientError) -> anyhow::Result<()> {
    if err.is_fatal() {
        return Err(err.into());
    }
    eprintln!("chat: warning: {err}");
    Ok(())
}

async fn watch(g: &Global) -> anyhow::Result<()> {
    let mut client = g.connect().await?;
    let s = client.session();
    eprintln!(
        "watching as {} (device {}); Ctrl-C to stop",
        s.user, s.device
    );
    let period = keepalive_period(&client);
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            frame = client.recv() => match frame {
                Ok(frame) => print_frame(&frame),
                Err(err) => on_receive_error(err)?,
            },
            _ = keepalive.tick() => client.ping().await?,
            _ = &mut ctrl_c => break,
        }
    }
    client.close().await;
    Ok(())
}

/// One line typed in `chat talk`.
#[derive(Debug, PartialEq, Eq)]
pub enum TalkInput {
    Send(String),
    History(u32),
    Quit,
    Help,
    Nothing,
}

/// Reads one typed line: `/history [n]`, `/quit`, `/help`, or text to send.
pub fn parse_talk_line(line: &str) -> TalkInput {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return TalkInput::Nothing;
    }
    let Some(cmd) = line.strip_prefix('/') else {
        return TalkInput::Send(line.to_owned());
    };
    let mut words = cmd.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("quit" | "q" | "exit"), None, _) => TalkInput::Quit,
        (Some("history" | "h"), None, _) => TalkInput::History(TALK_HISTORY_DEFAULT),
        (Some("history" | "h"), Some(n), None) => match n.parse() {
            Ok(n) if n > 0 => TalkInput::History(n),
            _ => TalkInput::Help,
        },
        // `//text` sends `/text`.
        _ if cmd.starts_with('/') => TalkInput::Send(cmd.to_owned()),
        _ => TalkInput::Help,
    }
}

const TALK_HELP: &str =
    "type a line and Enter to send it; /history [n] shows the last n messages; /quit (or EOF) ends";

/// Lines of stdin, read on a plain thread: a blocking read cannot be cancelled, and a tokio
/// blocking task would hold up the runtime's shutdown until the user pressed Enter.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn talk(g: &Global, to: &UserId) -> anyhow::Result<()> {
    if g.as_user.as_ref() == Some(to) {
        conversation(to, to)?;
    }
    let mut client = g.connect().await?;
    let me = client.user().clone();
    let conv = conversation(&me, to)?;
    eprintln!(
        "talking to {to} in {conv} as {me} (device {}); {TALK_HELP}",
        client.session().device
    );
    let mut lines = stdin_lines();
    // Sends whose stamped message has not come back yet: client id -> body (for retries).
    let mut unconfirmed = std::collections::HashMap::new();
    // History requests not answered yet.
    let mut pending_history = std::collections::HashSet::new();
    // Set once input ended: wait for the unconfirmed sends and pending history until then.
    let mut draining: Option<tokio::time::Instant> = None;
    let period = keepalive_period(&client);
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if draining.is_some() && unconfirmed.is_empty() && pending_history.is_empty() {
            break;
        }
        let drain_deadline = draining.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            line = lines.recv(), if draining.is_none() => match line.as_deref().map(parse_talk_line) {
                None | Some(TalkInput::Quit) => {
                    draining = Some(tokio::time::Instant::now() + g.timeout());
                }
                Some(TalkInput::Send(text)) => {
                    let id = client.send(&conv, &text).await?;
                    unconfirmed.insert(id, text);
                }
                Some(TalkInput::History(n)) => {
                    let req = client
                        .history(&conv, HistoryQuery { limit: Some(n), ..Default::default() })
                        .await?;
                    pending_history.insert(req);
                }
                Some(TalkInput::Help) => eprintln!("{TALK_HELP}"),
                Some(TalkInput::Nothing) => {}
            },
            frame = client.recv() => match frame {
                Ok(ServerFrame::Error(e))
                    if e.code == ErrorCode::RateLimited
                        && e.id.as_ref().is_some_and(|id| unconfirmed.contains_key(id)) =>
                {
                    // Typing (or pasting) faster than the rate limit: retry the same id, as the
                    // protocol asks, instead of dropping the line.
                    let id = e.id.unwrap_or_default();
                    let wait = Duration::from_millis(e.retry_after_ms.unwrap_or(500).clamp(50, 5000));
                    tokio::time::sleep(wait).await;
                    client.send_with_id(&conv, &id, &unconfirmed[&id]).await?;
                }
                Ok(frame) => {
                    match &frame {
                        ServerFrame::Message(m) if m.from == me.as_str() => {
                            unconfirmed.remove(&m.id);
                        }
                        ServerFrame::Error(e) => {
                            if let Some(id) = &e.id {
                                unconfirmed.remove(id);
                            }
                            if let Some(req) = &e.req {
                                pending_history.remove(req);
                            }
                        }
                        ServerFrame::History { req, .. } => {
                            pending_history.remove(req);
                        }
                        _ => {}
                    }
                    print_frame(&frame);
                }
                Err(err) => on_receive_error(err)?,
            },
            _ = keepalive.tick() => client.ping().await?,
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep_until(drain_deadline), if draining.is_some() => {
                bail!(
                    "{} message(s) and {} history request(s) not answered within {}s",
                    unconfirmed.len(),
                    pending_history.len(),
                    g.timeout
                );
            }
        }
    }
    client.close().await;
    Ok(())
}

async fn history(g: &Global, with: &Target, query: HistoryQuery) -> anyhow::Result<()> {
    let mut client = g.connect().await?;
    let conv = target_conv(&client.user().clone(), with)?;
    let with = target_name(with);
    let page = client.fetch_history(&conv, query, g.timeout()).await?;
    if page.messages.is_empty() {
        eprintln!("(no messages)");
    }
    for m in &page.messages {
        println!("{}", message_line(m));
    }
    if page.more
        && let (Some(first), Some(last)) = (page.messages.first(), page.messages.last())
    {
        let hint = if query.after.is_some() {
            format!("--after {}", last.seq)
        } else {
            format!("--before {}", first.seq)
        };
        eprintln!(
            "(more messages: chat history --as {} --with {with} {hint}{})",
            client.user(),
            g.repeated_options()
        );
    }
    client.close().await;
    Ok(())
}

/// Writes every definition for `partitions` under `out`, replacing the partition consumers of
/// another count.
fn render(out: &std::path::Path, partitions: u32) -> anyhow::Result<()> {
    let defs: Vec<_> = jetstream::streams(partitions)
        .into_iter()
        .chain(jetstream::consumers(partitions))
        .collect();
    for dir in ["consumers/CHAT_IN", "consumers/CHAT_MSGS"] {
        let dir = out.join(dir);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".json")
                    && (name.starts_with("seq-p") || name.starts_with("fanout-"))
                {
                    std::fs::remove_file(entry.path())
                        .with_context(|| format!("cannot remove {}", entry.path().display()))?;
                }
            }
        }
    }
    for def in &defs {
        let path = out.join(&def.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, jetstream::render(def))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "wrote {} definitions for {partitions} partitions under {}",
        defs.len(),
        out.display()
    );
    Ok(())
}

async fn admin_client(nats: &str, login: &NatsLogin) -> anyhow::Result<async_nats::Client> {
    let options = login.auth().options().await?;
    login
        .tls()
        .apply(options)?
        .name("chat-admin")
        .connection_timeout(Duration::from_secs(5))
        .connect(chat_common::nats_servers(nats)?)
        .await
        .with_context(|| format!("cannot connect to NATS at {nats}"))
}

async fn repartition(
    nats: &str,
    login: &NatsLogin,
    partitions: u32,
    replicas: Option<u64>,
) -> anyhow::Result<()> {
    let client = admin_client(nats, login).await?;
    let overrides = Overrides {
        num_replicas: replicas,
        partitions: Some(partitions),
    };
    jetstream::repartition(&client, partitions, &overrides, |step| println!("{step}"))
        .await
        .context("repartitioning failed")?;
    client.flush().await.ok();
    Ok(())
}

async fn provision(
    nats: &str,
    login: &NatsLogin,
    replicas: Option<u64>,
    partitions: u32,
) -> anyhow::Result<()> {
    let client = admin_client(nats, login).await?;
    let overrides = Overrides {
        num_replicas: replicas,
        partitions: Some(partitions),
    };
    let report = match jetstream::provision_all(&client, &overrides).await {
        Ok(report) => report,
        Err(err @ ProvisionError::Request { .. }) => {
            return Err(anyhow::Error::new(err).context(
                "provisioning failed (is JetStream enabled on this server? nats-server needs -js or a jetstream block)",
            ));
        }
        Err(err) => return Err(anyhow::Error::new(err).context("provisioning failed")),
    };
    for (path, outcome) in &report {
        println!("{}", format::outcome_line(path, outcome));
    }
    client.flush().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("chat").chain(args.iter().copied()))
    }

    #[test]
    fn send_takes_the_recipient_and_joins_the_words() {
        let cli = parse(&["send", "--as", "alice", "bob", "hello", "world"]).unwrap();
        match cli.command {
            Command::Send { to, text, global } => {
                assert_eq!(global.as_user.unwrap().as_str(), "alice");
                assert_eq!(target_name(&to), "bob");
                assert_eq!(text.join(" "), "hello world");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_group_id_is_a_recipient_and_group_commands_check_ids() {
        let cli = parse(&["send", "--as", "bob", "g~team", "hi"]).unwrap();
        match cli.command {
            Command::Send { to, .. } => {
                assert_eq!(to, Target::Group(ConvId::parse("g~team").unwrap()));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["send", "--as", "bob", "g~a.b", "hi"]).is_err());
        let cli = parse(&["group", "create", "g~team", "--name", "T", "bob", "carol"]).unwrap();
        match cli.command {
            Command::Group(GroupCommand::Create { members, name, .. }) => {
                assert_eq!((members.len(), name.as_str()), (2, "T"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            parse(&["group", "add", "g~team"]).is_err(),
            "members required"
        );
        assert!(parse(&["group", "leave", "dm~a~b"]).is_err(), "not a group");
        assert!(parse(&["convs"]).is_ok());
    }

    fn global_of(cli: Cli) -> Global {
        match cli.command {
            Command::Watch { global } | Command::Convs { global } => global,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connection_options_belong_to_the_commands_that_connect() {
        let g = global_of(parse(&["watch", "--as", "alice", "--url", "ws://h:1/ws"]).unwrap());
        assert_eq!(g.url, "ws://h:1/ws");
        assert_eq!(g.as_user.unwrap().as_str(), "alice");
        let g = global_of(
            parse(&[
                "watch",
                "--as",
                "bob",
                "--device",
                "phone",
                "--timeout",
                "3",
            ])
            .unwrap(),
        );
        assert_eq!(g.device.unwrap().as_str(), "phone");
        assert_eq!(g.timeout, 3);
        // `token` only mints: it takes a secret and a lifetime, nothing about a gateway.
        assert!(parse(&["token", "alice", "--secret", "s", "--ttl", "60"]).is_ok());
        for extra in ["--url", "--as", "--device", "--timeout", "--token"] {
            assert!(
                parse(&["token", "alice", extra, "x"]).is_err(),
                "token must not take {extra}"
            );
        }
        // Admin commands talk to NATS, not to a gateway.
        assert!(parse(&["admin", "provision", "--as", "alice"]).is_err());
    }

    #[test]
    fn help_shows_each_command_only_its_own_options() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let token = cmd.find_subcommand_mut("token").unwrap();
        let help = token.render_long_help().to_string();
        assert!(help.contains("<USER>") && help.contains("The user the token names"));
        for absent in ["--url", "--as", "--device", "--timeout"] {
            assert!(!help.contains(absent), "token help lists {absent}:\n{help}");
        }
        let mut cmd = Cli::command();
        let render = cmd
            .find_subcommand_mut("admin")
            .unwrap()
            .find_subcommand_mut("render")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(!render.contains("--url") && !render.contains("--secret"));
    }

    #[test]
    fn a_hint_repeats_a_url_given_on_the_command_line() {
        let g = global_of(parse(&["watch", "--url", "ws://h:1/ws"]).unwrap());
        if std::env::var("CHAT_URL").is_err() {
            assert_eq!(g.repeated_options(), " --url ws://h:1/ws");
        }
        let g = global_of(parse(&["watch", "--url", DEFAULT_URL]).unwrap());
        assert_eq!(g.repeated_options(), "");
    }

    #[test]
    fn ids_are_validated_while_parsing() {
        assert!(parse(&["send", "--as", "al.ice", "bob", "x"]).is_err());
        assert!(parse(&["send", "--as", "alice", "b*", "x"]).is_err());
        assert!(
            parse(&["send", "--as", "alice", "bob"]).is_err(),
            "text is required"
        );
        assert!(parse(&["watch", "--device", "a b"]).is_err());
        assert!(parse(&["talk", "--as", "alice", ">"]).is_err());
    }

    #[test]
    fn history_takes_either_before_or_after() {
        let cli = parse(&[
            "history", "--as", "alice", "--with", "bob", "--limit", "5", "--before", "9",
        ])
        .unwrap();
        match cli.command {
            Command::History {
                with,
                limit,
                before,
                after,
                ..
            } => {
                assert_eq!(target_name(&with), "bob");
                assert_eq!((limit, before, after), (Some(5), Some(9), None));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["history", "--with", "bob", "--before", "1", "--after", "2"]).is_err());
        assert!(parse(&["history"]).is_err(), "--with is required");
    }

    #[test]
    fn admin_provision_has_defaults() {
        let cli = parse(&["admin", "provision"]).unwrap();
        match cli.command {
            Command::Admin(AdminCommand::Provision {
                nats,
                replicas,
                partitions,
                ..
            }) => {
                // CHAT_NATS_URL may be set in the environment running the tests.
                assert!(!nats.is_empty());
                assert_eq!(replicas, None);
                assert_eq!(partitions, chat_protocol::subjects::DEFAULT_PARTITIONS);
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&[
            "admin",
            "provision",
            "--nats",
            "nats://x:1",
            "--replicas",
            "3",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Admin(AdminCommand::Provision { ref nats, replicas: Some(3), .. }) if nats == "nats://x:1"
        ));
    }

    #[test]
    fn token_minted_for_as_wins_over_a_given_token() {
        let cli = parse(&[
            "watch", "--as", "alice", "--token", "given", "--secret", "s1",
        ])
        .unwrap();
        let token = global_of(cli).token().unwrap();
        let (user, _) = chat_protocol::auth::TokenVerifier::hs256(b"s1")
            .verify(&token)
            .unwrap();
        assert_eq!(user.as_str(), "alice");
        let cli = parse(&["watch", "--token", "given"]).unwrap();
        assert_eq!(global_of(cli).token().unwrap(), "given");
    }

    #[test]
    fn token_kid_selects_the_gateway_key_of_that_id() {
        use chat_protocol::auth::{TokenError, TokenVerifier, VerifyKey};
        let cli = parse(&["token", "alice", "--kid", "k2", "--secret", "new"]).unwrap();
        let Command::Token {
            user, kid, secret, ..
        } = cli.command
        else {
            panic!("not a token command");
        };
        let token = mint_dev_token_for_key(secret.secret.as_bytes(), kid.as_deref(), &user, 60);
        // A gateway in the middle of a rotation: the old secret as k1, the new one as k2.
        let keys = vec![
            VerifyKey::hs256(Some("k1".into()), b"old"),
            VerifyKey::hs256(Some("k2".into()), b"new"),
        ];
        let verifier = TokenVerifier::new(keys, 0).unwrap();
        assert_eq!(verifier.verify(&token).unwrap().0.as_str(), "alice");
        // Without --kid that gateway cannot tell which key to use.
        let bare = mint_dev_token(b"new", &user, 60);
        assert!(matches!(
            verifier.verify(&bare),
            Err(TokenError::MissingKid)
        ));
        let err = parse(&["token", "alice", "--kid", ""]).unwrap_err();
        assert!(err.to_string().contains("empty key id"), "{err}");
    }

    #[test]
    fn error_text_does_not_repeat_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = anyhow::Error::new(io).context("cannot connect: refused");
        assert_eq!(error_text(&err), "cannot connect: refused");
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_text(&err), "outer: inner");
    }

    #[test]
    fn talk_lines() {
        assert_eq!(
            parse_talk_line("hi there"),
            TalkInput::Send("hi there".into())
        );
        assert_eq!(parse_talk_line("hi\r"), TalkInput::Send("hi".into()));
        assert_eq!(parse_talk_line("   "), TalkInput::Nothing);
        assert_eq!(parse_talk_line("/quit"), TalkInput::Quit);
        assert_eq!(
            parse_talk_line("/history"),
            TalkInput::History(TALK_HISTORY_DEFAULT)
        );
        assert_eq!(parse_talk_line("/history 5"), TalkInput::History(5));
        assert_eq!(parse_talk_line("/history x"), TalkInput::Help);
        assert_eq!(parse_talk_line("/history 0"), TalkInput::Help);
        assert_eq!(parse_talk_line("/dance"), TalkInput::Help);
        assert_eq!(parse_talk_line("//shrug"), TalkInput::Send("/shrug".into()));
    }

    #[test]
    fn no_conversation_with_oneself() {
        let a = UserId::parse("alice").unwrap();
        let b = UserId::parse("bob").unwrap();
        assert_eq!(conversation(&b, &a).unwrap().as_str(), "dm~alice~bob");
        assert!(conversation(&a, &a).is_err());
    }
}
