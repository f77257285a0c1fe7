//! The Node.js binding of kvtransfer: argument conversion and async tasks only. All behaviour lives in
//! the `kvtransfer` crate; errors cross as `"CODE: message"`, which `index.ts` turns into `KVTransferError`.

use kvtransfer::memory::{CacheSpec, HostAllocation};
use kvtransfer::{Communicator, CommunicatorSpec, Config, Role, Setting};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::collections::HashMap;
use std::sync::Arc;

fn to_napi(e: kvtransfer::Error) -> napi::Error {
    napi::Error::new(Status::GenericFailure, e.to_string())
}

fn invalid(message: String) -> napi::Error {
    to_napi(kvtransfer::Error::invalid(message))
}

fn addresses(name: &str, list: &[BigInt]) -> Result<Vec<u64>> {
    list.iter()
        .enumerate()
        .map(|(i, b)| match b.get_u64() {
            (false, v, true) => Ok(v),
            _ => Err(invalid(format!("{name}[{i}] is not an address (a non-negative 64-bit integer)"))),
        })
        .collect()
}

fn port(p: u32) -> Result<u16> {
    u16::try_from(p).map_err(|_| invalid(format!("port {p} is outside [0, 65535]")))
}

/// Everything the constructor takes, already type-checked by `index.ts`.
#[napi(object)]
pub struct NativeInit {
    pub role: String,
    pub gpu_idx: u32,
    pub port: u32,
    pub key_ptrs: Vec<BigInt>,
    pub value_ptrs: Vec<BigInt>,
    pub key_scale_ptrs: Vec<BigInt>,
    pub value_scale_ptrs: Vec<BigInt>,
    pub block_number: u32,
    pub block_bytes: i64,
    pub scale_block_bytes: i64,
    pub prefill_tp_size: u32,
    pub prefill_tp_idx: u32,
    /// Option name → value, for the settings of `kvtransfer::Setting`.
    pub settings: HashMap<String, String>,
}

/// The native communicator behind `RDMACommunicator`.
#[napi]
pub struct NativeCommunicator {
    inner: Arc<Communicator>,
}

#[napi]
impl NativeCommunicator {
    #[napi(constructor)]
    pub fn new(init: NativeInit) -> Result<Self> {
        let role: Role = init.role.parse().map_err(to_napi)?;
        let mut overrides = Vec::with_capacity(init.settings.len());
        for (name, value) in init.settings {
            let setting = Setting::from_option_name(&name).ok_or_else(|| invalid(format!("unknown option {name:?}")))?;
            overrides.push((setting, value));
        }
        let config = Config::load(&overrides).map_err(to_napi)?;
        let non_negative = |name: &str, v: i64| u64::try_from(v).map_err(|_| invalid(format!("{name} must not be negative")));
        let spec = CommunicatorSpec {
            role,
            gpu_idx: init.gpu_idx,
            port: port(init.port)?,
            cache: CacheSpec {
                key: addresses("keyPtrs", &init.key_ptrs)?,
                value: addresses("valuePtrs", &init.value_ptrs)?,
                key_scale: addresses("keyScalePtrs", &init.key_scale_ptrs)?,
                value_scale: addresses("valueScalePtrs", &init.value_scale_ptrs)?,
                block_number: init.block_number,
                block_bytes: non_negative("blockBytes", init.block_bytes)?,
                scale_block_bytes: non_negative("scaleBlockBytes", init.scale_block_bytes)?,
            },
            tp_size: init.prefill_tp_size,
            tp_idx: init.prefill_tp_idx,
        };
        let inner = Communicator::new(spec, config).map_err(to_napi)?;
        Ok(NativeCommunicator { inner: Arc::new(inner) })
    }

    /// The control port a decode communicator listens on (0 for prefill).
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        self.inner.port() as u32
    }

    /// The preferred transport (`"cuda-ipc"`, `"shm"`, `"rdma"` or `"tcp"`).
    #[napi(getter)]
    pub fn transport(&self) -> &'static str {
        self.inner.transport().as_str()
    }

    /// The RDMA device in use, if any.
    #[napi(getter)]
    pub fn rdma_device(&self) -> Option<String> {
        self.inner.rdma_device().map(str::to_string)
    }

    #[napi]
    pub fn connect(&self, ip: String, port: u32, dst_tp_size: u32) -> Result<()> {
        self.inner.connect(&ip, self::port(port)?, dst_tp_size).map_err(to_napi)
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_async(&self, ip: String, port: u32, dst_tp_size: u32) -> Result<AsyncTask<ConnectTask>> {
        Ok(AsyncTask::new(ConnectTask { inner: self.inner.clone(), ip, port: self::port(port)?, dst_tp_size }))
    }

    #[napi]
    pub fn is_connected(&self, ip: String, port: u32) -> bool {
        u16::try_from(port).is_ok_and(|p| self.inner.is_connected(&ip, p))
    }

    /// The transport of the connection to `ip:port`, if there is one.
    #[napi]
    pub fn connected_transport(&self, ip: String, port: u32) -> Option<&'static str> {
        u16::try_from(port).ok().and_then(|p| self.inner.connected_transport(&ip, p)).map(|k| k.as_str())
    }

    #[napi]
    pub fn write_cache(&self, ip: String, port: u32, local: Uint32Array, remote: Uint32Array, layer: u32) -> Result<()> {
        self.inner.write_cache(&ip, self::port(port)?, &local, &remote, layer).map_err(to_napi)
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn write_cache_async(
        &self,
        ip: String,
        port: u32,
        local: Uint32Array,
        remote: Uint32Array,
        layer: u32,
    ) -> Result<AsyncTask<WriteTask>> {
        Ok(AsyncTask::new(WriteTask {
            inner: self.inner.clone(),
            ip,
            port: self::port(port)?,
            local: local.to_vec(),
            remote: remote.to_vec(),
            layer,
        }))
    }

    /// Records a refusal made by `index.ts` in the error log.
    #[napi]
    pub fn log_error(&self, message: String) {
        self.inner.log_error(&message);
    }

    #[napi]
    pub fn close(&self) {
        self.inner.close();
    }
}

pub struct ConnectTask {
    inner: Arc<Communicator>,
    ip: String,
    port: u16,
    dst_tp_size: u32,
}

impl Task for ConnectTask {
    type Output = ();
    type JsValue = ();
    fn compute(&mut self) -> Result<()> {
        self.inner.connect(&self.ip, self.port, self.dst_tp_size).map_err(to_napi)
    }
    fn resolve(&mut self, _env: Env, _out: ()) -> Result<()> {
        Ok(())
    }
}

pub struct WriteTask {
    inner: Arc<Communicator>,
    ip: String,
    port: u16,
    local: Vec<u32>,
    remote: Vec<u32>,
    layer: u32,
}

impl Task for WriteTask {
    type Output = ();
    type JsValue = ();
    fn compute(&mut self) -> Result<()> {
        self.inner.write_cache(&self.ip, self.port, &self.local, &self.remote, self.layer).map_err(to_napi)
    }
    fn resolve(&mut self, _env: Env, _out: ()) -> Result<()> {
        Ok(())
    }
}

/// Page-aligned, zero-filled host memory as a `Buffer`; the memory is released when the buffer is
/// collected or detached (see [`host_free`]).
#[napi]
pub fn host_alloc(env: &Env, bytes: i64) -> Result<BufferSlice<'_>> {
    let len = usize::try_from(bytes).ok().filter(|&n| n > 0).ok_or_else(|| invalid(format!("cannot allocate {bytes} bytes")))?;
    let mut memory = HostAllocation::new(len).map_err(to_napi)?;
    let data = memory.as_mut_slice().as_mut_ptr();
    // SAFETY: `data` is `len` bytes owned by `memory`, which moves into the finaliser and so lives exactly as
    // long as the buffer's backing store.
    unsafe { BufferSlice::from_external(env, data, len, memory, |_, memory| drop(memory)) }
}

/// The address of a buffer's first byte.
#[napi]
pub fn buffer_address(buffer: BufferSlice) -> BigInt {
    BigInt::from(buffer.as_ptr() as u64)
}

/// Detaches a buffer's memory from JavaScript: the buffer reads as empty afterwards and its memory goes
/// back to the system as soon as the engine lets go of it.
#[napi]
pub fn host_free(env: &Env, buffer: Unknown) -> Result<()> {
    let mut arraybuffer = std::ptr::null_mut();
    // SAFETY: `buffer` is a live value of this env; napi checks it is a typed array and fails otherwise.
    let status = unsafe {
        napi::sys::napi_get_typedarray_info(
            env.raw(),
            buffer.raw(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut arraybuffer,
            std::ptr::null_mut(),
        )
    };
    if status != napi::sys::Status::napi_ok {
        return Err(invalid("free() expects the Buffer of a HostBuffer".into()));
    }
    // SAFETY: `arraybuffer` was just returned by napi for this env.
    let status = unsafe { napi::sys::napi_detach_arraybuffer(env.raw(), arraybuffer) };
    if status != napi::sys::Status::napi_ok {
        return Err(invalid("this buffer's memory cannot be detached".into()));
    }
    Ok(())
}

/// One GID table entry of an RDMA port.
#[napi(object)]
pub struct RdmaGid {
    pub index: u32,
    pub gid: String,
}

/// One port of an RDMA device.
#[napi(object)]
pub struct RdmaPort {
    pub port: u32,
    /// `ACTIVE`, `DOWN`, ...
    pub state: String,
    /// `Ethernet` (RoCE) or `InfiniBand`.
    pub link_layer: String,
    /// Active MTU in bytes.
    pub mtu: u32,
    pub lid: u32,
    pub gids: Vec<RdmaGid>,
}

/// An RDMA device of this machine.
#[napi(object)]
pub struct RdmaDevice {
    pub name: String,
    pub ports: Vec<RdmaPort>,
}

/// The RDMA devices this machine has, with their ports and GIDs. Fails with `UNAVAILABLE` where libibverbs
/// is missing.
#[napi]
pub fn rdma_devices() -> Result<Vec<RdmaDevice>> {
    let devices = kvtransfer::transport::rdma::devices().map_err(to_napi)?;
    Ok(devices
        .into_iter()
        .map(|d| RdmaDevice {
            name: d.name,
            ports: d
                .ports
                .into_iter()
                .map(|p| RdmaPort {
                    port: p.port as u32,
                    state: p.state.into(),
                    link_layer: p.link_layer.into(),
                    mtu: p.mtu,
                    lid: p.lid as u32,
                    gids: p.gids.into_iter().map(|g| RdmaGid { index: g.index, gid: g.gid }).collect(),
                })
                .collect(),
        })
        .collect())
}

/// What this machine offers kvtransfer (`kvtransfer info`), as JSON: the settings in force with bad values
/// flagged, each transport and why it cannot be used, the RDMA devices and the GPUs.
#[napi]
pub fn system_report() -> String {
    kvtransfer::system::SystemReport::gather().to_json()
}
