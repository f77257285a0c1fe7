//! GPU memory as the core sees it: device pointers recognised through the CUDA driver, exported as dma-bufs
//! for RDMA registration, and the copy kernel on its own. Needs a GPU; elsewhere each test says it skipped.

use cudarc::driver::sys as cu;
use kvtransfer::cuda::{self, BlockCopy, CopyStream, Gpu, MemoryKind, PinnedBuffer, TensorCopy};

#[path = "common/ids.rs"]
mod ids;

/// Allocates `len` bytes on GPU 0 in its primary context, or `None` (and a message) without a GPU.
fn device_alloc(test: &str, len: usize) -> Option<u64> {
    // The GPU suite sets this, so that a missing driver fails instead of skipping.
    let required = std::env::var_os("KVTRANSFER_REQUIRE_GPU").is_some();
    if cuda::driver_version().is_none() {
        assert!(!required, "KVTRANSFER_REQUIRE_GPU is set, but there is no usable CUDA driver");
        eprintln!("SKIPPED {test}: no CUDA driver on this machine");
        return None;
    }
    let mut dev = 0;
    let mut ctx = std::ptr::null_mut();
    let mut ptr = 0;
    // SAFETY: plain driver calls on an initialised driver, each checked.
    unsafe {
        if cu::cuDeviceGet(&mut dev, 0) != cu::CUresult::CUDA_SUCCESS {
            assert!(!required, "KVTRANSFER_REQUIRE_GPU is set, but the driver sees no GPU");
            eprintln!("SKIPPED {test}: the CUDA driver sees no GPU");
            return None;
        }
        assert_eq!(cu::cuDevicePrimaryCtxRetain(&mut ctx, dev), cu::CUresult::CUDA_SUCCESS);
        assert_eq!(cu::cuCtxSetCurrent(ctx), cu::CUresult::CUDA_SUCCESS);
        assert_eq!(cu::cuMemAlloc_v2(&mut ptr, len), cu::CUresult::CUDA_SUCCESS);
    }
    Some(ptr)
}

#[test]
fn device_pointers_are_recognised_and_host_pointers_are_not() {
    let host = vec![0u8; 1 << 16];
    assert_eq!(cuda::memory_kind(host.as_ptr() as u64), MemoryKind::Host);
    let Some(ptr) = device_alloc("device_pointers_are_recognised_and_host_pointers_are_not", 8 << 20) else { return };
    assert_eq!(cuda::memory_kind(ptr), MemoryKind::Device { ordinal: 0 });
    assert_eq!(cuda::memory_kind(ptr + (5 << 20) + 12345), MemoryKind::Device { ordinal: 0 }, "an address inside the allocation");
    assert_eq!(cuda::memory_kind(host.as_ptr() as u64), MemoryKind::Host);
}

#[test]
fn device_memory_exports_as_a_dmabuf_around_an_unaligned_range() {
    let Some(ptr) = device_alloc("device_memory_exports_as_a_dmabuf_around_an_unaligned_range", 8 << 20) else { return };
    let addr = ptr + 4096 + 100;
    let buf = cuda::export_dmabuf(addr, 1 << 20).expect("the driver exports a dma-buf");
    assert_eq!(buf.offset, 100);
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", buf.fd.as_raw_fd())).unwrap();
    assert!(link.to_string_lossy().contains("dmabuf"), "{link:?}");
    // The range must lie inside the allocation: past its end the driver refuses.
    assert!(cuda::export_dmabuf(ptr + (8 << 20) - 4096, 1 << 20).is_err());
}

/// One launch over more items than the grid fetches ids for at once (256 per CTA, at most eight CTAs per SM),
/// starting past item 0 as the TCP staging does, with one aligned and one unaligned tensor: every item in
/// range lands exactly where its ids say, and nothing outside the range moves. The kernel reads and writes
/// mapped pinned host memory here, so the host can check it in place.
#[test]
fn the_copy_kernel_moves_each_item_of_a_long_range_once() {
    if device_alloc("the_copy_kernel_moves_each_item_of_a_long_range_once", 1).is_none() {
        return;
    }
    let gpu = Gpu::get(0).unwrap();
    let blocks = 400_000u32;
    let bytes = [16u64, 12];
    let src_ids = ids::scattered(blocks, 5);
    let dst_ids = ids::scattered(blocks, 6);
    let mut id_lists = PinnedBuffer::new(&gpu, 8 * blocks as usize).unwrap();
    id_lists.as_mut_u32()[..blocks as usize].copy_from_slice(&src_ids);
    id_lists.as_mut_u32()[blocks as usize..2 * blocks as usize].copy_from_slice(&dst_ids);
    let mut src: Vec<PinnedBuffer> = bytes.iter().map(|&b| PinnedBuffer::new(&gpu, (b * blocks as u64) as usize).unwrap()).collect();
    let dst: Vec<PinnedBuffer> = bytes.iter().map(|&b| PinnedBuffer::new(&gpu, (b * blocks as u64) as usize).unwrap()).collect();
    for (t, buf) in src.iter_mut().enumerate() {
        for (i, w) in buf.as_mut_u32().iter_mut().enumerate() {
            *w = (i as u32).wrapping_mul(2654435761) ^ t as u32 | 1;
        }
    }
    let tensor = |t: usize| TensorCopy {
        src: src[t].addr(),
        src_stride: bytes[t],
        src_offset: 0,
        dst: dst[t].addr(),
        dst_stride: bytes[t],
        dst_offset: 0,
        bytes: bytes[t],
    };
    let begin = 1000;
    let copy = BlockCopy {
        tensor: [tensor(0), tensor(1), TensorCopy::default(), TensorCopy::default()],
        src_ids: id_lists.addr(),
        dst_ids: id_lists.addr() + 4 * blocks as u64,
        blocks,
        begin,
        end: 2 * blocks,
        warp_shift: 0,
    };
    let stream = CopyStream::new(gpu).unwrap();
    // SAFETY: every id is below `blocks`, and each buffer holds `blocks` blocks of its tensor; all of them
    // outlive the synchronisation below.
    unsafe { stream.launch(&copy) }.unwrap();
    stream.synchronize().unwrap();
    let view = |b: &PinnedBuffer| {
        // SAFETY: the buffer is `len` bytes of initialised memory, and the GPU is done with it.
        unsafe { std::slice::from_raw_parts(b.addr() as *const u8, b.len()) }
    };
    for (t, &b) in bytes.iter().enumerate() {
        let (s, d, b) = (view(&src[t]), view(&dst[t]), b as usize);
        for i in 0..blocks as usize {
            let at = dst_ids[i] as usize * b;
            let moved = t > 0 || i >= begin as usize;
            let want = if moved { &s[src_ids[i] as usize * b..][..b] } else { &[0u8; 16][..b] };
            assert_eq!(&d[at..at + b], want, "tensor {t}, item {i} (source block {}, destination block {})", src_ids[i], dst_ids[i]);
        }
    }
}

#[test]
fn a_device_allocation_round_trips_its_bytes_and_refuses_ranges_past_its_end() {
    use kvtransfer::memory::DeviceAllocation;
    let Some(probe) = device_alloc("a_device_allocation_round_trips_its_bytes_and_refuses_ranges_past_its_end", 1) else { return };
    // SAFETY: the probe was allocated just above and nothing else holds it.
    unsafe { cu::cuMemFree_v2(probe) };
    let memory = DeviceAllocation::new(0, 1 << 20).unwrap();
    assert_eq!((memory.len(), memory.gpu()), (1 << 20, 0));
    assert_eq!(cuda::memory_kind(memory.addr()), MemoryKind::Device { ordinal: 0 });
    assert!(memory.read(8192, 4096).unwrap().iter().all(|&b| b == 0), "zeroed");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    memory.write(12_345, &data).unwrap();
    let back = memory.read(12_344, data.len() + 2).unwrap();
    assert_eq!((back[0], &back[1..=data.len()], back[data.len() + 1]), (0, &data[..], 0), "only the range written changed");
    for (offset, len) in [((1 << 20) - 1, 2), (1 << 20, 1), (usize::MAX, 1)] {
        let e = memory.write(offset, &vec![0; len]).unwrap_err();
        assert_eq!(e.code(), kvtransfer::ErrorCode::InvalidArgument, "{e}");
        assert_eq!(memory.read(offset, len).unwrap_err().code(), kvtransfer::ErrorCode::InvalidArgument);
    }
    let count = cuda::devices().unwrap().len() as u32;
    let e = DeviceAllocation::new(count, 1).unwrap_err();
    assert!(e.message().contains(&format!("no GPU {count}")), "{e}");
}

#[test]
fn the_device_copy_ceiling_times_each_call() {
    let Some(probe) = device_alloc("the_device_copy_ceiling_times_each_call", 1) else { return };
    // SAFETY: the probe was allocated just above and nothing else holds it.
    unsafe { cu::cuMemFree_v2(probe) };
    use kvtransfer::ceilings::Warmup;
    let warmup = Warmup { calls: 2, at_least: std::time::Duration::from_millis(20) };
    let times = kvtransfer::ceilings::device_copy(0, 0, 64 << 20, warmup, 5).unwrap();
    assert_eq!(times.len(), 5);
    assert!(times.iter().all(|t| !t.is_zero()));
    assert_eq!(kvtransfer::ceilings::device_copy(0, 0, 0, warmup, 1).unwrap_err().code(), kvtransfer::ErrorCode::InvalidArgument);
}
