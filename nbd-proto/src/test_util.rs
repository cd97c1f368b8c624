//! Helpers of the unit tests of both sides.

/// Emits into a buffer of exactly `len` bytes pre-filled with 0xa5, so a
/// length that disagrees with what was written, or a byte left unwritten,
/// shows.
pub(crate) fn emit_exact(len: usize, emit: impl FnOnce(&mut &mut [u8])) -> Vec<u8> {
    let mut buf = vec![0xa5u8; len];
    let mut tail: &mut [u8] = &mut buf;
    emit(&mut tail);
    assert!(tail.is_empty(), "{} bytes left unwritten", tail.len());
    buf
}

/// Emits `v` with [`emit_exact`] into `len` bytes, checks that they parse
/// back to `v`, and returns them.
pub(crate) fn round_trip<T: PartialEq + std::fmt::Debug>(
    v: &T,
    len: usize,
    emit: impl FnOnce(&T, &mut &mut [u8]),
    parse: impl FnOnce(&[u8]) -> Result<T, crate::ParseError>,
) -> Vec<u8> {
    let b = emit_exact(len, |o| emit(v, o));
    assert_eq!(parse(&b).as_ref(), Ok(v));
    b
}

/// If `parse` takes `buf`, `emit` makes of the result exactly the first
/// `len` bytes of `buf`: a parser reads every byte it claims, an emitter
/// writes them back.
pub(crate) fn check_reemit<T>(
    buf: &[u8],
    len: usize,
    parse: impl Fn(&[u8]) -> Result<T, crate::ParseError>,
    emit: impl Fn(&T, &mut Vec<u8>),
) {
    if let Ok(v) = parse(buf) {
        let mut out = Vec::new();
        emit(&v, &mut out);
        assert_eq!(&out[..], &buf[..len]);
    }
}

/// Runs `check` on 20 000 random inputs of up to 80 bytes, from a fixed
/// seed (the generator comes along, to bias inputs or pick parameters).
pub(crate) fn random_inputs(mut check: impl FnMut(&mut Rng, Vec<u8>)) {
    let mut rng = Rng::new(0x5eed);
    for _ in 0..20_000 {
        let buf = rng.bytes(80);
        check(&mut rng, buf);
    }
}

/// A small deterministic generator (splitmix64) for randomized tests.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `len` bytes below `max_len` of random data.
    pub(crate) fn bytes(&mut self, max_len: u64) -> Vec<u8> {
        let len = self.next_u64() % max_len;
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}
