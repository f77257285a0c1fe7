//! The memory a communicator owns or registers: the cache layout (one address per layer and tensor, all in
//! host memory or all on one GPU), page-aligned host allocations, and device allocations for callers that have
//! no GPU allocator of their own.

use crate::sync::lock;
use crate::cuda::{self, MemoryKind};
use crate::error::{Error, Result};
use std::ptr::NonNull;
use std::any::Any;
use std::sync::{Arc, Mutex};

/// One tensor of a cache layer. Keys are always present; values are absent in key-only (MLA) caches;
/// scales exist in quantised caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Tensor {
    Key = 0,
    Value = 1,
    KeyScale = 2,
    ValueScale = 3,
}

impl Tensor {
    /// All tensors in wire order.
    pub const ALL: [Tensor; 4] = [Tensor::Key, Tensor::Value, Tensor::KeyScale, Tensor::ValueScale];

    /// The tensor's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Tensor::Key => "key",
            Tensor::Value => "value",
            Tensor::KeyScale => "key scale",
            Tensor::ValueScale => "value scale",
        }
    }
}

/// A set of [`Tensor`]s, as a bit mask (bit `t as u8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TensorSet(u8);

impl TensorSet {
    /// The set with the given mask; `None` if it names a tensor that does not exist or lacks keys.
    pub fn from_bits(bits: u8) -> Option<TensorSet> {
        (bits & !0b1111 == 0 && bits & 1 == 1).then_some(TensorSet(bits))
    }
    /// The mask.
    pub fn bits(self) -> u8 {
        self.0
    }
    /// Whether `t` is in the set.
    pub fn contains(self, t: Tensor) -> bool {
        self.0 & (1 << t as u8) != 0
    }
    /// The tensors of the set, in wire order.
    pub fn iter(self) -> impl Iterator<Item = Tensor> {
        Tensor::ALL.into_iter().filter(move |t| self.contains(*t))
    }
    fn insert(&mut self, t: Tensor) {
        self.0 |= 1 << t as u8;
    }
}

/// What a caller hands over to describe its cache: raw addresses (device or host), one per layer.
#[derive(Debug, Clone, Default)]
pub struct CacheSpec {
    /// One key tensor address per layer (required).
    pub key: Vec<u64>,
    /// One value tensor address per layer, or empty for key-only caches.
    pub value: Vec<u64>,
    /// One key-scale tensor address per layer, or empty.
    pub key_scale: Vec<u64>,
    /// One value-scale tensor address per layer, or empty.
    pub value_scale: Vec<u64>,
    /// Blocks per tensor.
    pub block_number: u32,
    /// Bytes of one key (or value) block.
    pub block_bytes: u64,
    /// Bytes of one scale block (0 when there are no scales).
    pub scale_block_bytes: u64,
}

/// A validated cache description: every tensor of every layer spans `block_number` blocks from its address.
#[derive(Debug, Clone)]
pub struct CacheLayout {
    layers: u32,
    tensors: TensorSet,
    addrs: [Vec<u64>; 4],
    block_number: u32,
    block_bytes: u64,
    scale_block_bytes: u64,
    location: MemoryKind,
    /// What keeps the memory alive, where the library knows it ([`CacheLayout::hold`]).
    owners: Arc<Owners>,
}

/// Owners of the memory of caches that may still be written after their communicator closed.
static QUARANTINE: Mutex<Vec<Arc<dyn Any + Send + Sync>>> = Mutex::new(Vec::new());

/// Owners of a cache's memory, held until the communicator over it closes.
#[derive(Default)]
struct Owners(Mutex<Vec<Arc<dyn Any + Send + Sync>>>);

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} owners", self.0.lock().map_or(0, |o| o.len()))
    }
}

impl CacheLayout {
    /// Keeps `owner` (what owns some of the cache's memory: an allocation of the binding's, say) alive until the
    /// communicator over this layout closes ([`CacheLayout::release_owners`]) or the layout is dropped.
    pub fn hold(&self, owner: Arc<dyn Any + Send + Sync>) {
        lock(&self.owners.0).push(owner);
    }

    /// Lets go of the owners held: once nothing reads or writes the cache any more (a closed communicator).
    pub fn release_owners(&self) {
        lock(&self.owners.0).clear();
    }

    /// Keeps the owners held for the life of the process: where something may still write into the cache after
    /// its communicator closed (a same-host link that could not be stopped), its memory is never given back.
    pub fn quarantine_owners(&self) {
        let owners = std::mem::take(&mut *lock(&self.owners.0));
        lock(&QUARANTINE).extend(owners);
    }

    /// Checks a [`CacheSpec`]: list lengths agree, sizes are non-zero, no address is null, no tensor wraps
    /// around the address space, and a tensor in GPU memory lies inside its allocation.
    ///
    /// # Safety
    ///
    /// The layout is where raw addresses become memory: every address of `spec` must name memory of this
    /// process (host memory, or device memory of one GPU) that holds `block_number` blocks of its tensor and
    /// stays valid as long as the layout, or any communicator, link or registration made from it, lives. From
    /// here on transports read that memory (prefill) or let the kernel, a NIC, a GPU kernel or a peer process
    /// write into it (decode) without further checks of their own.
    pub unsafe fn new(spec: CacheSpec) -> Result<CacheLayout> {
        let layers = spec.key.len();
        if layers == 0 {
            return Err(Error::invalid("no key cache: give one key address per layer"));
        }
        if layers > u32::MAX as usize {
            return Err(Error::invalid("too many layers"));
        }
        if spec.block_number == 0 {
            return Err(Error::invalid("the block number (blocks per layer) must be at least 1"));
        }
        if spec.block_bytes == 0 {
            return Err(Error::invalid("the block bytes (bytes per block) must be at least 1"));
        }
        let mut tensors = TensorSet::default();
        tensors.insert(Tensor::Key);
        let lists = [
            (Tensor::Value, &spec.value, "value"),
            (Tensor::KeyScale, &spec.key_scale, "key scale"),
            (Tensor::ValueScale, &spec.value_scale, "value scale"),
        ];
        for (tensor, list, name) in lists {
            if list.is_empty() {
                continue;
            }
            if list.len() != layers {
                return Err(Error::invalid(format!(
                    "the {name} cache has {} layer addresses but the key cache has {layers}: give one per layer (or none)",
                    list.len()
                )));
            }
            tensors.insert(tensor);
        }
        let has_scales = tensors.contains(Tensor::KeyScale) || tensors.contains(Tensor::ValueScale);
        if has_scales && spec.scale_block_bytes == 0 {
            return Err(Error::invalid("scale caches were given but their block bytes are 0"));
        }
        if !has_scales && spec.scale_block_bytes != 0 {
            return Err(Error::invalid("scale block bytes were given without a key or value scale cache"));
        }
        let mut layout = CacheLayout {
            layers: layers as u32,
            tensors,
            addrs: [spec.key, spec.value, spec.key_scale, spec.value_scale],
            block_number: spec.block_number,
            block_bytes: spec.block_bytes,
            scale_block_bytes: spec.scale_block_bytes,
            location: MemoryKind::Host,
            owners: Arc::default(),
        };
        let mut first: Option<(MemoryKind, Tensor, usize)> = None;
        for t in tensors.iter() {
            let size = layout.tensor_bytes(t).ok_or_else(|| Error::invalid("the block number times the block bytes overflows"))?;
            for (layer, &addr) in layout.addrs[t as usize].iter().enumerate() {
                if addr == 0 {
                    return Err(Error::invalid(format!("the {} address of layer {layer} is null", t.name())));
                }
                if addr.checked_add(size).is_none() {
                    return Err(Error::invalid(format!(
                        "the {} tensor of layer {layer} ({addr:#x} + {size} bytes) wraps around the address space",
                        t.name()
                    )));
                }
                let kind = cuda::memory_kind(addr);
                match first {
                    None => first = Some((kind, t, layer)),
                    Some((k, ft, fl)) if k != kind => {
                        return Err(Error::invalid(format!(
                            "the {} address of layer {layer} is {} but the {} address of layer {fl} is {}: \
                             one cache lives in one place",
                            t.name(),
                            describe(kind),
                            ft.name(),
                            describe(k)
                        )))
                    }
                    Some(_) => {}
                }
                if let MemoryKind::Device { .. } = kind {
                    // A copy kernel running past an allocation would break the GPU context of the whole process.
                    let (base, len) = cuda::allocation_range(addr)?;
                    if addr + size > base + len {
                        return Err(Error::invalid(format!(
                            "the {} tensor of layer {layer} ({size} bytes at {addr:#x}) runs {} bytes past the end of \
                             its GPU allocation",
                            t.name(),
                            addr + size - (base + len)
                        )));
                    }
                }
            }
        }
        layout.location = first.map(|f| f.0).unwrap_or(MemoryKind::Host);
        Ok(layout)
    }

    /// Where the cache lives: host memory, or the memory of one GPU (asked of the CUDA driver).
    pub fn location(&self) -> MemoryKind {
        self.location
    }

    /// Number of layers.
    pub fn layers(&self) -> u32 {
        self.layers
    }
    /// The tensors present in every layer.
    pub fn tensors(&self) -> TensorSet {
        self.tensors
    }
    /// Blocks per tensor.
    pub fn block_number(&self) -> u32 {
        self.block_number
    }
    /// Bytes of one block of `t`.
    pub fn block_bytes(&self, t: Tensor) -> u64 {
        match t {
            Tensor::Key | Tensor::Value => self.block_bytes,
            Tensor::KeyScale | Tensor::ValueScale => self.scale_block_bytes,
        }
    }
    /// Bytes of a key (or value) block.
    pub fn kv_block_bytes(&self) -> u64 {
        self.block_bytes
    }
    /// Bytes of a scale block (0 without scales).
    pub fn scale_block_bytes(&self) -> u64 {
        self.scale_block_bytes
    }
    /// Bytes of one block of one layer, all its tensors together: what writing that block moves.
    pub fn layer_block_bytes(&self) -> u64 {
        self.tensors().iter().map(|t| self.block_bytes(t)).sum()
    }
    /// Bytes of one whole tensor of one layer, `None` on overflow.
    pub fn tensor_bytes(&self, t: Tensor) -> Option<u64> {
        (self.block_number as u64).checked_mul(self.block_bytes(t))
    }
    /// The address of tensor `t` of `layer`. Panics if the tensor is absent or the layer out of range.
    pub fn addr(&self, t: Tensor, layer: u32) -> u64 {
        self.addrs[t as usize][layer as usize]
    }
    /// All addresses of tensor `t`, one per layer (empty when absent).
    pub fn addrs(&self, t: Tensor) -> &[u64] {
        &self.addrs[t as usize]
    }
}

fn describe(kind: MemoryKind) -> String {
    match kind {
        MemoryKind::Host => "host memory".into(),
        MemoryKind::Device { ordinal } => format!("memory of GPU {ordinal}"),
    }
}

/// The size of a transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Page-aligned, zero-filled host memory from an anonymous mapping, unmapped on drop; from 2 MiB, advised to
/// use transparent huge pages.
///
/// ```
/// let mut m = kvtransfer::memory::HostAllocation::new(10_000).unwrap();
/// assert_eq!(m.addr() % 4096, 0);
/// m.as_mut_slice()[9_999] = 7;
/// assert_eq!(m.as_slice()[9_999], 7);
/// ```
#[derive(Debug)]
pub struct HostAllocation {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing in it is tied to a thread.
unsafe impl Send for HostAllocation {}
// SAFETY: shared access only hands out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for HostAllocation {}

impl HostAllocation {
    /// Maps `len` bytes (at least 1).
    pub fn new(len: usize) -> Result<HostAllocation> {
        if len == 0 {
            return Err(Error::invalid("cannot allocate 0 bytes"));
        }
        // SAFETY: an anonymous private mapping with a null hint touches no existing memory; the result is
        // checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::invalid(format!(
                "cannot allocate {len} bytes of host memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        if len >= HUGE_PAGE {
            // Transparent huge pages where the kernel gives them only on request (`madvise` mode), as numpy and
            // PyTorch ask for theirs: a cache's pages then cost a copy a fraction of the page-table lookups.
            // Advice only: where it is refused the mapping works with small pages.
            // SAFETY: the range is the mapping just made, whole and ours.
            unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        }
        Ok(HostAllocation { ptr: NonNull::new(ptr.cast()).expect("mmap returned null"), len })
    }
    /// The address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false: allocations have at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostAllocation {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Zeroed memory of one GPU (`cuMemAlloc`: CUDA IPC and RDMA can use it), freed on drop: device caches for a
/// caller with no GPU allocator of its own (the Node.js binding's `DeviceBuffer`, its bench and tests). Bytes go
/// in and out by copies ([`write`](Self::write), [`read`](Self::read)); the host never maps it.
pub struct DeviceAllocation(pub(crate) cuda::gpu::DeviceBuffer);

impl std::fmt::Debug for DeviceAllocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceAllocation({} bytes at {:#x} on GPU {})", self.len(), self.addr(), self.gpu())
    }
}

impl DeviceAllocation {
    /// `len` bytes (at least 1) on GPU `gpu`. `UNAVAILABLE` without a CUDA driver, without that GPU, or where
    /// it has not the memory.
    pub fn new(gpu: u32, len: usize) -> Result<DeviceAllocation> {
        if len == 0 {
            return Err(Error::invalid("cannot allocate 0 bytes"));
        }
        let count = cuda::device_count()?;
        if gpu >= count {
            let have = match count {
                0 => "this machine has no GPU that a CUDA driver serves".to_string(),
                n => format!("this process sees {n} GPU(s), 0 to {}", n - 1),
            };
            return Err(Error::new(crate::error::ErrorCode::Unavailable, format!("no GPU {gpu}: {have}")));
        }
        Ok(DeviceAllocation(cuda::gpu::DeviceBuffer::zeroed(cuda::Gpu::get(gpu)?, len)?))
    }
    /// The device address of the first byte.
    pub fn addr(&self) -> u64 {
        self.0.addr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Always false: allocations have at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The GPU it lives on.
    pub fn gpu(&self) -> u32 {
        self.0.gpu().ordinal()
    }
    /// Copies `bytes` in from `offset`; `INVALID_ARGUMENT` past the end.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        self.0.write(offset, bytes)
    }
    /// A copy of `len` bytes from `offset`; `INVALID_ARGUMENT` past the end, `UNAVAILABLE` where the host memory
    /// to copy into cannot be had.
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        self.0.read(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_memory_without_a_gpu_is_a_clear_error() {
        if !cuda::devices().unwrap().is_empty() {
            return; // the GPU suite covers a machine with one (gpu_memory.rs)
        }
        let e = DeviceAllocation::new(0, 4096).unwrap_err();
        assert_eq!(e.code(), crate::error::ErrorCode::Unavailable);
        assert!(e.message().contains("no GPU 0"), "{e}");
        assert_eq!(DeviceAllocation::new(0, 0).unwrap_err().code(), crate::error::ErrorCode::InvalidArgument);
    }

    fn spec(layers: usize) -> CacheSpec {
        CacheSpec {
            key: (0..layers).map(|i| 0x10000 * (i as u64 + 1)).collect(),
            value: (0..layers).map(|i| 0x100000 * (i as u64 + 1)).collect(),
            block_number: 8,
            block_bytes: 64,
            ..CacheSpec::default()
        }
    }

    #[test]
    fn valid_layout() {
        // SAFETY (for every layout of these tests): the addresses are made up and never read or written.
        let l = unsafe { CacheLayout::new(spec(3)) }.unwrap();
        assert_eq!(l.layers(), 3);
        assert_eq!(l.tensors().iter().collect::<Vec<_>>(), [Tensor::Key, Tensor::Value]);
        assert_eq!(l.tensor_bytes(Tensor::Key), Some(512));
        assert_eq!(l.addr(Tensor::Value, 2), 0x300000);
    }

    #[test]
    fn key_only_and_scales() {
        let mut s = spec(2);
        s.value.clear();
        s.key_scale = vec![0x1000, 0x2000];
        s.scale_block_bytes = 4;
        let l = unsafe { CacheLayout::new(s) }.unwrap();
        assert_eq!(l.tensors().iter().collect::<Vec<_>>(), [Tensor::Key, Tensor::KeyScale]);
        assert_eq!(l.block_bytes(Tensor::KeyScale), 4);
    }

    #[test]
    fn refusals() {
        let cases: Vec<(Box<dyn Fn(&mut CacheSpec)>, &str)> = vec![
            (Box::new(|s| s.key.clear()), "no key cache"),
            (Box::new(|s| s.value.pop().map(drop).unwrap_or(())), "the value cache has 2 layer addresses"),
            (Box::new(|s| s.block_number = 0), "block number"),
            (Box::new(|s| s.block_bytes = 0), "block bytes"),
            (Box::new(|s| s.key[1] = 0), "null"),
            (Box::new(|s| s.key[0] = u64::MAX - 10), "wraps"),
            (Box::new(|s| s.key_scale = vec![1, 2, 3]), "their block bytes are 0"),
            (Box::new(|s| s.scale_block_bytes = 4), "without a key or value scale cache"),
        ];
        for (mutate, want) in cases {
            let mut s = spec(3);
            mutate(&mut s);
            let err = unsafe { CacheLayout::new(s) }.unwrap_err();
            assert!(err.message().contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn tensor_sets() {
        assert!(TensorSet::from_bits(0b0010).is_none(), "keys are required");
        assert!(TensorSet::from_bits(0b10001).is_none());
        assert_eq!(TensorSet::from_bits(0b0101).unwrap().iter().count(), 2);
    }
}
