//! Option haggling (fixed newstyle): one option at a time until the client
//! picks an export with GO or EXPORT_NAME, or leaves.

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

/// Option haggling. `Ok(None)`: the client aborted (or the server is shutting
/// down while the client idles in negotiation).
pub(super) async fn handshake(
    ctx: &Ctx,
    rd: Rd<'_>,
    wr: Wr<'_>,
) -> Result<Option<Session>, ConnError> {
    let mut hello = BytesMut::with_capacity(nbd_proto::HELLO_LEN);
    Hello {
        flags: nbd_proto::FLAG_FIXED_NEWSTYLE | nbd_proto::FLAG_NO_ZEROES,
    }
    .emit(&mut hello);
    send(wr, &hello).await?;

    let mut cflags = [0u8; ClientFlags::LEN];
    rd.read_exact(&mut cflags).await?;
    let no_zeroes = ClientFlags::parse(&cflags)
        .map_err(|e| ConnError::Protocol(e.to_string()))?
        .no_zeroes;
    let mut structured = false;
    // SET_META_CONTEXT's outcome: (export name, base:allocation selected).
    let mut meta: Option<(String, bool)> = None;
    let mut shutdown = ctx.shutdown.clone();

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        tokio::select! {
            r = rd.read_exact(&mut hdr) => { r?; }
            _ = crate::until_shutdown(&mut shutdown) => return Ok(None),
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

        if ctx.shutting_down() && h.option != opt::ABORT {
            if h.option == opt::EXPORT_NAME {
                return Ok(None);
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
                return Ok(None);
            }
            OptionRequest::List => {
                let mut out = BytesMut::new();
                for d in ctx.catalog.disks() {
                    OptionReply::Server {
                        name: d.name(),
                        description: &d.description(),
                    }
                    .emit(h.option, &mut out);
                }
                send_acked(wr, h.option, out).await?;
            }
            OptionRequest::StartTls => {
                refuse(
                    wr,
                    h.option,
                    rep::ERR_UNSUP,
                    "TLS is not supported by this server",
                )
                .await?;
            }
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
                    return Ok(Some(Session {
                        att,
                        size,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OptionRequest::ExportName(name) => {
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
                return Ok(Some(Session {
                    att,
                    size,
                    structured,
                    base_allocation,
                }));
            }
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {MAX_OPTIONS} options"
    )))
}
