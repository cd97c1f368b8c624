//! Option haggling (fixed newstyle): one option at a time until the client
//! picks an export with GO or EXPORT_NAME, or leaves, or upgrades to TLS.
//!
//! STARTTLS (when TLS is configured and the link can take it) is ACKed here and
//! returned as [`Haggled::StartTls`]: the caller upgrades the socket in place
//! (`starttls`) and runs the haggling again over TLS, without the greeting
//! and with everything negotiated before forgotten, as the spec requires.
//! Under `tls = "require"` a plain TCP client gets `NBD_REP_ERR_TLS_REQD` for
//! every option but STARTTLS and ABORT (EXPORT_NAME, which cannot be
//! refused, ends the connection). A disk with an `allow` list is hidden from
//! LIST and refused to GO / INFO / EXPORT_NAME unless the TLS peer's identity
//! is on it.

use super::*;

/// The client's side of the socket, while options are haggled over.
type Rd<'a> = &'a mut (dyn AsyncRead + Unpin + Send);
/// The server's side.
type Wr<'a> = &'a mut (dyn AsyncWrite + Unpin + Send);

async fn send(wr: Wr<'_>, out: &[u8]) -> std::io::Result<()> {
    wr.write_all(out).await?;
    wr.flush().await
}

async fn send_reply(wr: Wr<'_>, option: u32, reply: OptionReply<'_>) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(nbd_proto::OPTION_REPLY_HEADER_LEN + reply.data_len());
    reply.emit(option, &mut out);
    send(wr, &out).await
}

/// Ends the replies in `out` with the ACK and sends them.
async fn send_acked(wr: Wr<'_>, option: u32, mut out: BytesMut) -> std::io::Result<()> {
    OptionReply::Ack.emit(option, &mut out);
    send(wr, &out).await
}

/// Sends an error reply (`rep::ERR_*`) with a message.
async fn refuse(wr: Wr<'_>, option: u32, reply: u32, message: &str) -> std::io::Result<()> {
    let message = message.as_bytes();
    send_reply(wr, option, OptionReply::Error { reply, message }).await
}

/// Reads and throws away `n` bytes (an oversized option's data).
async fn discard(rd: Rd<'_>, mut n: u64) -> std::io::Result<()> {
    let mut sink = vec![0u8; 64 * 1024];
    while n > 0 {
        let k = n.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// What the handshake runs over.
pub(super) enum Link {
    /// A plain connection, before the greeting.
    Plain {
        /// STARTTLS is possible (TLS configured, not stdin/stdout).
        upgradable: bool,
        /// `tls = "require"` applies (a TCP connection).
        required: bool,
    },
    /// A TLS connection after STARTTLS.
    Tls {
        /// Who the peer proved to be.
        peer: crate::tls::PeerId,
        /// The client's NO_ZEROES flag, from the greeting before STARTTLS.
        no_zeroes: bool,
    },
}

/// How option haggling ended.
pub(super) enum Haggled {
    /// The client aborted (or the server is shutting down while the client
    /// idles in negotiation).
    Abort,
    /// An export was chosen.
    Session(Session),
    /// STARTTLS was ACKed: the socket is to be upgraded now.
    StartTls {
        /// The client's NO_ZEROES flag.
        no_zeroes: bool,
    },
}

/// Whether the peer may open `export`: `Err((reply, message))` if not. A
/// refusal is counted here.
fn access(
    ctx: &Ctx,
    link: &Link,
    export: &str,
    plain_counted: &mut bool,
) -> Result<(), (u32, String)> {
    if !ctx.tls.restricted(export) {
        return Ok(());
    }
    match link {
        Link::Plain { .. } => {
            if !std::mem::replace(plain_counted, true) {
                ctx.stats.tls_plain_refused.fetch_add(1, Ordering::Relaxed);
            }
            Err((rep::ERR_TLS_REQD, format!("export `{export}` requires TLS")))
        }
        Link::Tls { peer, .. } if ctx.tls.allowed(export, peer) => Ok(()),
        Link::Tls { peer, .. } => {
            ctx.stats.tls_allow_refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(export, %peer, "refused by the export's allow list");
            Err((
                rep::ERR_POLICY,
                format!("{peer} may not open export `{export}`"),
            ))
        }
    }
}

/// Option haggling over `link`.
pub(super) async fn handshake(
    ctx: &Ctx,
    rd: Rd<'_>,
    wr: Wr<'_>,
    link: &Link,
) -> Result<Haggled, ConnError> {
    let no_zeroes = match link {
        Link::Tls { no_zeroes, .. } => *no_zeroes,
        Link::Plain { .. } => {
            let mut hello = BytesMut::with_capacity(nbd_proto::HELLO_LEN);
            Hello {
                flags: nbd_proto::FLAG_FIXED_NEWSTYLE | nbd_proto::FLAG_NO_ZEROES,
            }
            .emit(&mut hello);
            send(wr, &hello).await?;

            let mut cflags = [0u8; ClientFlags::LEN];
            rd.read_exact(&mut cflags).await?;
            ClientFlags::parse(&cflags)
                .map_err(|e| ConnError::Protocol(e.to_string()))?
                .no_zeroes
        }
    };
    let tls_required = matches!(link, Link::Plain { required: true, .. });
    // A plain connection is counted once in `tls_plain_refused`.
    let mut plain_counted = false;
    let mut structured = false;
    // SET_META_CONTEXT's outcome: (export name, base:allocation selected).
    let mut meta: Option<(String, bool)> = None;
    let mut shutdown = ctx.shutdown.clone();

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        tokio::select! {
            r = rd.read_exact(&mut hdr) => { r?; }
            _ = crate::until_shutdown(&mut shutdown) => return Ok(Haggled::Abort),
        }
        let h = OptionHeader::parse(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if h.len > MAX_OPTION_DATA {
            if h.option == opt::EXPORT_NAME {
                return Err(ConnError::Protocol(
                    "EXPORT_NAME longer than any export name".into(),
                ));
            }
            discard(rd, h.len as u64).await?;
            refuse(wr, h.option, rep::ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;

        if tls_required && h.option != opt::STARTTLS && h.option != opt::ABORT {
            if !std::mem::replace(&mut plain_counted, true) {
                ctx.stats.tls_plain_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(option = h.option, "plain client refused: TLS is required");
            }
            if h.option == opt::EXPORT_NAME {
                // No error reply exists for EXPORT_NAME: the spec says close.
                return Err(ConnError::NotAllowed(
                    String::from_utf8_lossy(&data).into_owned(),
                ));
            }
            refuse(
                wr,
                h.option,
                rep::ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS first",
            )
            .await?;
            continue;
        }

        if ctx.shutting_down() && h.option != opt::ABORT {
            if h.option == opt::EXPORT_NAME {
                return Ok(Haggled::Abort);
            }
            refuse(wr, h.option, rep::ERR_SHUTDOWN, "server is shutting down").await?;
            continue;
        }

        let req = match OptionRequest::parse(h.option, &data) {
            Ok(r) => r,
            Err(e) => {
                if h.option == opt::EXPORT_NAME {
                    return Err(ConnError::Protocol(format!("bad EXPORT_NAME: {e}")));
                }
                refuse(wr, h.option, rep::ERR_INVALID, &e.to_string()).await?;
                continue;
            }
        };

        match req {
            OptionRequest::Abort => {
                // The client may already have closed; a failed ACK is fine.
                let _ = send_reply(wr, h.option, OptionReply::Ack).await;
                return Ok(Haggled::Abort);
            }
            OptionRequest::List => {
                let mut out = BytesMut::new();
                for d in ctx.catalog.disks() {
                    // Disks this peer may not open are not shown either.
                    let visible = match link {
                        Link::Plain { .. } => !ctx.tls.restricted(d.name()),
                        Link::Tls { peer, .. } => ctx.tls.allowed(d.name(), peer),
                    };
                    if !visible {
                        continue;
                    }
                    OptionReply::Server {
                        name: d.name(),
                        description: &d.description(),
                    }
                    .emit(h.option, &mut out);
                }
                send_acked(wr, h.option, out).await?;
            }
            OptionRequest::StartTls => match link {
                Link::Tls { .. } => {
                    refuse(wr, h.option, rep::ERR_INVALID, "TLS is already in use").await?;
                }
                Link::Plain {
                    upgradable: false, ..
                } => {
                    let msg = if ctx.tls.enabled() {
                        "TLS is not available on this connection (stdin/stdout)"
                    } else {
                        "TLS is not enabled on this server (tls = \"off\")"
                    };
                    refuse(wr, h.option, rep::ERR_UNSUP, msg).await?;
                }
                Link::Plain {
                    upgradable: true, ..
                } => {
                    send_reply(wr, h.option, OptionReply::Ack).await?;
                    return Ok(Haggled::StartTls { no_zeroes });
                }
            },
            OptionRequest::ExtendedHeaders => {
                refuse(
                    wr,
                    h.option,
                    rep::ERR_UNSUP,
                    "extended headers are not supported",
                )
                .await?;
            }
            OptionRequest::Unknown(o) => {
                let msg = format!("option {o} is not supported");
                refuse(wr, h.option, rep::ERR_UNSUP, &msg).await?;
            }
            OptionRequest::StructuredReply => {
                structured = true;
                send_reply(wr, h.option, OptionReply::Ack).await?;
            }
            OptionRequest::MetaContext { set, name, queries } => {
                if !structured {
                    refuse(
                        wr,
                        h.option,
                        rep::ERR_INVALID,
                        "negotiate structured replies before metadata contexts",
                    )
                    .await?;
                    continue;
                }
                let Some(export) = ctx.resolve(&name) else {
                    let msg = format!("no export named `{name}`");
                    refuse(wr, h.option, rep::ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let matched = if set {
                    queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                };
                let mut out = BytesMut::new();
                if matched {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    OptionReply::MetaContext {
                        id,
                        name: BASE_ALLOCATION,
                    }
                    .emit(h.option, &mut out);
                }
                send_acked(wr, h.option, out).await?;
                if set {
                    meta = Some((export, matched));
                }
            }
            OptionRequest::Info { go, name, requests } => {
                let Some(export) = ctx.resolve(&name) else {
                    let msg = format!("no export named `{name}`");
                    refuse(wr, h.option, rep::ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                if let Err((reply, msg)) = access(ctx, link, &export, &mut plain_counted) {
                    refuse(wr, h.option, reply, &msg).await?;
                    continue;
                }
                let Some(att) = ctx.catalog.attach(&export) else {
                    refuse(wr, h.option, rep::ERR_UNKNOWN, "export vanished").await?;
                    continue;
                };
                let disk = att.disk().clone();
                let size = disk.size();
                let flags = export_flags(&disk, structured);
                let mut out = BytesMut::new();
                OptionReply::Info(Info::Export { size, flags }).emit(h.option, &mut out);
                let description = disk.description();
                for r in requests {
                    let item = match r {
                        info::NAME => Info::Name(disk.name()),
                        info::DESCRIPTION => Info::Description(&description),
                        _ => continue,
                    };
                    OptionReply::Info(item).emit(h.option, &mut out);
                }
                // Sent unasked too: the constraints hold for every client.
                OptionReply::Info(Info::BlockSize {
                    min: 1,
                    preferred: PREFERRED_BLOCK,
                    max: MAX_PAYLOAD,
                })
                .emit(h.option, &mut out);
                send_acked(wr, h.option, out).await?;
                if go {
                    let base_allocation = matches!(&meta, Some((n, true)) if *n == export);
                    return Ok(session(att, size, structured, base_allocation, link));
                }
            }
            OptionRequest::ExportName(name) => {
                if let Some(export) = ctx.resolve(&name) {
                    if access(ctx, link, &export, &mut plain_counted).is_err() {
                        return Err(ConnError::NotAllowed(name));
                    }
                }
                let att = ctx
                    .resolve(&name)
                    .and_then(|e| ctx.catalog.attach(&e))
                    .ok_or_else(|| ConnError::UnknownExport(name.clone()))?;
                let disk = att.disk().clone();
                let size = disk.size();
                let reply = ExportNameReply {
                    size,
                    flags: export_flags(&disk, structured),
                    no_zeroes,
                };
                let mut out = BytesMut::with_capacity(reply.buffer_len());
                reply.emit(&mut out);
                send(wr, &out).await?;
                let base_allocation = matches!(&meta, Some((n, true)) if *n == disk.name());
                return Ok(session(att, size, structured, base_allocation, link));
            }
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

/// The session an export was chosen for. READ data may go from the disk
/// file's mapping straight to the socket only on a plain link: under TLS every
/// byte goes through the TLS stream.
fn session(
    att: Attachment,
    size: u64,
    structured: bool,
    base_allocation: bool,
    link: &Link,
) -> Haggled {
    Haggled::Session(Session {
        att,
        size,
        structured,
        base_allocation,
        mapped_reads: matches!(link, Link::Plain { .. }),
    })
}
