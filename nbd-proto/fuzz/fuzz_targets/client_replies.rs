//! Client side of the transmission phase: what a server answers, simple
//! replies and structured chunks, read the way a client reads them (magic,
//! header, then a payload checked against the header's type).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{
    parse_offset, BlockStatus, ChunkHeader, ChunkPayload, ErrorChunk, OffsetHole, ReplyKind,
    SimpleReply, CHUNK_HEADER_LEN, MAX_PAYLOAD,
};

fuzz_target!(|data: &[u8]| {
    let Ok(kind) = ReplyKind::parse(data) else {
        return;
    };
    let Some(header) = data.get(..kind.header_len()) else {
        return;
    };
    let rest = data.get(kind.header_len()..).unwrap_or_default();
    match kind {
        ReplyKind::Simple => {
            let r = SimpleReply::parse(header).expect("the magic said simple");
            let mut b = Vec::new();
            r.emit(&mut b);
            assert_eq!(&b[..], header);
        }
        ReplyKind::Structured => {
            let h = ChunkHeader::parse(header).expect("the magic said structured");
            let mut b = Vec::new();
            h.emit(&mut b);
            assert_eq!(&b[..CHUNK_HEADER_LEN], header);
            let Ok(payload) = h.payload() else {
                return;
            };
            assert!(h.len <= MAX_PAYLOAD + 8);
            let body = rest.get(..h.len as usize).unwrap_or(rest);
            match payload {
                ChunkPayload::OffsetData { data_len } => {
                    assert_eq!(data_len + 8, h.len);
                    let _ = parse_offset(body);
                }
                ChunkPayload::OffsetHole => {
                    if let Ok(hole) = OffsetHole::parse(body) {
                        assert!(hole.len > 0);
                    }
                }
                ChunkPayload::Error => {
                    if let Ok(e) = ErrorChunk::parse(body) {
                        assert!(e.message.len() + 6 <= body.len());
                    }
                }
                ChunkPayload::BlockStatus => {
                    if let Ok(s) = BlockStatus::parse(body) {
                        assert_eq!(4 + 8 * s.extents.len(), body.len());
                    }
                }
                ChunkPayload::None => assert_eq!(h.len, 0),
                ChunkPayload::Other { .. } => {}
            }
        }
    }
});
