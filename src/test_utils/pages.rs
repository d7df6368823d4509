//! Listing the pages set in a dirty log, and the pages a guest-physical range covers.

use crate::log::{LogRegion, LOG_PAGE_SHIFT};

/// The set pages of `log` (a [`LogRegion`], a [`SharedLog`](crate::vmm::SharedLog), an
/// `Arc<LogRegion>`), ascending: page `p` covers guest-physical `[p << 12, (p + 1) << 12)`.
/// Reads each bit once, with [`LogRegion::test_page`]; clears nothing.
pub fn set_pages<L: AsRef<LogRegion> + ?Sized>(log: &L) -> impl Iterator<Item = u64> + '_ {
    let log = log.as_ref();
    (0..log.pages()).filter(move |&p| log.test_page(p))
}

/// The indices of the set bits of a byte-addressed little-endian bitmap (a vhost-user log as
/// its bytes: bit `i` is bit `i % 8` of byte `i / 8`, i.e. page `i`), ascending.
pub fn set_bits(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.iter().enumerate().flat_map(|(k, &b)| {
        (0..8u64)
            .filter(move |j| b & (1 << j) != 0)
            .map(move |j| k as u64 * 8 + j)
    })
}

/// The 4 KiB pages that the `len` bytes at guest-physical `gpa` touch (`len` > 0).
pub fn pages_covering(gpa: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    (gpa >> LOG_PAGE_SHIFT)..=((gpa + len - 1) >> LOG_PAGE_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_exactly_the_set_pages() {
        let log = LogRegion::anonymous(64).unwrap();
        assert_eq!(set_pages(&log).count(), 0);
        log.mark_pages(3, 5);
        log.mark_pages(200, 200);
        assert_eq!(set_pages(&log).collect::<Vec<_>>(), [3, 4, 5, 200]);
        assert_eq!(
            set_bits(&[0b1000_0001, 0, 0x10]).collect::<Vec<_>>(),
            [0, 7, 20]
        );
        assert_eq!(pages_covering(0xfff, 2), 0..=1);
        assert_eq!(pages_covering(0x1000, 0x1000), 1..=1);
    }
}
