//! Caches in GPU memory over TCP. The socket cannot reach device memory, so blocks pass through pinned host
//! buffers: the prefill side gathers them there with the copy kernel and sends each buffer; the decode side
//! receives into the buffers and the kernel scatters them into the cache. The buffers form a ring, so the GPU
//! copy of one chunk overlaps the network I/O of the others.
//!
//! The bytes on the wire are the same as for host memory (tensor by tensor, blocks in run order), so either
//! side may stage or not, independently.

use crate::cuda::gpu::{self, CopyStream, Gpu, PinnedBuffer};
use crate::cuda::{BlockCopy, MemoryKind, TensorCopy};
use crate::error::Result;
use crate::memory::CacheLayout;
use crate::plan::{Run, SliceGeometry};
use cudarc::driver::CudaEvent;

/// Bytes per ring slot (more when one block is larger).
const SLOT_BYTES: usize = 1 << 20;
/// Slots in the ring.
const SLOTS: usize = 4;

/// One payload chunk: items `[begin, end)` (item `j` is block `j % blocks` of tensor slot `j / blocks`).
#[derive(Debug, Clone, Copy)]
struct Chunk {
    begin: u32,
    end: u32,
    /// Offset of the chunk's first byte in the payload, and its length.
    offset: u64,
    len: u64,
}

/// Pinned buffers and a stream on the cache's GPU.
pub struct Staging {
    stream: CopyStream,
    slots: Vec<(PinnedBuffer, CudaEvent)>,
    /// Block ids of the current write, read by the kernel in place.
    ids: PinnedBuffer,
    chunks: Vec<Chunk>,
}

impl Staging {
    /// Staging for `cache`, or `None` when it is in host memory (the socket reads and writes it directly).
    pub fn for_cache(cache: &CacheLayout) -> Result<Option<Staging>> {
        let MemoryKind::Device { ordinal } = cache.location() else { return Ok(None) };
        let gpu = Gpu::get(ordinal)?;
        let largest = cache.tensors().iter().map(|t| cache.block_bytes(t)).max().unwrap_or(0) as usize;
        let stream = CopyStream::new(gpu.clone())?;
        let mut slots = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            slots.push((PinnedBuffer::new(&gpu, SLOT_BYTES.max(largest))?, stream.event()?));
        }
        let ids = PinnedBuffer::new(&gpu, 4 * cache.block_number() as usize)?;
        Ok(Some(Staging { stream, slots, ids, chunks: Vec::new() }))
    }

    /// Sends the blocks of `runs` (local ids) of `layer`: gathers chunk after chunk into the ring and hands
    /// each filled buffer to `send`.
    ///
    /// # Safety
    ///
    /// Every run must lie inside `[0, cache.block_number())`: the copy kernel reads where the ids say.
    pub unsafe fn send(&mut self, cache: &CacheLayout, layer: u32, runs: &[Run], send: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let result = self.send_chunks(cache, layer, runs, send);
        self.settle(result)
    }

    fn send_chunks(&mut self, cache: &CacheLayout, layer: u32, runs: &[Run], mut send: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let blocks = self.fill_ids(runs, |r| r.local)?;
        self.plan_chunks(cache, blocks, 1);
        let launch = |this: &mut Staging, c: usize| -> Result<()> {
            let chunk = this.chunks[c];
            let (buf, done) = &this.slots[c % SLOTS];
            let mut copy = BlockCopy { src_ids: this.ids.addr(), dst_ids: 0, blocks, begin: chunk.begin, end: chunk.end, ..Default::default() };
            let mut prefix = 0u64;
            for (k, t) in cache.tensors().iter().enumerate() {
                let bytes = cache.block_bytes(t);
                copy.tensor[k] = TensorCopy {
                    src: cache.addr(t, layer),
                    src_stride: bytes,
                    src_offset: 0,
                    dst: buf.addr().wrapping_sub(chunk.offset).wrapping_add(prefix),
                    dst_stride: bytes,
                    dst_offset: 0,
                    bytes,
                };
                prefix += blocks as u64 * bytes;
            }
            // SAFETY: sources are blocks of the cache (ids checked by the plan against blockNumber); the
            // destinations of items [begin, end) are exactly [offset, offset + len) of the payload, which is
            // this slot's buffer (`plan_chunks` made each chunk fit a slot); the slot is not reused before
            // `done` is waited for, and the ids are not rewritten before every chunk is sent.
            unsafe { this.stream.launch(&copy) }?;
            this.stream.record(done)
        };
        for c in 0..self.chunks.len().min(SLOTS) {
            launch(self, c)?;
        }
        for c in 0..self.chunks.len() {
            let chunk = self.chunks[c];
            let (buf, done) = &self.slots[c % SLOTS];
            gpu::wait(done)?;
            send(buf.addr(), chunk.len)?;
            if c + SLOTS < self.chunks.len() {
                launch(self, c + SLOTS)?;
            }
        }
        Ok(())
    }

    /// Receives the blocks of `runs` (remote ids) of `layer`: `receive` fills each slot from the socket, and
    /// the kernel scatters it into the cache (each block at its slice of `geometry`). Returns once every
    /// byte is in the cache.
    ///
    /// # Safety
    ///
    /// Every run must lie inside `[0, cache.block_number())`: the copy kernel writes where the ids say.
    pub unsafe fn receive(
        &mut self,
        cache: &CacheLayout,
        layer: u32,
        runs: &[Run],
        geometry: SliceGeometry,
        receive: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let result = self.receive_chunks(cache, layer, runs, geometry, receive);
        self.settle(result)
    }

    /// After a failure, waits for the copies already launched: they still use the ring and the ids, which the
    /// next call rewrites (or the owner frees).
    fn settle(&self, result: Result<()>) -> Result<()> {
        if result.is_err() {
            let _ = self.stream.synchronize();
        }
        result
    }

    fn receive_chunks(
        &mut self,
        cache: &CacheLayout,
        layer: u32,
        runs: &[Run],
        geometry: SliceGeometry,
        mut receive: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let blocks = self.fill_ids(runs, |r| r.remote)?;
        let ratio = geometry.ratio as u64;
        self.plan_chunks(cache, blocks, ratio);
        for c in 0..self.chunks.len() {
            let chunk = self.chunks[c];
            let (buf, done) = &self.slots[c % SLOTS];
            if c >= SLOTS {
                gpu::wait(done)?;
            }
            receive(buf.addr(), chunk.len)?;
            let mut copy = BlockCopy { src_ids: 0, dst_ids: self.ids.addr(), blocks, begin: chunk.begin, end: chunk.end, ..Default::default() };
            let mut prefix = 0u64;
            for (k, t) in cache.tensors().iter().enumerate() {
                let slice = cache.block_bytes(t) / ratio;
                copy.tensor[k] = TensorCopy {
                    src: buf.addr().wrapping_sub(chunk.offset).wrapping_add(prefix),
                    src_stride: slice,
                    src_offset: 0,
                    dst: cache.addr(t, layer),
                    dst_stride: cache.block_bytes(t),
                    dst_offset: geometry.slot as u64 * slice,
                    bytes: slice,
                };
                prefix += blocks as u64 * slice;
            }
            // SAFETY: destinations are slices of cache blocks whose ids the receiver checked against its
            // blockNumber; sources are this slot's buffer, just filled; the slot is reused only after `done`.
            unsafe { self.stream.launch(&copy) }?;
            self.stream.record(done)?;
        }
        self.stream.synchronize()
    }

    /// Writes one id per block of `runs` (`id(run)` + k), growing the list when needed; returns the count.
    fn fill_ids(&mut self, runs: &[Run], id: impl Fn(&Run) -> u32) -> Result<u32> {
        let n: usize = runs.iter().map(|r| r.count as usize).sum();
        if self.ids.len() < 4 * n {
            self.ids = PinnedBuffer::new(self.stream.gpu(), 4 * n)?;
        }
        let ids = self.ids.as_mut_u32();
        let mut i = 0;
        for run in runs {
            for k in 0..run.count {
                ids[i] = id(run) + k;
                i += 1;
            }
        }
        Ok(n as u32)
    }

    /// Splits the payload (`blocks` blocks of each tensor, each `block_bytes / ratio` long) into chunks of
    /// whole blocks of one tensor that fit a slot.
    fn plan_chunks(&mut self, cache: &CacheLayout, blocks: u32, ratio: u64) {
        self.chunks.clear();
        let capacity = self.slots[0].0.len() as u64;
        let mut offset = 0u64;
        for (k, t) in cache.tensors().iter().enumerate() {
            let bytes = cache.block_bytes(t) / ratio;
            let per_chunk = (capacity / bytes).clamp(1, blocks.max(1) as u64) as u32;
            let base = k as u32 * blocks;
            let mut i = 0;
            while i < blocks {
                let end = (i + per_chunk).min(blocks);
                let len = (end - i) as u64 * bytes;
                self.chunks.push(Chunk { begin: base + i, end: base + end, offset, len });
                offset += len;
                i = end;
            }
        }
    }
}
