//! The CUDA driver, loaded at run time (`libcuda.so.1`, through `cudarc`): telling device memory from host
//! memory, exporting device memory as a dma-buf for RDMA registration, the block-copy kernel ([`gpu`]) and
//! IPC handles ([`ipc`]). Without a driver every address is host memory and nothing here fails.

pub mod gpu;
pub mod ipc;

pub use gpu::{BlockCopy, CopyStream, Gpu, PinnedBuffer, TensorCopy};

use crate::error::{Error, ErrorCode, Result};
use cudarc::driver::sys as cu;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;

/// Where an address lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Host memory (or any address the CUDA driver does not know).
    Host,
    /// Memory of GPU `ordinal`.
    Device { ordinal: u32 },
}

/// The driver's version (`12080` for 12.8), or `None` where there is no usable CUDA driver.
pub fn driver_version() -> Option<i32> {
    static VERSION: OnceLock<Option<i32>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        // SAFETY: `is_culib_present` only tries to open the library; the calls after it happen only once it
        // is known to load, so cudarc's loader cannot panic.
        unsafe {
            if !cu::is_culib_present() {
                return None;
            }
            if cu::cuInit(0) != cu::CUresult::CUDA_SUCCESS {
                return None;
            }
            let mut v = 0;
            (cu::cuDriverGetVersion(&mut v) == cu::CUresult::CUDA_SUCCESS).then_some(v)
        }
    })
}

/// One GPU, as `kvtransfer info` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    pub ordinal: u32,
    pub name: String,
    pub memory_bytes: u64,
    /// `major.minor`, e.g. `9.0` for Hopper.
    pub compute_capability: String,
}

/// The GPUs the driver sees (none without a driver).
pub fn devices() -> Result<Vec<GpuInfo>> {
    (0..device_count()? as i32)
        .map(|ordinal| {
            let (mut dev, mut bytes, mut major, mut minor) = (0, 0usize, 0, 0);
            let mut name = [0 as std::ffi::c_char; 256];
            // SAFETY: `ordinal` is below the count; each call writes into a local of the documented type, the
            // name into a buffer whose length is passed.
            unsafe {
                check(cu::cuDeviceGet(&mut dev, ordinal), "opening a GPU")?;
                check(cu::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev), "reading a GPU's name")?;
                check(cu::cuDeviceTotalMem_v2(&mut bytes, dev), "reading a GPU's memory size")?;
                use cu::CUdevice_attribute::*;
                check(cu::cuDeviceGetAttribute(&mut major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "reading a GPU's compute capability")?;
                check(cu::cuDeviceGetAttribute(&mut minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "reading a GPU's compute capability")?;
            }
            // SAFETY: the driver wrote a NUL-terminated name into the buffer (zeroed, so terminated anyway).
            let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
            Ok(GpuInfo { ordinal: ordinal as u32, name, memory_bytes: bytes as u64, compute_capability: format!("{major}.{minor}") })
        })
        .collect()
}

/// How many GPUs the driver sees (none without a driver).
pub fn device_count() -> Result<u32> {
    if driver_version().is_none() {
        return Ok(0);
    }
    let mut count = 0;
    // SAFETY: the driver is initialised; it writes the count.
    check(unsafe { cu::cuDeviceGetCount(&mut count) }, "counting GPUs")?;
    Ok(count.max(0) as u32)
}

/// Asks the driver whether `addr` is device memory.
pub fn memory_kind(addr: u64) -> MemoryKind {
    if driver_version().is_none() {
        return MemoryKind::Host;
    }
    let mut memory_type: u32 = 0;
    let mut ordinal: i32 = 0;
    // SAFETY: the driver is initialised; each attribute is written into a value of the size the driver
    // documents (an unsigned int for the memory type, an int for the ordinal). Unknown addresses fail.
    let device = unsafe {
        cu::cuPointerGetAttribute(
            &mut memory_type as *mut u32 as *mut _,
            cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            addr,
        ) == cu::CUresult::CUDA_SUCCESS
            && memory_type == cu::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
            && cu::cuPointerGetAttribute(
                &mut ordinal as *mut i32 as *mut _,
                cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                addr,
            ) == cu::CUresult::CUDA_SUCCESS
    };
    match device {
        true => MemoryKind::Device { ordinal: ordinal.max(0) as u32 },
        false => MemoryKind::Host,
    }
}

/// The device allocation holding `addr`: its first address and size.
pub fn allocation_range(addr: u64) -> Result<(u64, u64)> {
    in_context_of(addr, || {
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: the driver writes a device pointer and a size into the two locals; unknown addresses fail.
        check(unsafe { cu::cuMemGetAddressRange_v2(&mut base, &mut size, addr) }, "finding the allocation of a device address")?;
        Ok((base, size as u64))
    })
}

/// Runs `f` with the CUDA context that owns device address `addr` current on this thread. Calls that look an
/// allocation up (its range, an IPC handle, a dma-buf) only find it from its own context: a process that
/// drives several GPUs usually has another one current.
pub(crate) fn in_context_of<T>(addr: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let mut context: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: the driver is initialised (the caller found `addr` to be device memory); the context attribute
    // is a CUcontext-sized value.
    let rc = unsafe {
        cu::cuPointerGetAttribute(&mut context as *mut cu::CUcontext as *mut _, cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT, addr)
    };
    check(rc, "finding the CUDA context of a device address")?;
    // SAFETY: the context is live (it owns a live allocation); it is popped again before returning.
    check(unsafe { cu::cuCtxPushCurrent_v2(context) }, "entering the CUDA context of a device address")?;
    let result = f();
    let mut popped = std::ptr::null_mut();
    // SAFETY: pops exactly the context pushed above.
    unsafe { cu::cuCtxPopCurrent_v2(&mut popped) };
    result
}

/// Device memory exported as a dma-buf: the fd covers `[start, start + len)`, page-aligned around the range
/// asked for, which begins `offset` bytes into it.
#[derive(Debug)]
pub struct DmaBuf {
    pub fd: OwnedFd,
    pub offset: u64,
}

/// Exports `len` bytes of device memory at `addr` as a dma-buf (CUDA 11.7 and later).
pub fn export_dmabuf(addr: u64, len: u64) -> Result<DmaBuf> {
    let unavailable = |why: String| Error::new(ErrorCode::Unavailable, why);
    match driver_version() {
        None => return Err(unavailable("no CUDA driver".into())),
        Some(v) if v < 11070 => return Err(unavailable(format!("CUDA driver {v} exports no dma-buf (needs 11.7)"))),
        Some(_) => {}
    }
    const PAGE: u64 = 4096;
    let start = addr & !(PAGE - 1);
    let end = addr.checked_add(len).and_then(|e| e.checked_next_multiple_of(PAGE)).ok_or_else(|| Error::invalid("range overflows"))?;
    let mut fd: i32 = -1;
    let rc = in_context_of(addr, || {
        // SAFETY: the memory's own context is current; the handle is an int-sized fd.
        Ok(unsafe {
            cu::cuMemGetHandleForAddressRange(
                &mut fd as *mut i32 as *mut _,
                start,
                (end - start) as usize,
                cu::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        })
    })?;
    check(rc, "exporting the cache as a dma-buf")?;
    // SAFETY: the driver returned a fresh fd that nothing else owns.
    Ok(DmaBuf { fd: unsafe { OwnedFd::from_raw_fd(fd) }, offset: addr - start })
}

/// A driver failure as an `UNAVAILABLE` error naming what was being done.
pub(crate) fn driver_error(e: cudarc::driver::DriverError, what: &str) -> Error {
    match check(e.0, what) {
        Err(e) => e,
        Ok(()) => Error::new(ErrorCode::Unavailable, format!("{what}: failed")),
    }
}

pub(crate) fn check(rc: cu::CUresult, what: &str) -> Result<()> {
    if rc == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string, or fails and leaves it null.
    unsafe { cu::cuGetErrorName(rc, &mut name) };
    let name = match name.is_null() {
        true => format!("{rc:?}"),
        // SAFETY: non-null names are static NUL-terminated strings.
        false => unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned(),
    };
    Err(Error::new(ErrorCode::Unavailable, format!("{what}: {name}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_is_host_with_or_without_a_driver() {
        let v = vec![0u8; 4096];
        assert_eq!(memory_kind(v.as_ptr() as u64), MemoryKind::Host);
        if driver_version().is_none() {
            assert!(export_dmabuf(v.as_ptr() as u64, 4096).unwrap_err().message().contains("no CUDA driver"));
        }
    }
}
