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
