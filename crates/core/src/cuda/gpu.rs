//! One GPU as kvtransfer drives it: the device's primary context (the one PyTorch and every runtime-API user
//! shares), the block-copy kernel loaded into it, streams that launch that kernel, and pinned host buffers the
//! kernel reads and writes in place.

use super::driver_error;
use crate::error::{Error, ErrorCode, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernel, compiled from `copy_blocks.cu` by `build_ptx.py`.
const COPY_BLOCKS_PTX: &str = include_str!("copy_blocks.ptx");

/// Threads per CTA of the copy kernel: eight warps, which share out up to eight blocks per pass.
const THREADS: u32 = 256;

/// A GPU with the copy kernel loaded. One per device per process, shared.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    copy_blocks: CudaFunction,
    /// Most CTAs worth launching at once (the rest of the work is grid-strided).
    max_ctas: u32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.ctx.ordinal())
    }
}

impl Gpu {
    /// GPU `ordinal` (as this process numbers them), loading the kernel on first use.
    pub fn get(ordinal: u32) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<u32, Arc<Gpu>>>> = OnceLock::new();
        if super::driver_version().is_none() {
            return Err(Error::new(ErrorCode::Unavailable, "no CUDA driver"));
        }
        let mut gpus = GPUS.get_or_init(Default::default).lock().unwrap();
        if let Some(gpu) = gpus.get(&ordinal) {
            return Ok(gpu.clone());
        }
        let what = |step: &str| format!("{step} on GPU {ordinal}");
        let ctx = CudaContext::new(ordinal as usize).map_err(|e| driver_error(e, &what("opening the primary context")))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(COPY_BLOCKS_PTX))
            .map_err(|e| driver_error(e, &what("loading the block-copy kernel")))?;
        let copy_blocks = module.load_function("copy_blocks").map_err(|e| driver_error(e, &what("finding copy_blocks")))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error(e, &what("reading the SM count")))?;
        let gpu = Arc::new(Gpu { ctx, copy_blocks, max_ctas: (sms.max(1) as u32) * (2048 / THREADS) });
        gpus.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    /// The ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ctx.ordinal() as u32
    }

    /// Makes this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(e, "making the CUDA context current"))
    }
}

/// Where the blocks of one tensor come from and go to: block `i` lies at `base + i * stride + offset`, and
/// `bytes` of it are copied. Mirrors `TensorCopy` in `copy_blocks.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TensorCopy {
    pub src: u64,
    pub src_stride: u64,
    pub src_offset: u64,
    pub dst: u64,
    pub dst_stride: u64,
    pub dst_offset: u64,
    pub bytes: u64,
}

/// One launch of the copy kernel. Item `j` in `[begin, end)` copies block `src_ids[j % blocks]` of tensor
/// `j / blocks` to block `dst_ids[j % blocks]`; a null id list means the identity. Mirrors `BlockCopy` in
/// `copy_blocks.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockCopy {
    pub tensor: [TensorCopy; 4],
    pub src_ids: u64,
    pub dst_ids: u64,
    pub blocks: u32,
    pub begin: u32,
    pub end: u32,
    /// Each item is moved by `1 << warp_shift` warps (0 to 3); [`CopyStream::launch`] sets it from the
    /// block size.
    pub warp_shift: u32,
}

impl BlockCopy {
    /// Warps per item, as a shift: one warp per block below 32 KiB, four from 32 KiB. Measured on an H100:
    /// four are 3% faster than one at 64 KiB and no different at 16 KiB; for 1–4 KiB blocks they are
    /// slower, as most of their lanes then sit idle.
    fn warp_shift_for(bytes: u64) -> u32 {
        match bytes {
            0..=32767 => 0,
            _ => 2,
        }
    }
}

// SAFETY: `BlockCopy` is `repr(C)` plain data whose layout matches the kernel's parameter struct (checked by
// the `block_copy_matches_the_kernel` test against the PTX).
unsafe impl DeviceRepr for BlockCopy {}

/// A stream of copies on one GPU.
pub struct CopyStream {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
}

impl CopyStream {
    /// A new stream on `gpu`.
    pub fn new(gpu: Arc<Gpu>) -> Result<CopyStream> {
        let stream = gpu.ctx.new_stream().map_err(|e| driver_error(e, "creating a CUDA stream"))?;
        Ok(CopyStream { gpu, stream })
    }

    /// The GPU.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Enqueues `copy`.
    ///
    /// # Safety
    /// Every address `copy` names (both id lists for `blocks` entries, and each block range it reaches) must
    /// be memory this GPU can access, and stay so until the stream has passed this copy. A bad address is a
    /// fault on the GPU that breaks the whole context, so callers validate against the caches' geometry first.
    pub unsafe fn launch(&self, copy: &BlockCopy) -> Result<()> {
        let items = copy.end.saturating_sub(copy.begin);
        if items == 0 {
            return Ok(());
        }
        let mut copy = *copy;
        let config = grid(&mut copy, items, self.gpu.max_ctas);
        // SAFETY: the kernel takes one `BlockCopy` by value, which is what is pushed; the caller vouches for
        // the addresses inside it.
        unsafe { self.stream.launch_builder(&self.gpu.copy_blocks).arg(&copy).launch(config) }
            .map(|_| ())
            .map_err(|e| driver_error(e, "launching the block copy"))
    }

    /// Waits until everything enqueued so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| transfer_error(e, "waiting for the block copy"))
    }

    /// An event to mark points in this stream with.
    pub fn event(&self) -> Result<CudaEvent> {
        self.gpu.ctx.new_event(None).map_err(|e| driver_error(e, "creating a CUDA event"))
    }

    /// Marks the current end of the stream with `event`.
    pub fn record(&self, event: &CudaEvent) -> Result<()> {
        event.record(&self.stream).map_err(|e| driver_error(e, "recording a CUDA event"))
    }

    /// Copies all of `src` into the start of `dst` (which may be another GPU's) and waits for it: one large
    /// device copy, the ceiling a transfer between GPUs is measured against.
    pub fn copy(&self, dst: &DeviceBuffer, src: &DeviceBuffer) -> Result<()> {
        let to = dst.range(0, src.len)?;
        self.gpu.bind()?;
        // SAFETY: both ranges lie inside live allocations (`src` whole, `dst` checked above); both buffers are
        // borrowed until the stream has finished the copy (waited for below).
        super::check(unsafe { sys::cuMemcpyDtoDAsync_v2(to, src.ptr, src.len, self.raw()) }, "copying between device buffers")?;
        self.synchronize()
    }

    /// The raw stream, for copies the driver does itself.
    pub fn raw(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }
}

/// CTAs for `items` items of `copy` (at most `max_ctas`, the rest grid-strided); sets its warp shift.
fn grid(copy: &mut BlockCopy, items: u32, max_ctas: u32) -> LaunchConfig {
    let largest = copy.tensor.iter().map(|t| t.bytes).max().unwrap_or(0);
    copy.warp_shift = BlockCopy::warp_shift_for(largest);
    let items_per_cta = (THREADS / 32) >> copy.warp_shift;
    let ctas = items.div_ceil(items_per_cta).min(max_ctas);
    LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl Drop for CopyStream {
    /// Waits for the stream first: copies still running read and write buffers that their owners free next.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

/// Waits for `event`.
pub fn wait(event: &CudaEvent) -> Result<()> {
    event.synchronize().map_err(|e| transfer_error(e, "waiting for a block copy"))
}

/// A failure of work already running on the GPU: the transfer failed, whatever the cause.
fn transfer_error(e: cudarc::driver::DriverError, what: &str) -> Error {
    let e = driver_error(e, what);
    Error::new(ErrorCode::Transport, e.message().to_string())
}

/// Page-locked host memory mapped into every GPU's address space: the copy kernel reads and writes it in
/// place (same address on host and device).
pub struct PinnedBuffer {
    _slice: PinnedHostSlice<u8>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; whoever holds it (`&mut` to write) decides when the
// GPU may touch it.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    /// `len` bytes (at least one), zeroed.
    pub fn new(gpu: &Gpu, len: usize) -> Result<PinnedBuffer> {
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the memory is zeroed below before anything reads it.
        let mut slice = unsafe { gpu.ctx.alloc_pinned_with_flags::<u8>(len.max(1), flags) }
            .map_err(|e| driver_error(e, &format!("allocating {len} bytes of pinned host memory")))?;
        let ptr = slice.as_mut_ptr().map_err(|e| driver_error(e, "mapping pinned host memory"))?;
        // SAFETY: `ptr` points at `len.max(1)` bytes just allocated and owned here.
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        Ok(PinnedBuffer { _slice: slice, ptr, len: len.max(1) })
    }

    /// The address (the same on the host and on every GPU).
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The buffer as `u32`s, for id lists. Only while no copy that reads it is in flight.
    pub fn as_mut_u32(&mut self) -> &mut [u32] {
        // SAFETY: the allocation is page-aligned and `len` bytes long; `&mut self` excludes other host users,
        // and callers wait for the GPU before rewriting ids.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u32, self.len / 4) }
    }
}

/// Memory of one GPU (`cuMemAlloc`, so CUDA IPC and dma-buf export work on it), freed on drop: the RDMA flush
/// target, and the device caches of `DeviceBuffer` in the Node.js binding (its bench and tests).
pub struct DeviceBuffer {
    gpu: Arc<Gpu>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: a device address and the GPU that owns it, no host pointer. Every use through `&self` (`write`, `read`,
// `copy`) is a synchronous driver copy of a range checked against `len`; no Rust reference ever aliases the device
// bytes, so copies from two threads can race only on them, never on memory Rust reads; the allocation is freed
// once, by `Drop`, after every `&self` user has returned.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// A copy of `bytes` (at least one) in the memory of `gpu`.
    pub fn with_bytes(gpu: Arc<Gpu>, bytes: &[u8]) -> Result<DeviceBuffer> {
        let buffer = DeviceBuffer::zeroed(gpu, bytes.len())?;
        buffer.write(0, bytes)?;
        Ok(buffer)
    }

    /// `len` bytes (at least one) of the memory of `gpu`, zeroed.
    pub fn zeroed(gpu: Arc<Gpu>, len: usize) -> Result<DeviceBuffer> {
        gpu.bind()?;
        let len = len.max(1);
        // SAFETY: the GPU's context is current on this thread (bound above).
        let ptr = unsafe { cudarc::driver::result::malloc_sync(len) }
            .map_err(|e| driver_error(e, &format!("allocating {len} bytes on GPU {}", gpu.ordinal())))?;
        let buffer = DeviceBuffer { gpu, ptr, len };
        // SAFETY: `ptr` is `len` bytes of device memory just allocated in the current context.
        unsafe { cudarc::driver::result::memset_d8_sync(ptr, 0, len) }.map_err(|e| driver_error(e, "zeroing device memory"))?;
        Ok(buffer)
    }

    /// The device range of `len` bytes from `offset`, or `INVALID_ARGUMENT` where it runs past the end.
    fn range(&self, offset: usize, len: usize) -> Result<sys::CUdeviceptr> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.ptr + offset as u64),
            _ => Err(Error::invalid(format!("{len} bytes from offset {offset} run past the end of {} bytes of device memory", self.len))),
        }
    }

    /// Copies `bytes` into this memory from `offset`, returning once they are there.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        let at = self.range(offset, bytes.len())?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.gpu.bind()?;
        // SAFETY: `at..at + bytes.len()` lies inside this allocation (checked above), which lives as long as
        // `self`; `bytes` is a live slice; the copy is synchronous, so nothing of `bytes` is read after return.
        unsafe { cudarc::driver::result::memcpy_htod_sync(at, bytes) }.map_err(|e| driver_error(e, "copying into device memory"))
    }

    /// A copy of `len` bytes of this memory from `offset`. The host memory is reserved fallibly, once the range
    /// is known to be inside: a read as large as a GPU is an `UNAVAILABLE` error, never an abort.
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let at = self.range(offset, len)?;
        let mut out = Vec::new();
        out.try_reserve_exact(len).map_err(|_| Error::new(ErrorCode::Unavailable, format!("cannot allocate {len} bytes of host memory to read into")))?;
        out.resize(len, 0);
        if len > 0 {
            self.gpu.bind()?;
            // SAFETY: as in `write`; `out` is a live, exclusively owned buffer of `len` bytes the synchronous copy fills.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, at) }.map_err(|e| driver_error(e, "copying out of device memory"))?;
        }
        Ok(out)
    }

    /// The GPU it lives on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Its device address.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by `malloc_sync` in this GPU's context (current again), freed once; whatever read
            // it (a memory region) was released before its owner dropped this buffer.
            let _ = unsafe { cudarc::driver::result::free_sync(self.ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PTX reads `begin` at byte 244 and `end` and `warp_shift` together at 248 of its parameter; so must
    /// we.
    #[test]
    fn block_copy_matches_the_kernel() {
        assert_eq!(std::mem::offset_of!(BlockCopy, src_ids), 224);
        assert_eq!(std::mem::offset_of!(BlockCopy, blocks), 240);
        assert_eq!(std::mem::offset_of!(BlockCopy, begin), 244);
        assert_eq!(std::mem::offset_of!(BlockCopy, end), 248);
        assert_eq!(std::mem::offset_of!(BlockCopy, warp_shift), 252);
        assert_eq!(std::mem::size_of::<BlockCopy>(), 256);
        assert!(COPY_BLOCKS_PTX.contains("[copy_blocks_param_0+244]"));
        // `end` and `warp_shift` in one load: the PTX was built from the kernel that has the shift.
        assert!(COPY_BLOCKS_PTX.lines().any(|l| l.contains("ld.param.v2.u32") && l.contains("[copy_blocks_param_0+248]")));
        assert!(COPY_BLOCKS_PTX.contains("_ZZ11copy_blocksE3ids[2048]"), "the ids of 256 items in shared memory");
        assert!(COPY_BLOCKS_PTX.contains(".entry copy_blocks("));
    }

    #[test]
    fn without_a_driver_there_is_no_gpu() {
        if super::super::driver_version().is_none() {
            assert_eq!(Gpu::get(0).unwrap_err().code(), ErrorCode::Unavailable);
        }
    }
}
