//! Unit tests of capture in the switch: what is recorded where, drops marked,
//! a full queue counted as lost without touching the frames' delivery.

use super::*;
use crate::pcapng;
use crate::switch::{Guard, PortTx, TxError};
use std::time::Duration;

struct Null;
impl PortTx for Null {
    fn send(&self, _: &[u8]) -> Result<(), TxError> {
        Ok(())
    }
}

const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

fn net2() -> (Arc<Network>, Arc<Port>, Arc<Port>) {
    let net = Network::new("n", 1500, 16, Duration::from_secs(300));
    let a = net.add_port("a", PortClass::Tap, Box::new(Null)).unwrap();
    let b = net
        .add_port("b", PortClass::Stream, Box::new(Null))
        .unwrap();
    (net, a, b)
}

fn drain(c: &mut Capture) -> Vec<Record> {
    std::iter::from_fn(|| c.frames.try_recv().ok()).collect()
}

#[test]
fn every_frame_once_inbound_with_drops_marked() {
    let (net, a, b) = net2();
    assert!(!net.captures.on(), "off until asked");
    let mut c = net.capture(&[], 20).unwrap();
    assert!(net.captures.on());
    assert_eq!(
        c.ports()
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    net.ingress(&a, &frame([0xff; 6], A, 60));
    net.ingress(&b, &frame(A, B, 100));
    net.ingress(&a, &[1, 2, 3]);
    net.ingress(&a, &frame(B, A, 1515));
    let r = drain(&mut c);
    assert_eq!(r.len(), 4, "{r:?}");
    assert!(r.iter().all(|x| x.flags & 0b11 == pcapng::FLAG_INBOUND));
    assert_eq!((r[0].port, r[0].flags >> 2), (a.id, 3), "broadcast");
    assert_eq!((r[1].port, r[1].flags >> 2), (b.id, 1), "unicast");
    assert_eq!(r[1].orig_len, 100);
    assert_eq!(r[1].data.len(), 20, "cut at the snaplen");
    assert_eq!(r[0].drop, None);
    assert_eq!(r[2].drop, Some("malformed"));
    assert_eq!(r[3].drop, Some("mtu"));
    drop(c);
    assert!(!net.captures.on(), "off again once the capture ends");
}

#[test]
fn a_named_port_is_captured_both_ways_and_guard_drops_are_marked() {
    let net = Network::new("n", 1500, 16, Duration::from_secs(300));
    let a = net
        .add_port_with(
            "a",
            PortClass::Tap,
            Box::new(Null),
            Some(Guard::Clean),
            Some(A),
        )
        .unwrap();
    let b = net.add_port("b", PortClass::Tap, Box::new(Null)).unwrap();
    assert!(matches!(
        net.capture(&["nope".into()], 64),
        Err(SwitchError::NoSuchPort(_))
    ));
    assert!(matches!(
        net.capture(&[], 0),
        Err(SwitchError::BadSnaplen(0))
    ));
    let mut c = net.capture(&["a".into()], 64).unwrap();
    net.ingress(&b, &frame(A, B, 60));
    net.ingress(&a, &frame(B, B, 60));
    let r = drain(&mut c);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        (r[0].port, r[0].flags & 0b11, r[0].drop),
        (a.id, pcapng::FLAG_OUTBOUND, None)
    );
    assert_eq!(
        (r[1].port, r[1].flags & 0b11, r[1].drop),
        (a.id, pcapng::FLAG_INBOUND, Some("spoofed_mac"))
    );
    assert_eq!(a.counters.snapshot().drop_spoofed_mac, 1);
}

#[test]
fn a_full_queue_loses_capture_frames_only() {
    let (net, a, b) = net2();
    let mut captures: Vec<Capture> = (0..MAX_CAPTURES)
        .map(|_| net.capture(&[], 64).unwrap())
        .collect();
    assert!(matches!(
        net.capture(&[], 64),
        Err(SwitchError::TooManyCaptures(MAX_CAPTURES))
    ));
    captures.truncate(1);
    let mut c = captures.pop().unwrap();
    let n = CAPTURE_QUEUE_FRAMES + 100;
    for _ in 0..n {
        net.ingress(&a, &frame(B, A, 60));
    }
    assert_eq!(b.counters.snapshot().tx_frames, n as u64, "all delivered");
    assert_eq!(c.lost().get(&a.id).copied(), Some(100));
    assert_eq!(drain(&mut c).len(), CAPTURE_QUEUE_FRAMES);
}

#[test]
fn a_large_frame_a_port_gives_is_kept_not_copied_and_charged_the_same() {
    let net = Network::new("n", 65_000, 16, Duration::from_secs(300));
    let a = net.add_port("a", PortClass::Tap, Box::new(Null)).unwrap();
    let b = net.add_port("b", PortClass::Tap, Box::new(Null)).unwrap();
    let mut whole = frame(B, A, SHARE_MIN + 1000);
    let mut c = net.capture(&["b".into()], 262_144).unwrap();
    let mut cut = net.capture(&[], 100).unwrap();
    assert!(net.capturing());
    // As a port's receive loop hands it over: header first, the frame after it.
    whole.splice(0..0, [9u8; 12]);
    let msg = Bytes::from(whole);
    let big = msg.slice(12..);
    net.ingress_rx(&a, &big, None, Some(&big));
    let small = Bytes::from(frame(B, A, 60));
    net.ingress_rx(&a, &small, None, Some(&small));
    // Dropped (bad source MAC): recorded and marked the same way.
    let bad = Bytes::from(frame(B, [1, 0, 0, 0, 0, 1], SHARE_MIN + 10));
    net.ingress_rx(&a, &bad, None, Some(&bad));
    assert_eq!(b.counters.snapshot().tx_frames, 2, "switched as usual");
    let r = drain(&mut c);
    assert_eq!(r.len(), 2, "outbound on b: {r:?}");
    assert_eq!(r[0].data, big, "the same bytes");
    assert_eq!(r[0].data.as_ptr(), big.as_ptr(), "not a copy");
    assert_eq!(r[0].orig_len as usize, big.len());
    assert_eq!(r[1].data, small);
    assert_ne!(
        r[1].data.as_ptr(),
        small.as_ptr(),
        "a short frame is copied"
    );
    // Charged as a copy would be: its length and the message cost.
    assert_eq!(
        c.tap.budget.used(),
        big.len() + small.len() + 2 * crate::budget::MSG_COST
    );
    // Refunded when the reader takes the frames, even if it writes them later.
    let kept = r[0].data.clone();
    drop(r);
    assert_eq!(c.tap.budget.used(), 0, "refunded with the record");
    assert_eq!(kept, big);
    let r = drain(&mut cut);
    assert_eq!(r.len(), 3, "inbound on a: {r:?}");
    assert!(r.iter().all(|x| x.data.len() <= 100), "cut at the snaplen");
    assert_eq!(&r[0].data[..], &big[..100]);
    assert_eq!(r[2].drop, Some("malformed"));
    // A port that saw no capture running: nothing is recorded for that frame.
    net.ingress_rx(&a, &small, None, None);
    assert!(drain(&mut cut).is_empty());
    drop((c, cut));
    assert!(!net.capturing());
}
