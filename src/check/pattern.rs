//! The disk pattern: every 8-byte word names the disk offset it belongs to and the generation
//! of its 4 KiB block, so data that lands in the wrong place, or a page that still holds what
//! an earlier request put there, is recognisable — and explainable — at any buffer.
//!
//! Word at disk offset `off` (a multiple of 8) of generation `gen`, little-endian:
//! `((off >> 3) & (2^48 - 1) | gen << 48) ^ salt`. The salt comes from `--seed`, so an image
//! prepared by a different run (or all zeroes) never passes for fresh data. Decoding a word
//! that does not match gives back the offset and generation it *does* hold.
//!
//! Only [`write_image`] is public (re-exported as `check::write_image`): the rest is the
//! checker's own business. Depends on nothing else in `check`.

use std::io::Write;
use std::path::Path;

/// Bytes per pattern word.
pub(super) const WORD: u64 = 8;
/// Granularity of generations (disk blocks rewritten as a whole by write requests).
pub(super) const BLOCK: u64 = 4096;
const OFF_MASK: u64 = (1 << 48) - 1;

/// The salt used for a seed (a fixed mixing of it, never zero for seed 0).
pub(super) fn salt_for(seed: u64) -> u64 {
    splitmix64(seed ^ 0x7663_6865_636b_0001)
}

/// The pattern word at disk offset `off` (a multiple of 8) for block generation `gen`.
#[inline]
pub(super) fn word(off: u64, gen: u16, salt: u64) -> u64 {
    ((off >> 3) & OFF_MASK | u64::from(gen) << 48) ^ salt
}

/// What a word claims to be: `(disk offset, generation)`.
#[inline]
pub(super) fn decode(w: u64, salt: u64) -> (u64, u16) {
    let v = w ^ salt;
    ((v & OFF_MASK) << 3, (v >> 48) as u16)
}

/// Fills `buf` with the pattern of disk bytes `[off, off + buf.len())`, all of generation `gen`.
/// `off` and `buf.len()` must be multiples of 8.
pub(super) fn fill(buf: &mut [u8], off: u64, gen: u16, salt: u64) {
    for (i, c) in buf.chunks_exact_mut(WORD as usize).enumerate() {
        c.copy_from_slice(&word(off + i as u64 * WORD, gen, salt).to_le_bytes());
    }
}

/// Writes an image of `size` bytes (rounded down to whole 512-byte sectors) holding the
/// generation-0 disk pattern for `seed`, for backends that export their disk read-only: such a
/// disk cannot be filled through the backend, so check it with
/// [`CheckOptions::prepare`](super::CheckOptions::prepare) `= Some(false)` (`--no-prepare`) and
/// the same seed and disk span.
///
/// Each 8-byte little-endian word at disk offset `off` holds
/// `(off >> 3) ^ salt`, where the salt is a fixed mix of `seed`; a read that returns other data
/// is reported as a device error.
pub fn write_image(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let salt = salt_for(seed);
    let size = size / 512 * 512;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(chunk.len() as u64) as usize;
        fill(&mut chunk[..n], off, 0, salt);
        f.write_all(&chunk[..n])?;
        off += n as u64;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// SplitMix64: a stateless 64-bit mixer (also the PRNG step below).
#[inline]
pub(super) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small deterministic PRNG (SplitMix64), so a run is reproducible from `--seed`.
#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }
    /// Uniform in `[0, n)` (`n > 0`).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
    /// Uniform in `[lo, hi]`.
    pub(super) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_differ() {
        let salt = salt_for(7);
        for &(off, gen) in &[(0u64, 0u16), (8, 1), (1 << 40, 65535), (4096 * 3 + 16, 9)] {
            assert_eq!(decode(word(off, gen, salt), salt), (off, gen));
        }
        assert_ne!(word(8, 0, salt), word(16, 0, salt));
        assert_ne!(word(8, 0, salt), word(8, 1, salt));
        assert_ne!(word(8, 0, salt), word(8, 0, salt_for(8)));
        // A zeroed disk never looks like pattern data.
        assert_ne!(word(0, 0, salt), 0);
        let mut b = vec![0u8; 64];
        fill(&mut b, 4096, 3, salt);
        assert_eq!(
            decode(u64::from_le_bytes(b[56..64].try_into().unwrap()), salt),
            (4096 + 56, 3)
        );
    }

    #[test]
    fn image_holds_generation_zero() {
        let dir = std::env::temp_dir().join(format!("pattern-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        write_image(&p, 3 << 20, 5).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 3 << 20);
        let mut want = vec![0u8; 4096];
        fill(&mut want, (2 << 20) + 4096, 0, salt_for(5));
        assert_eq!(&data[(2 << 20) + 4096..(2 << 20) + 8192], &want[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rng_ranges() {
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            let v = r.range(3, 5);
            assert!((3..=5).contains(&v));
        }
        assert_eq!(Rng::new(9).next_u64(), Rng::new(9).next_u64());
    }
}
