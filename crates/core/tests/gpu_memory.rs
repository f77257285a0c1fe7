//! GPU memory as the core sees it: device pointers recognised through the CUDA driver, and exported as
//! dma-bufs for RDMA registration. Needs a GPU; elsewhere each test says it skipped.

use cudarc::driver::sys as cu;
use kvtransfer::cuda::{self, MemoryKind};

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
