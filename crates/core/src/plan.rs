//! Turning one `writeCache` call into byte ranges: validation of the ids, coalescing of runs that are
//! consecutive on both sides, and the tensor-parallel slice geometry. Knows no transport.

use crate::error::{Error, ErrorCode, Result};
use crate::memory::{CacheLayout, Tensor, TensorSet};

/// Blocks `local..local+count` go to `remote..remote+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub local: u32,
    pub remote: u32,
    pub count: u32,
}

/// Where a prefill rank's block lands inside a decode block.
///
/// With `prefillTpSize = p` and the decode's `dstTpSize = d`, each decode block holds `ratio = p / d` slices
/// of `blockBytes` bytes, and prefill rank `i` owns slice `slot = i % ratio`. Homogeneous TP is `ratio = 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceGeometry {
    pub ratio: u32,
    pub slot: u32,
}

impl SliceGeometry {
    /// One slice per block: the two sides have the same block size.
    pub const WHOLE: SliceGeometry = SliceGeometry { ratio: 1, slot: 0 };

    /// The geometry for a prefill rank `tp_idx` of `tp_size` writing into a decode of `dst_tp_size` ranks.
    pub fn for_ranks(tp_size: u32, tp_idx: u32, dst_tp_size: u32) -> Result<SliceGeometry> {
        if tp_size == 0 || dst_tp_size == 0 {
            return Err(Error::invalid("tensor-parallel sizes must be at least 1"));
        }
        if tp_idx >= tp_size {
            return Err(Error::invalid(format!("the prefill's tensor-parallel index {tp_idx} is outside [0, {tp_size})")));
        }
        if tp_size % dst_tp_size != 0 {
            return Err(Error::invalid(format!(
                "the prefill's tensor-parallel size {tp_size} is not a multiple of the decode's, {dst_tp_size}"
            )));
        }
        let ratio = tp_size / dst_tp_size;
        Ok(SliceGeometry { ratio, slot: tp_idx % ratio })
    }

    /// Offset of `block` in a remote tensor whose slices are `slice_bytes` long.
    #[inline]
    pub fn remote_offset(self, block: u32, slice_bytes: u64) -> u64 {
        (block as u64 * self.ratio as u64 + self.slot as u64) * slice_bytes
    }
}

/// One contiguous byte range of a write: `len` bytes of `tensor`, at offset `local` of the sender's tensor and at
/// offset `remote` of the receiver's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub tensor: Tensor,
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

/// Calls `f` for each [`Segment`] of `runs`, tensor by tensor in wire order, run by run: with one slice per
/// remote block ([`SliceGeometry::WHOLE`]) each run is one segment, otherwise each block is its own. `slice(t)`
/// is the bytes of one block of `t` as the sender holds it (one slice of the receiver's block).
///
/// Every transport that moves runs takes its address arithmetic from here, so the bounds are proven once: when
/// each run lies inside `[0, local_blocks)` and `[0, remote_blocks)` (as [`BlockPlan::build`] and
/// [`check_remote_runs`] establish), each segment lies inside the first `local_blocks × slice` bytes of the
/// sender's tensor and the first `remote_blocks × ratio × slice` bytes of the receiver's.
#[inline]
pub fn for_each_segment(runs: &[Run], tensors: TensorSet, slice: impl Fn(Tensor) -> u64, geometry: SliceGeometry, mut f: impl FnMut(Segment)) {
    for tensor in tensors.iter() {
        let bytes = slice(tensor);
        for run in runs {
            if geometry.ratio == 1 {
                let (local, remote, len) = (run.local as u64 * bytes, run.remote as u64 * bytes, run.count as u64 * bytes);
                f(Segment { tensor, local, remote, len });
            } else {
                for i in 0..run.count {
                    let local = (run.local + i) as u64 * bytes;
                    f(Segment { tensor, local, remote: geometry.remote_offset(run.remote + i, bytes), len: bytes });
                }
            }
        }
    }
}

/// The form a transport takes a call in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlanForm {
    /// Maximal runs that are consecutive on both sides: byte ranges for sockets and work requests.
    #[default]
    Runs,
    /// The ids as given, for a copy kernel that reads one pair per block (coalescing would only cost time).
    Ids,
}

/// One validated `writeCache` call: its layer and its blocks, in the [`PlanForm`] its transport takes;
/// reusable across calls without allocating.
///
/// ```
/// use kvtransfer::plan::{BlockPlan, PlanForm, Run};
/// let mut plan = BlockPlan::default();
/// plan.build(&[4, 5, 6, 9], &[0, 1, 2, 3], 0, 1, 16, 16).unwrap();
/// assert_eq!(plan.runs(), &[Run { local: 4, remote: 0, count: 3 }, Run { local: 9, remote: 3, count: 1 }]);
/// assert!(plan.build(&[4], &[16], 0, 1, 16, 16).is_err());
///
/// let mut plan = BlockPlan::new(PlanForm::Ids);
/// plan.build(&[4, 5, 9], &[0, 1, 3], 0, 1, 16, 16).unwrap();
/// assert_eq!(plan.ids(), [4, 5, 9, 0, 1, 3]);
/// ```
#[derive(Debug, Default)]
pub struct BlockPlan {
    form: PlanForm,
    layer: u32,
    blocks: u32,
    runs: Vec<Run>,
    /// Local ids, then remote ids (the `Ids` form).
    ids: Vec<u32>,
    /// Per remote block, the last check that saw it: a block is listed twice in a call when it already
    /// carries that call's mark. Marks are only outdated, and all cleared when the mark wraps around (after
    /// 65535 marks; a check uses one, or two when it finds a repeat).
    seen: Vec<u16>,
    mark: u16,
}

impl BlockPlan {
    /// An empty plan of the given form.
    pub fn new(form: PlanForm) -> BlockPlan {
        BlockPlan { form, ..BlockPlan::default() }
    }

    /// Validates one call and lays out its blocks. Nothing of the previous plan survives an error.
    ///
    /// Refuses: lists of different lengths, a layer outside `[0, layers)`, a local id outside
    /// `[0, local_blocks)`, a remote id outside `[0, remote_blocks)`, and a remote id listed twice.
    pub fn build(
        &mut self,
        local: &[u32],
        remote: &[u32],
        layer: u32,
        layers: u32,
        local_blocks: u32,
        remote_blocks: u32,
    ) -> Result<()> {
        self.runs.clear();
        self.ids.clear();
        self.blocks = 0;
        if local.len() != remote.len() {
            return Err(Error::invalid(format!(
                "{} local block ids but {} remote ones: they must pair up",
                local.len(),
                remote.len()
            )));
        }
        if local.len() > u32::MAX as usize {
            return Err(Error::invalid("too many block ids in one call"));
        }
        if layer >= layers {
            return Err(Error::invalid(format!("layer {layer} is outside [0, {layers})")));
        }
        check_range("local", local, local_blocks)?;
        let largest = check_range("remote", remote, remote_blocks)?;
        self.check_distinct(remote, largest)?;
        self.layer = layer;
        self.blocks = local.len() as u32;
        match self.form {
            PlanForm::Runs => coalesce(local, remote, &mut self.runs),
            PlanForm::Ids => {
                self.ids.extend_from_slice(local);
                self.ids.extend_from_slice(remote);
            }
        }
        Ok(())
    }

    /// The remote ids must be distinct: two blocks written to one place in one call is a caller's bug
    /// whose outcome no transport could define. Every id is already at most `largest`. The marks cover the ids
    /// calls have used, not the peer's whole cache, whose size only the peer vouches for.
    fn check_distinct(&mut self, remote: &[u32], largest: u32) -> Result<()> {
        let span = largest as usize + 1;
        if self.seen.len() < span {
            self.seen.resize(span, 0);
        }
        // One pass with no branch but the bounds check: each id reads and rewrites its own slot, so no
        // iteration waits for another's store unless ids repeat.
        let mark = self.next_mark();
        let seen = &mut self.seen[..span];
        let mut repeated = false;
        for &b in remote {
            let slot = &mut seen[b as usize];
            repeated |= *slot == mark;
            *slot = mark;
        }
        if !repeated {
            return Ok(());
        }
        let mark = self.next_mark();
        let seen = &mut self.seen[..span];
        let (i, b) = remote
            .iter()
            .enumerate()
            .find(|&(_, &b)| std::mem::replace(&mut seen[b as usize], mark) == mark)
            .expect("a repeated id is found again");
        Err(Error::invalid(format!("remote block id {b} (position {i}) is listed twice")))
    }

    /// A mark no slot carries yet.
    fn next_mark(&mut self) -> u16 {
        self.mark = self.mark.wrapping_add(1);
        if self.mark == 0 {
            self.seen.fill(0);
            self.mark = 1;
        }
        self.mark
    }

    /// The layer.
    pub fn layer(&self) -> u32 {
        self.layer
    }
    /// Number of blocks in the call.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }
    /// The runs, in call order. Panics for a plan of the `Ids` form that holds blocks: a transport given
    /// the wrong form would move nothing.
    pub fn runs(&self) -> &[Run] {
        assert!(self.form == PlanForm::Runs || self.blocks == 0, "a plan of the ids form has no runs");
        &self.runs
    }
    /// The local ids, then the remote ids, as the call gave them: `2 * blocks()` of them. Panics for a plan
    /// of the `Runs` form that holds blocks.
    pub fn ids(&self) -> &[u32] {
        assert!(self.form == PlanForm::Ids || self.blocks == 0, "a plan of the runs form has no ids");
        &self.ids
    }
    /// Whether the call moves nothing.
    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }
}

/// Refuses an id outside `[0, blocks)`, naming the first; returns the largest id (0 for none). The largest id
/// is found first, by a loop without an early exit (which the compiler vectorises); only a bad call looks for
/// the position.
fn check_range(side: &str, ids: &[u32], blocks: u32) -> Result<u32> {
    let largest = ids.iter().fold(0u32, |m, &b| m.max(b));
    if largest < blocks || ids.is_empty() {
        return Ok(largest);
    }
    let i = ids.iter().position(|&b| b >= blocks).expect("the largest id is out of range");
    Err(Error::invalid(format!("{side} block id {} (position {i}) is outside [0, {blocks})", ids[i])))
}

/// Appends the maximal runs of `local`/`remote` that are consecutive on both sides.
pub fn coalesce(local: &[u32], remote: &[u32], runs: &mut Vec<Run>) {
    let mut pairs = local.iter().zip(remote);
    let Some((&l, &r)) = pairs.next() else { return };
    let mut cur = Run { local: l, remote: r, count: 1 };
    for (&l, &r) in pairs {
        if l == cur.local.wrapping_add(cur.count) && r == cur.remote.wrapping_add(cur.count) {
            cur.count += 1;
        } else {
            runs.push(cur);
            cur = Run { local: l, remote: r, count: 1 };
        }
    }
    runs.push(cur);
}

/// Splits `runs` into `pieces` consecutive pieces of the same number of blocks (the first ones one more where it
/// does not divide), cutting a run where a piece ends: concatenated, they are `runs`. `out` is reused.
pub fn split_runs(runs: &[Run], pieces: usize, out: &mut Vec<Vec<Run>>) {
    let pieces = pieces.max(1);
    let total: u64 = runs.iter().map(|r| r.count as u64).sum();
    out.resize_with(pieces, Vec::new);
    out.iter_mut().for_each(Vec::clear);
    let mut rest = runs.iter().copied();
    let mut carried: Option<Run> = None;
    for (i, piece) in out.iter_mut().enumerate() {
        let mut want = total / pieces as u64 + u64::from((i as u64) < total % pieces as u64);
        while want > 0 {
            let Some(run) = carried.take().or_else(|| rest.next()) else { break };
            let take = (run.count as u64).min(want) as u32;
            piece.push(Run { count: take, ..run });
            if take < run.count {
                carried = Some(Run { local: run.local + take, remote: run.remote + take, count: run.count - take });
            }
            want -= take as u64;
        }
    }
}

/// Checks runs received from a peer against the receiver's own cache: each must lie inside
/// `[0, block_number)` and no two may overlap, so a write never covers more than the cache once (and never
/// expands into more ranges than the cache has blocks). `sorted` is scratch space, reused between calls.
/// Returns the number of blocks.
pub fn check_remote_runs(runs: &[Run], block_number: u32, sorted: &mut Vec<(u32, u32)>) -> Result<u64> {
    let mut blocks = 0u64;
    for (i, run) in runs.iter().enumerate() {
        let end = run.remote as u64 + run.count as u64;
        if run.count == 0 || end > block_number as u64 {
            return Err(Error::invalid(format!(
                "run {i} covers blocks [{}, {end}), outside this cache's [0, {block_number})",
                run.remote
            )));
        }
        blocks += run.count as u64;
    }
    if blocks > block_number as u64 {
        return Err(Error::invalid(format!("the runs cover {blocks} blocks, more than this cache's {block_number}: some overlap")));
    }
    sorted.clear();
    sorted.extend(runs.iter().map(|r| (r.remote, r.count)));
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 as u64 + w[0].1 as u64 > w[1].0 as u64) {
        return Err(Error::invalid(format!(
            "runs overlap: blocks [{}, {}) and [{}, {}) are both written",
            w[0].0,
            w[0].0 as u64 + w[0].1 as u64,
            w[1].0,
            w[1].0 as u64 + w[1].1 as u64
        )));
    }
    Ok(blocks)
}

/// Checks a decode peer's description of its cache before anything is written into it: one list per tensor
/// (in [`Tensor::ALL`] order), with for every tensor of `cache` one region per layer, each exactly
/// `remote_blocks` blocks of `ratio` slices, and none for the others. `region_bytes[tensor]` lists the lengths
/// the peer gave for that tensor, one per layer.
pub fn check_remote_layout(region_bytes: &[Vec<u64>], cache: &CacheLayout, ratio: u32, remote_blocks: u32) -> Result<()> {
    let bad = |why: String| Error::new(ErrorCode::Protocol, format!("the decode peer described its memory wrongly: {why}"));
    if region_bytes.len() != Tensor::ALL.len() {
        return Err(bad(format!("{} tensors instead of {}", region_bytes.len(), Tensor::ALL.len())));
    }
    for t in Tensor::ALL {
        let lens = &region_bytes[t as usize];
        let want = if cache.tensors().contains(t) { cache.layers() as usize } else { 0 };
        if lens.len() != want {
            return Err(bad(format!("{} {} regions, expected {want}", lens.len(), t.name())));
        }
        let total = (remote_blocks as u64).checked_mul(cache.block_bytes(t)).and_then(|b| b.checked_mul(ratio as u64));
        if let Some(len) = lens.iter().find(|&&len| Some(len) != total) {
            return Err(bad(format!("a {} region of {len} bytes, expected {total:?}", t.name())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_runs_cuts_equal_consecutive_pieces() {
        let runs = [Run { local: 0, remote: 10, count: 5 }, Run { local: 9, remote: 3, count: 2 }];
        let mut out = vec![];
        split_runs(&runs, 3, &mut out);
        assert_eq!(
            out,
            [
                vec![Run { local: 0, remote: 10, count: 3 }],
                vec![Run { local: 3, remote: 13, count: 2 }],
                vec![Run { local: 9, remote: 3, count: 2 }],
            ]
        );
        split_runs(&runs, 1, &mut out);
        assert_eq!(out, [runs.to_vec()]);
        split_runs(&runs[..1], 4, &mut out);
        let counts: Vec<u32> = out.iter().map(|p| p.iter().map(|r| r.count).sum()).collect();
        assert_eq!(counts, [2, 1, 1, 1]);
        let joined: Vec<u32> = out.iter().flatten().flat_map(|r| (0..r.count).map(move |k| r.remote + k)).collect();
        assert_eq!(joined, [10, 11, 12, 13, 14], "concatenated, the pieces are the runs");
    }

    fn plan(local: &[u32], remote: &[u32]) -> Result<Vec<Run>> {
        let mut p = BlockPlan::default();
        p.build(local, remote, 1, 2, 100, 50)?;
        Ok(p.runs().to_vec())
    }

    #[test]
    fn coalesces_runs_consecutive_on_both_sides() {
        let runs = plan(&[0, 1, 2, 10, 11, 5, 6], &[7, 8, 9, 3, 4, 40, 20]).unwrap();
        assert_eq!(
            runs,
            [
                Run { local: 0, remote: 7, count: 3 },
                Run { local: 10, remote: 3, count: 2 },
                Run { local: 5, remote: 40, count: 1 },
                Run { local: 6, remote: 20, count: 1 },
            ]
        );
        assert_eq!(plan(&[], &[]).unwrap(), []);
    }

    #[test]
    fn refuses_bad_calls_with_clear_reasons() {
        let cases: [(&[u32], &[u32], u32, &str); 6] = [
            (&[1, 2], &[1], 0, "must pair up"),
            (&[1], &[1], 2, "layer 2 is outside [0, 2)"),
            (&[100], &[1], 0, "local block id 100"),
            (&[1], &[50], 0, "remote block id 50"),
            (&[1, 2, 3], &[4, 5, 4], 0, "remote block id 4 (position 2) is listed twice"),
            (&[1], &[u32::MAX], 0, "outside [0, 50)"),
        ];
        for (local, remote, layer, want) in cases {
            let mut p = BlockPlan::default();
            p.build(&[3], &[3], 0, 2, 100, 50).unwrap();
            let err = p.build(local, remote, layer, 2, 100, 50).unwrap_err();
            assert!(err.message().contains(want), "{err} lacks {want}");
            assert!(p.runs().is_empty() && p.is_empty());
        }
    }

    #[test]
    fn duplicate_check_leaves_no_state_behind() {
        let mut p = BlockPlan::default();
        assert!(p.build(&[1, 2], &[9, 9], 0, 1, 10, 10).is_err());
        p.build(&[1, 2], &[9, 8], 0, 1, 10, 10).unwrap();
        p.build(&[1, 2], &[8, 9], 0, 1, 10, 10).unwrap();
        // A cache that grows between calls, and marks that wrap around.
        p.build(&[1, 2], &[18, 9], 0, 1, 10, 20).unwrap();
        p.mark = u16::MAX - 1;
        p.build(&[1, 2], &[7, 9], 0, 1, 10, 10).unwrap();
        let err = p.build(&[1, 2, 3], &[7, 5, 7], 0, 1, 10, 10).unwrap_err();
        assert!(err.message().contains("remote block id 7 (position 2)"), "{err}");
        assert!(p.mark < 5);
        p.build(&[1, 2, 3], &[7, 5, 6], 0, 1, 10, 10).unwrap();
    }

    /// A mark that wraps around starts again from marks some slot may still carry from long ago.
    #[test]
    fn wrapped_marks_do_not_meet_old_ones() {
        let mut p = BlockPlan::default();
        p.build(&[1], &[3], 0, 1, 10, 10).unwrap();
        p.mark = u16::MAX;
        p.build(&[1, 2], &[3, 4], 0, 1, 10, 10).unwrap();
    }

    /// A peer that claims a huge cache costs only what the calls use: the duplicate marks follow the ids.
    #[test]
    fn a_huge_remote_cache_allocates_nothing_up_front() {
        let mut p = BlockPlan::default();
        p.build(&[1, 2], &[5, 3], 0, 1, 10, u32::MAX).unwrap();
        assert!(p.seen.len() <= 6, "{} marks for ids up to 5", p.seen.len());
        assert!(p.build(&[1, 2], &[7, 7], 0, 1, 10, u32::MAX).is_err());
    }

    #[test]
    fn ids_form_keeps_the_call_as_given() {
        let mut p = BlockPlan::new(PlanForm::Ids);
        p.build(&[0, 1, 2, 7], &[5, 6, 7, 1], 1, 2, 100, 50).unwrap();
        assert_eq!(p.ids(), [0, 1, 2, 7, 5, 6, 7, 1]);
        assert!(p.build(&[0, 1], &[5, 5], 1, 2, 100, 50).is_err());
        assert!(p.ids().is_empty() && p.is_empty());
    }

    /// A transport handed a plan of the other form would move nothing, or read ids that are not there.
    #[test]
    #[should_panic(expected = "has no runs")]
    fn a_plan_of_the_ids_form_has_no_runs() {
        let mut p = BlockPlan::new(PlanForm::Ids);
        p.build(&[0], &[5], 0, 1, 10, 10).unwrap();
        p.runs();
    }

    #[test]
    fn tp_slices() {
        let g = SliceGeometry::for_ranks(4, 3, 2).unwrap();
        assert_eq!(g, SliceGeometry { ratio: 2, slot: 1 });
        assert_eq!(g.remote_offset(5, 100), (5 * 2 + 1) * 100);
        assert!(SliceGeometry::for_ranks(2, 2, 1).is_err());
        assert!(SliceGeometry::for_ranks(3, 0, 2).is_err());
        assert_eq!(SliceGeometry::for_ranks(2, 1, 1).unwrap(), SliceGeometry { ratio: 2, slot: 1 });
    }

    #[test]
    fn segments_cover_each_run_in_every_tensor() {
        let runs = [Run { local: 4, remote: 2, count: 2 }, Run { local: 0, remote: 7, count: 1 }];
        let tensors = TensorSet::from_bits(0b0101).unwrap(); // keys and key scales
        let slice = |t: Tensor| if t == Tensor::Key { 10 } else { 3 };
        let mut got = vec![];
        for_each_segment(&runs, tensors, slice, SliceGeometry::WHOLE, |s| got.push((s.tensor, s.local, s.remote, s.len)));
        assert_eq!(
            got,
            [(Tensor::Key, 40, 20, 20), (Tensor::Key, 0, 70, 10), (Tensor::KeyScale, 12, 6, 6), (Tensor::KeyScale, 0, 21, 3)]
        );
        // Two slices per receiver block, this sender the second: every block on its own, at its slice.
        got.clear();
        for_each_segment(&runs, tensors, slice, SliceGeometry { ratio: 2, slot: 1 }, |s| got.push((s.tensor, s.local, s.remote, s.len)));
        assert_eq!(
            got,
            [
                (Tensor::Key, 40, 50, 10),
                (Tensor::Key, 50, 70, 10),
                (Tensor::Key, 0, 150, 10),
                (Tensor::KeyScale, 12, 15, 3),
                (Tensor::KeyScale, 15, 21, 3),
                (Tensor::KeyScale, 0, 45, 3),
            ]
        );
    }

    #[test]
    fn segments_stay_inside_both_tensors() {
        // Every run at the edges of both caches: segments end at most at the tensors' ends.
        let (local_blocks, remote_blocks, slice) = (9u32, 5u32, 64u64);
        for ratio in [1u32, 2, 4] {
            for slot in 0..ratio {
                let runs = [Run { local: 0, remote: remote_blocks - 1, count: 1 }, Run { local: local_blocks - 3, remote: 0, count: 3 }];
                let g = SliceGeometry { ratio, slot };
                for_each_segment(&runs, TensorSet::from_bits(0b11).unwrap(), |_| slice, g, |s| {
                    assert!(s.local + s.len <= local_blocks as u64 * slice, "{s:?}");
                    assert!(s.remote + s.len <= (remote_blocks * ratio) as u64 * slice, "{s:?}");
                });
            }
        }
    }

    #[test]
    fn remote_runs_are_checked_by_the_receiver() {
        let mut scratch = vec![];
        let run = |remote, count| Run { local: 0, remote, count };
        assert_eq!(check_remote_runs(&[run(3, 2)], 5, &mut scratch).unwrap(), 2);
        assert!(check_remote_runs(&[run(4, 2)], 5, &mut scratch).is_err());
        assert!(check_remote_runs(&[run(u32::MAX, u32::MAX)], 5, &mut scratch).is_err());
        assert!(check_remote_runs(&[run(0, 0)], 5, &mut scratch).is_err());
        // Disjoint in any order is fine; any overlap is refused, however the runs are ordered.
        assert_eq!(check_remote_runs(&[run(3, 2), run(0, 3)], 5, &mut scratch).unwrap(), 5);
        let err = check_remote_runs(&[run(2, 2), run(0, 3)], 5, &mut scratch).unwrap_err();
        assert!(err.message().contains("runs overlap: blocks [0, 3) and [2, 4)"), "{err}");
        // The same block many times: refused before any range is built.
        let err = check_remote_runs(&vec![run(1, 1); 1000], 5, &mut scratch).unwrap_err();
        assert!(err.message().contains("more than this cache's 5"), "{err}");
    }
}
