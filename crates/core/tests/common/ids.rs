//! Block ids for tests and benches (included by path from both).

/// A fixed pseudo-random permutation of `0..n` (xorshift-driven Fisher–Yates): scattered ids, the hard case.
pub fn scattered(n: u32, seed: u64) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids
}
