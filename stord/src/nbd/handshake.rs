//! Option haggling (fixed newstyle): one option at a time until the client
//! picks an export with GO or EXPORT_NAME, or leaves.

use super::*;

async fn send_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(20 + data.len());
    wire::emit_option_reply(&mut out, option, reply, data);
    wr.write_all(&out).await?;
    wr.flush().await
}

/// Reads and throws away `n` bytes (an oversized option's data).
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> std::io::Result<()> {
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
pub(super) async fn handshake<R, W>(
    ctx: &Ctx,
    rd: &mut R,
    wr: &mut W,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(wire::NBDMAGIC);
    hello.put_u64(wire::IHAVEOPT);
    hello.put_u16(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES);
    wr.write_all(&hello).await?;
    wr.flush().await?;

    let cflags = rd.read_u32().await?;
    if cflags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let no_zeroes = cflags & wire::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // SET_META_CONTEXT's outcome: (export name, base:allocation selected).
    let mut meta: Option<(String, bool)> = None;
    let mut shutdown = ctx.shutdown.clone();

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; wire::OPTION_HEADER_LEN];
        tokio::select! {
            r = rd.read_exact(&mut hdr) => { r?; }
            _ = crate::until_shutdown(&mut shutdown) => return Ok(None),
        }
        let h = OptionHeader::parse(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if h.len > wire::MAX_OPTION_DATA {
            if h.option == opt::EXPORT_NAME {
                return Err(ConnError::Protocol(
                    "EXPORT_NAME longer than any export name".into(),
                ));
            }
            discard(rd, h.len as u64).await?;
            send_reply(wr, h.option, rep::ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;

        if ctx.shutting_down() && h.option != opt::ABORT {
            if h.option == opt::EXPORT_NAME {
                return Ok(None);
            }
            send_reply(wr, h.option, rep::ERR_SHUTDOWN, b"server is shutting down").await?;
            continue;
        }

        let req = match OptionRequest::parse(h.option, &data) {
            Ok(r) => r,
            Err(e) => {
                if h.option == opt::EXPORT_NAME {
                    return Err(ConnError::Protocol(format!("bad EXPORT_NAME: {e}")));
                }
                send_reply(wr, h.option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                continue;
            }
        };

        match req {
            OptionRequest::Abort => {
                // The client may already have closed; a failed ACK is fine.
                let _ = send_reply(wr, h.option, rep::ACK, &[]).await;
                return Ok(None);
            }
            OptionRequest::List => {
                let mut out = BytesMut::new();
                for d in ctx.catalog.disks() {
                    let data = wire::server_reply_data(d.name(), &d.description());
                    wire::emit_option_reply(&mut out, h.option, rep::SERVER, &data);
                }
                wire::emit_option_reply(&mut out, h.option, rep::ACK, &[]);
                wr.write_all(&out).await?;
                wr.flush().await?;
            }
            OptionRequest::StartTls => {
                send_reply(
                    wr,
                    h.option,
                    rep::ERR_UNSUP,
                    b"TLS is not supported by this server",
                )
                .await?;
            }
            OptionRequest::ExtendedHeaders => {
                send_reply(
                    wr,
                    h.option,
                    rep::ERR_UNSUP,
                    b"extended headers are not supported",
                )
                .await?;
            }
            OptionRequest::Unknown(o) => {
                let msg = format!("option {o} is not supported");
                send_reply(wr, h.option, rep::ERR_UNSUP, msg.as_bytes()).await?;
            }
            OptionRequest::StructuredReply => {
                structured = true;
                send_reply(wr, h.option, rep::ACK, &[]).await?;
            }
            OptionRequest::MetaContext { set, name, queries } => {
                if !structured {
                    send_reply(
                        wr,
                        h.option,
                        rep::ERR_INVALID,
                        b"negotiate structured replies before metadata contexts",
                    )
                    .await?;
                    continue;
                }
                let Some(export) = ctx.resolve(&name) else {
                    let msg = format!("no export named `{name}`");
                    send_reply(wr, h.option, rep::ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let matched = if set {
                    queries.iter().any(|q| q == wire::BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| q == wire::BASE_ALLOCATION || q == "base:")
                };
                let mut out = BytesMut::new();
                if matched {
                    let id = if set { wire::BASE_ALLOCATION_ID } else { 0 };
                    let data = wire::meta_context_data(id, wire::BASE_ALLOCATION);
                    wire::emit_option_reply(&mut out, h.option, rep::META_CONTEXT, &data);
                }
                wire::emit_option_reply(&mut out, h.option, rep::ACK, &[]);
                wr.write_all(&out).await?;
                wr.flush().await?;
                if set {
                    meta = Some((export, matched));
                }
            }
            OptionRequest::Info { go, name, requests } => {
                let Some(export) = ctx.resolve(&name) else {
                    let msg = format!("no export named `{name}`");
                    send_reply(wr, h.option, rep::ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let Some(att) = ctx.catalog.attach(&export) else {
                    send_reply(wr, h.option, rep::ERR_UNKNOWN, b"export vanished").await?;
                    continue;
                };
                let disk = att.disk().clone();
                let size = disk.size();
                let flags = export_flags(&disk, structured);
                let mut out = BytesMut::new();
                wire::emit_option_reply(
                    &mut out,
                    h.option,
                    rep::INFO,
                    &wire::info_export_data(size, flags),
                );
                for r in requests {
                    let data = match r {
                        info::NAME => wire::info_string_data(info::NAME, disk.name()),
                        info::DESCRIPTION => {
                            wire::info_string_data(info::DESCRIPTION, &disk.description())
                        }
                        _ => continue,
                    };
                    wire::emit_option_reply(&mut out, h.option, rep::INFO, &data);
                }
                // Sent unasked too: the constraints hold for every client.
                let bs = wire::info_block_size_data(1, PREFERRED_BLOCK, wire::MAX_PAYLOAD);
                wire::emit_option_reply(&mut out, h.option, rep::INFO, &bs);
                wire::emit_option_reply(&mut out, h.option, rep::ACK, &[]);
                wr.write_all(&out).await?;
                wr.flush().await?;
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
                let mut out = BytesMut::with_capacity(134);
                out.put_u64(size);
                out.put_u16(export_flags(&disk, structured));
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
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
