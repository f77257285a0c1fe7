//! The CUDA IPC transport: prefill and decode on one host, caches in GPU memory. The decode side exports each
//! allocation its cache lives in as an IPC handle; the prefill side maps them once, at connect, and each write
//! is one launch of the block-copy kernel on the prefill's GPU, finished before the call returns.

use crate::config::Config;
use crate::cuda::ipc::{self, IpcHandle, IpcMapping};
use crate::cuda::{BlockCopy, CopyStream, Gpu, MemoryKind, PinnedBuffer, TensorCopy};
use crate::error::{Error, ErrorCode, Result};
use crate::memory::{CacheLayout, Tensor};
use crate::plan::{self, BlockPlan, PlanForm, SliceGeometry};
use crate::transport::{self, Accepted, Acceptor, Admission, Answer, Connector, Environment, Link, PendingLink, Transport};
use crate::wire::TransportKind;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The registry entry.
pub struct CudaIpc;

impl Transport for CudaIpc {
    fn kind(&self) -> TransportKind {
        TransportKind::CudaIpc
    }

    fn serves(&self, location: MemoryKind) -> bool {
        matches!(location, MemoryKind::Device { .. })
    }

    fn probe(&self, _config: &Config) -> std::result::Result<String, String> {
        match crate::cuda::devices() {
            Err(e) => Err(e.message().to_string()),
            Ok(gpus) if gpus.is_empty() => Err("the CUDA driver sees no GPU".into()),
            Ok(gpus) => Ok(format!("GPU caches, processes of one host ({} GPU{})", gpus.len(), if gpus.len() == 1 { "" } else { "s" })),
        }
    }

    fn acceptor(&self, env: &Environment<'_>) -> Result<Arc<dyn Acceptor>> {
        let welcome = export(env.cache).map_err(|e| Error::new(e.code(), format!("cuda-ipc: {}", e.message())))?;
        Ok(Arc::new(CudaIpcExport { welcome }))
    }

    fn connector(&self, env: &Environment<'_>) -> Result<Arc<dyn Connector>> {
        Ok(Arc::new(CudaIpcConnector { cache: env.cache.clone() }))
    }
}

/// The decode's half: its cache, exported once.
struct CudaIpcExport {
    welcome: IpcWelcome,
}

impl Acceptor for CudaIpcExport {
    fn kind(&self) -> TransportKind {
        TransportKind::CudaIpc
    }

    fn accept(&self, _admission: &Admission<'_>) -> Result<Accepted> {
        Ok(Accepted { session: crate::auth::random_u64(), details: transport::to_details(&self.welcome) })
    }
}

/// The prefill's half.
struct CudaIpcConnector {
    cache: Arc<CacheLayout>,
}

impl Connector for CudaIpcConnector {
    fn kind(&self) -> TransportKind {
        TransportKind::CudaIpc
    }

    fn prepare(&self) -> Result<Box<dyn PendingLink>> {
        Ok(Box::new(CudaIpcConnector { cache: self.cache.clone() }))
    }
}

impl PendingLink for CudaIpcConnector {
    fn finish(self: Box<Self>, answer: &Answer<'_>) -> Result<Box<dyn Link>> {
        let welcome: IpcWelcome = transport::from_details(TransportKind::CudaIpc, answer.details)?;
        Ok(Box::new(CudaIpcLink::open(answer.peer.to_string(), self.cache, &welcome, answer.geometry, answer.remote_blocks)?))
    }
}

/// Where one tensor of one layer lies: `len` bytes, `offset` bytes into allocation `allocation`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct IpcRegion {
    pub allocation: u32,
    pub offset: u64,
    pub len: u64,
}

/// The decode's side of the handshake: its allocations and where the cache lies in them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpcWelcome {
    /// One IPC handle (hex) per allocation.
    pub allocations: Vec<String>,
    /// `[tensor][layer]`, in [`Tensor::ALL`] order; empty lists for absent tensors.
    pub regions: Vec<Vec<IpcRegion>>,
}

/// Exports a decode cache in GPU memory (done once, when the decode side starts listening).
pub fn export(cache: &CacheLayout) -> Result<IpcWelcome> {
    if !matches!(cache.location(), MemoryKind::Device { .. }) {
        return Err(Error::new(ErrorCode::Unavailable, "the cache is in host memory; cuda-ipc needs GPU memory"));
    }
    let mut allocations: Vec<ipc::Allocation> = Vec::new();
    let mut regions = vec![Vec::new(); 4];
    for t in cache.tensors().iter() {
        let len = cache.tensor_bytes(t).expect("checked by CacheLayout");
        for (layer, &addr) in cache.addrs(t).iter().enumerate() {
            let index = match allocations.iter().position(|a| a.base <= addr && addr < a.base + a.size) {
                Some(i) => i,
                None => {
                    allocations.push(ipc::export(addr).map_err(|e| {
                        Error::new(e.code(), format!("the {} tensor of layer {layer}: {}", t.name(), e.message()))
                    })?);
                    allocations.len() - 1
                }
            };
            regions[t as usize].push(IpcRegion { allocation: index as u32, offset: addr - allocations[index].base, len });
        }
    }
    Ok(IpcWelcome { allocations: allocations.iter().map(|a| a.handle.to_hex()).collect(), regions })
}

/// A prefill's connection to one decode peer on the same host.
pub struct CudaIpcLink {
    peer: String,
    cache: Arc<CacheLayout>,
    geometry: SliceGeometry,
    stream: CopyStream,
    /// The peer's tensors, mapped here: `[tensor][layer]`.
    remote: [Vec<u64>; 4],
    _mappings: Vec<IpcMapping>,
    /// Source then destination block ids of the current write, read by the kernel in place.
    ids: PinnedBuffer,
}

impl CudaIpcLink {
    /// Maps the peer's allocations on the cache's GPU, after checking its layout against the agreed geometry.
    pub(crate) fn open(peer: String, cache: Arc<CacheLayout>, welcome: &IpcWelcome, geometry: SliceGeometry, remote_blocks: u32) -> Result<CudaIpcLink> {
        let MemoryKind::Device { ordinal } = cache.location() else {
            return Err(Error::new(ErrorCode::Unavailable, "the cache is in host memory; cuda-ipc needs GPU memory"));
        };
        let lens: Vec<Vec<u64>> = welcome.regions.iter().map(|l| l.iter().map(|r| r.len).collect()).collect();
        plan::check_remote_layout(&lens, &cache, geometry.ratio, remote_blocks)?;
        let gpu = Gpu::get(ordinal)?;
        let mut mappings = Vec::with_capacity(welcome.allocations.len());
        for hex in &welcome.allocations {
            mappings.push(IpcMapping::open(&gpu, IpcHandle::from_hex(hex)?)?);
        }
        let mut remote: [Vec<u64>; 4] = Default::default();
        for t in Tensor::ALL {
            for r in &welcome.regions[t as usize] {
                let mapping = mappings
                    .get(r.allocation as usize)
                    .ok_or_else(|| Error::protocol(format!("a region names allocation {} of {}", r.allocation, mappings.len())))?;
                // The copy kernel writes [offset, offset + len) of the mapping: it must lie inside the allocation
                // the driver mapped, whatever the peer claims.
                if r.offset.checked_add(r.len).is_none_or(|end| end > mapping.len()) {
                    return Err(Error::protocol(format!(
                        "the decode peer placed a {} region at offset {} + {} bytes of an allocation of {} bytes",
                        t.name(),
                        r.offset,
                        r.len,
                        mapping.len()
                    )));
                }
                remote[t as usize].push(mapping.addr() + r.offset);
            }
        }
        let ids = PinnedBuffer::new(&gpu, 8 * cache.block_number() as usize)?;
        Ok(CudaIpcLink { peer, cache, geometry, stream: CopyStream::new(gpu)?, remote, _mappings: mappings, ids })
    }
}

/// The kernel parameters that copy `plan`'s blocks of every tensor of `cache`, from `src(tensor)` into
/// `dst(tensor)` laid out with `geometry`. Ids are read from `ids`: `blocks` source ids, then `blocks`
/// destination ids.
fn block_copy(cache: &CacheLayout, plan: &BlockPlan, geometry: SliceGeometry, ids: u64, dst: impl Fn(Tensor) -> u64) -> BlockCopy {
    let blocks = plan.blocks();
    let mut copy = BlockCopy { src_ids: ids, dst_ids: ids + 4 * blocks as u64, blocks, ..Default::default() };
    let mut count = 0;
    for (slot, t) in cache.tensors().iter().enumerate() {
        let slice = cache.block_bytes(t);
        copy.tensor[slot] = TensorCopy {
            src: cache.addr(t, plan.layer()),
            src_stride: slice,
            src_offset: 0,
            dst: dst(t),
            dst_stride: slice * geometry.ratio as u64,
            dst_offset: slice * geometry.slot as u64,
            bytes: slice,
        };
        count += 1;
    }
    copy.end = count * blocks;
    copy
}

/// Writes `plan`'s block ids into `ids` (sources first, then destinations), growing it when needed.
fn fill_ids(ids: &mut PinnedBuffer, plan: &BlockPlan, gpu: &Gpu) -> Result<()> {
    let list = plan.ids();
    if ids.len() < 4 * list.len() {
        *ids = PinnedBuffer::new(gpu, 4 * list.len())?;
    }
    ids.as_mut_u32()[..list.len()].copy_from_slice(list);
    Ok(())
}

impl Link for CudaIpcLink {
    fn plan_form(&self) -> PlanForm {
        PlanForm::Ids
    }

    fn write(&mut self, plan: &BlockPlan) -> Result<()> {
        self.write_marked(plan, 0, &mut || {})
    }

    /// The mark is not sent: the copy has completed when this returns. `meanwhile` runs while the GPU copies.
    fn write_marked(&mut self, plan: &BlockPlan, _mark: u32, meanwhile: &mut dyn FnMut()) -> Result<()> {
        fill_ids(&mut self.ids, plan, self.stream.gpu())?;
        let layer = plan.layer() as usize;
        let copy = block_copy(&self.cache, plan, self.geometry, self.ids.addr(), |t| self.remote[t as usize][layer]);
        // SAFETY: `fill_ids` wrote the plan's 2 × blocks ids (`ids()` refuses a plan of another form). Local
        // blocks lie inside the cache (the plan checked the ids against blockNumber, and CacheLayout checked
        // each tensor against its allocation); remote blocks lie inside the peer's tensors (ids checked
        // against its block count, its layout against the geometry at `open`); the id lists live in
        // `self.ids`, which is not touched again before the stream is synchronised below.
        unsafe { self.stream.launch(&copy) }?;
        // Synchronised even if `meanwhile` panics (the kernel reads `self.ids` until then); the panic is then
        // this write's error, so the decode is told it failed.
        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| meanwhile()));
        let copied = self.stream.synchronize().map_err(|e| Error::new(e.code(), format!("writing into {}: {}", self.peer, e.message())));
        prepared.map_err(|panic| Error::from_panic(&*panic))?;
        copied
    }

    fn transport(&self) -> TransportKind {
        TransportKind::CudaIpc
    }
}
