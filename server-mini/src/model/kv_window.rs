//! The sliding-window rule of the KV caches, one place for both backends
//! (`cpu::KvCache` and `cuda::CudaCache`).
//!
//! Under a sliding window of `w` positions, the query at position `p`
//! attends to `max(p + 1 − w, 0) ..= p`. Queries only move forward, so once
//! a sequence holds `len` positions no later query looks below `len − w + 1`
//! and everything before `len − w` may go. Dropping one position per token
//! would shift the whole cache every step; instead the cache is let grow to
//! `2·w` stored positions and then cut back to the last `w` (one shift per
//! `w` tokens, amortised O(1) per token):
//!
//! ```text
//!   absolute positions:  0 ....... start ............................ len
//!   stored:                        [start, len)          len − start < 2·w after a cut
//!   cut when len − start ≥ 2·w:                  [len − w, len)  → new start = len − w
//! ```
//!
//! Attention then works on positions relative to `start`: the window
//! arithmetic is translation-invariant, and because `start ≤ len − w` the
//! relative window start `max(p − start + 1 − w, 0)` is exactly the absolute
//! one minus `start` (no clamp at 0 hides a stored position).

/// The new first stored position when the cache holding `[start, len)`
/// should be cut back under `window`, else `None` (no window, or fewer than
/// `2·window` positions stored). The cut keeps the last `window` positions.
pub fn cut_start(start: usize, len: usize, window: Option<usize>) -> Option<usize> {
    let w = window?;
    debug_assert!(start <= len, "cache start {start} past its length {len}");
    (len.saturating_sub(start) >= 2 * w).then(|| len - w)
}

/// Positions a cache needs room for at most, in steady state: `2·window`
/// under a window (a cut happens before more are stored), else the context
/// limit. A single step may still need more (`2·window − 1` stored plus
/// that step's rows); capacity is then `stored + rows`, never doubled past
/// this bound.
pub fn capacity_bound(window: Option<usize>, max_context: usize) -> usize {
    window.map_or(max_context, |w| w.saturating_mul(2).min(max_context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn no_window_never_cuts() {
        assert_eq!(cut_start(0, 1_000_000, None), None);
        assert_eq!(capacity_bound(None, 4096), 4096);
    }

    #[test]
    fn cuts_at_twice_the_window_to_the_last_window() {
        assert_eq!(cut_start(0, 7, Some(4)), None);
        assert_eq!(cut_start(0, 8, Some(4)), Some(4));
        assert_eq!(cut_start(4, 11, Some(4)), None);
        assert_eq!(cut_start(4, 12, Some(4)), Some(8));
        // A long prefill: everything but the last window goes at once.
        assert_eq!(cut_start(0, 100, Some(4)), Some(96));
        assert_eq!(capacity_bound(Some(4), 4096), 8);
        assert_eq!(capacity_bound(Some(4096), 600), 600);
    }

    proptest! {
        /// Any sequence of step sizes: after every step's cut fewer than
        /// `2·w` positions are stored, every position a later query can see
        /// (`len − w + 1 ..`) is still stored, and relative window starts
        /// equal absolute ones shifted by `start`.
        #[test]
        fn cuts_keep_what_later_queries_see(
            w in 1usize..50,
            steps in prop::collection::vec(1usize..120, 1..40),
        ) {
            let (mut start, mut len) = (0usize, 0usize);
            for n in steps {
                prop_assert!(len - start < 2 * w);
                len += n;
                if let Some(s) = cut_start(start, len, Some(w)) {
                    prop_assert!(s > start && s <= len);
                    start = s;
                }
                prop_assert!(len - start < 2 * w);
                // The next query is at position `len`.
                let lo_abs = (len + 1).saturating_sub(w);
                prop_assert!(start <= lo_abs, "start {} drops {}", start, lo_abs);
                let lo_rel = (len - start + 1).saturating_sub(w);
                prop_assert_eq!(lo_rel + start, lo_abs);
            }
        }
    }
}
