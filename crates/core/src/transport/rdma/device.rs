//! RDMA devices: finding one by name, opening it, and describing what this machine has.
//!
//! Verbs come from `libibverbs.so.1`, loaded when the process starts (through `rdma-mummy-sys`); without it
//! every call here fails with a clear [`ErrorCode::Unavailable`] error instead of the process failing to load.

use crate::error::{Error, ErrorCode, Result};
use rdma_mummy_sys as ibv;
use serde::Serialize;
use std::ffi::CStr;
use std::path::Path;
use std::sync::Arc;

/// The port every connection uses. Multi-port HCAs show up as one device per port on current drivers.
pub const PORT: u8 = 1;

// verbs.h's anonymous link-layer enum, which the bindings leave out.
const LINK_LAYER_UNSPECIFIED: u8 = 0;
const LINK_LAYER_INFINIBAND: u8 = 1;
const LINK_LAYER_ETHERNET: u8 = 2;

/// What `kvtransfer info` shows about one device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub ports: Vec<PortInfo>,
}

/// One port of a device.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortInfo {
    pub port: u8,
    /// `ACTIVE`, `DOWN`, `INIT`, ...
    pub state: &'static str,
    /// `Ethernet` (RoCE) or `InfiniBand`.
    pub link_layer: &'static str,
    /// Active MTU in bytes.
    pub mtu: u32,
    pub lid: u16,
    /// The non-empty GID table entries.
    pub gids: Vec<GidInfo>,
}

/// One GID table entry.
#[derive(Debug, Clone, Serialize)]
pub struct GidInfo {
    pub index: u32,
    pub gid: String,
}

/// Lists the RDMA devices of this machine; where there are none, an [`ErrorCode::Unavailable`] error says why
/// (no libibverbs, no RDMA in the kernel, no provider for the kernel's devices).
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let list = DeviceList::load()?;
    let mut out = Vec::new();
    for dev in list.iter() {
        let name = device_name(dev);
        let Ok(ctx) = Context::open(dev, &name) else {
            out.push(DeviceInfo { name, ports: Vec::new() });
            continue;
        };
        let mut ports = Vec::new();
        let attr = ctx.query_device()?;
        for port in 1..=attr.phys_port_cnt {
            let Ok(p) = ctx.query_port(port) else { continue };
            let gids = (0..p.gid_tbl_len.max(0) as u32)
                .filter_map(|index| ctx.query_gid(port, index).ok().map(|gid| (index, gid)))
                .filter(|(_, gid)| *gid != [0; 16])
                .map(|(index, gid)| GidInfo { index, gid: format_gid(&gid) })
                .collect();
            ports.push(PortInfo {
                port,
                state: port_state_name(p.state),
                link_layer: link_layer_name(p.link_layer),
                mtu: mtu_bytes(p.active_mtu),
                lid: p.lid,
                gids,
            });
        }
        out.push(DeviceInfo { name, ports });
    }
    Ok(out)
}

/// An opened device with its port checked and its GID read: everything a queue pair needs to address
/// itself.
pub struct Device {
    ctx: Context,
    name: String,
    gid_index: u8,
    gid: [u8; 16],
    lid: u16,
    link_layer: u8,
    active_mtu: ibv::ibv_mtu::Type,
    max_msg_bytes: u64,
    max_qp_wr: u32,
    max_rd_atomic: u8,
}

impl Device {
    /// Opens the device called `name`, or with `None` the first device whose port is active, and checks
    /// that its port is active and that GID `gid_index` is usable (RoCE needs it; InfiniBand uses the LID).
    pub fn open(name: Option<&str>, gid_index: u32) -> Result<Arc<Device>> {
        let list = DeviceList::load()?;
        let names: Vec<String> = list.iter().map(device_name).collect();
        let candidates: Vec<usize> = match name {
            Some(n) => match names.iter().position(|d| d == n) {
                Some(i) => vec![i],
                None => {
                    return Err(Error::new(
                        ErrorCode::Unavailable,
                        format!("RDMA device {n:?} (from KVCACHE_RDMA_NICS) does not exist; this machine has {names:?}"),
                    ))
                }
            },
            None => (0..names.len()).collect(),
        };
        let mut first_error = None;
        for i in candidates {
            match Device::open_one(list.get(i), &names[i], gid_index) {
                Ok(d) => return Ok(Arc::new(d)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.expect("at least one candidate"))
    }

    fn open_one(dev: *mut ibv::ibv_device, name: &str, gid_index: u32) -> Result<Device> {
        let ctx = Context::open(dev, name)?;
        let attr = ctx.query_device()?;
        let port = ctx.query_port(PORT)?;
        if port.state != ibv::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(Error::new(
                ErrorCode::Unavailable,
                format!("RDMA device {name} port {PORT} is {}, not ACTIVE", port_state_name(port.state)),
            ));
        }
        let gid_index_u8 = u8::try_from(gid_index)
            .ok()
            .filter(|&g| (g as i32) < port.gid_tbl_len)
            .ok_or_else(|| {
                Error::config(format!(
                    "KVCACHE_RDMA_GID_INDEX={gid_index} is outside the GID table of {name} port {PORT} ({} entries)",
                    port.gid_tbl_len
                ))
            })?;
        let gid = ctx.query_gid(PORT, gid_index)?;
        let ethernet = port.link_layer == LINK_LAYER_ETHERNET;
        if ethernet && gid == [0; 16] {
            return Err(Error::config(format!(
                "KVCACHE_RDMA_GID_INDEX={gid_index}: that GID of {name} port {PORT} is empty (RoCE needs a GID; \
                 `kvtransfer info` lists the usable ones)"
            )));
        }
        Ok(Device {
            name: name.to_string(),
            gid_index: gid_index_u8,
            gid,
            lid: port.lid,
            link_layer: port.link_layer,
            active_mtu: port.active_mtu,
            max_msg_bytes: port.max_msg_sz as u64,
            max_qp_wr: attr.max_qp_wr.max(1) as u32,
            max_rd_atomic: attr.max_qp_rd_atom.clamp(1, 16).min(attr.max_qp_init_rd_atom.max(1)) as u8,
            ctx,
        })
    }

    /// The device's name (`mlx5_0`, `rxe0`).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub(super) fn raw(&self) -> *mut ibv::ibv_context {
        self.ctx.0
    }
    pub(super) fn gid_index(&self) -> u8 {
        self.gid_index
    }
    pub(super) fn gid(&self) -> [u8; 16] {
        self.gid
    }
    pub(super) fn lid(&self) -> u16 {
        self.lid
    }
    /// Whether the port runs Ethernet (RoCE: addressed by GID) rather than InfiniBand (by LID).
    pub(super) fn is_ethernet(&self) -> bool {
        self.link_layer == LINK_LAYER_ETHERNET
    }
    pub(super) fn active_mtu(&self) -> ibv::ibv_mtu::Type {
        self.active_mtu
    }
    /// Largest message one work request may carry.
    pub(super) fn max_msg_bytes(&self) -> u64 {
        self.max_msg_bytes
    }
    pub(super) fn max_qp_wr(&self) -> u32 {
        self.max_qp_wr
    }
    pub(super) fn max_rd_atomic(&self) -> u8 {
        self.max_rd_atomic
    }
}

/// An open `ibv_context`, closed on drop.
struct Context(*mut ibv::ibv_context);

// SAFETY: libibverbs contexts are thread-safe; the pointer is only freed in Drop.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    fn open(dev: *mut ibv::ibv_device, name: &str) -> Result<Context> {
        // SAFETY: `dev` comes from a live device list (the caller holds it).
        let ctx = unsafe { ibv::ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(os_error(&format!("opening RDMA device {name}")));
        }
        Ok(Context(ctx))
    }

    fn query_device(&self) -> Result<ibv::ibv_device_attr> {
        // SAFETY: ibv_device_attr is plain data, valid zeroed; the context is open.
        let mut attr: ibv::ibv_device_attr = unsafe { std::mem::zeroed() };
        let rc = unsafe { ibv::ibv_query_device(self.0, &mut attr) };
        check(rc, "querying the RDMA device")?;
        Ok(attr)
    }

    fn query_port(&self, port: u8) -> Result<ibv::ibv_port_attr> {
        // SAFETY: as above; ibv_query_port writes at most size_of::<ibv_port_attr>() bytes.
        let mut attr: ibv::ibv_port_attr = unsafe { std::mem::zeroed() };
        let rc = unsafe { ibv::ibv_query_port(self.0, port, &mut attr) };
        check(rc, &format!("querying port {port}"))?;
        Ok(attr)
    }

    fn query_gid(&self, port: u8, index: u32) -> Result<[u8; 16]> {
        // SAFETY: ibv_gid is 16 plain bytes; the context is open.
        let mut gid: ibv::ibv_gid = unsafe { std::mem::zeroed() };
        let rc = unsafe { ibv::ibv_query_gid(self.0, port, index as i32, &mut gid) };
        check(rc, &format!("reading GID {index} of port {port}"))?;
        // SAFETY: every bit pattern of the union is a valid byte array.
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device; every object created on it holds an Arc to its Device, so
        // none outlives this.
        unsafe { ibv::ibv_close_device(self.0) };
    }
}

/// The device list, freed on drop.
struct DeviceList {
    list: *mut *mut ibv::ibv_device,
    len: usize,
}

impl DeviceList {
    /// The devices libibverbs lists, or an `UNAVAILABLE` error that says why there are none, in the terms of
    /// what the user can change (a library, a kernel module).
    fn load() -> Result<DeviceList> {
        let mut n = 0i32;
        // SAFETY: plain call; the result is checked for null.
        let list = unsafe { ibv::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = std::io::Error::last_os_error();
            return Err(Error::new(ErrorCode::Unavailable, format!("RDMA is unavailable: {}", why_no_devices(Path::new(SYSFS_CLASS), Some(e)))));
        }
        let list = DeviceList { list, len: n.max(0) as usize };
        if list.len == 0 {
            return Err(Error::new(ErrorCode::Unavailable, format!("RDMA is unavailable: {}", why_no_devices(Path::new(SYSFS_CLASS), None))));
        }
        Ok(list)
    }

    fn get(&self, i: usize) -> *mut ibv::ibv_device {
        assert!(i < self.len);
        // SAFETY: i is inside the list's `len` entries.
        unsafe { *self.list.add(i) }
    }

    fn iter(&self) -> impl Iterator<Item = *mut ibv::ibv_device> + '_ {
        (0..self.len).map(|i| self.get(i))
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: from ibv_get_device_list; opened contexts stay valid after the list is freed.
        unsafe { ibv::ibv_free_device_list(self.list) };
    }
}

/// Where the kernel lists its RDMA devices (`infiniband`) and their verbs interfaces (`infiniband_verbs`).
const SYSFS_CLASS: &str = "/sys/class";

/// Why libibverbs lists no device, from what the kernel shows under `class_dir` (`/sys/class`) and the error
/// `ibv_get_device_list` left, if it failed. libibverbs says ENOSYS ("Function not implemented") whenever the
/// kernel has no verbs interface, which tells a user nothing; the sysfs directories tell what to do.
fn why_no_devices(class_dir: &Path, error: Option<std::io::Error>) -> String {
    if let Some(e) = &error {
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return "libibverbs.so.1 is not installed (Debian/Ubuntu: libibverbs1 and ibverbs-providers; RHEL: rdma-core)".into();
        }
    }
    let entries = |name: &str| -> Option<Vec<String>> {
        let mut names: Vec<String> =
            std::fs::read_dir(class_dir.join(name)).ok()?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        Some(names)
    };
    let rdma_dir = class_dir.join("infiniband");
    let fix = "load the NIC's RDMA driver (e.g. mlx5_ib), or rdma_rxe for Soft-RoCE (`rdma link add rxe0 type rxe netdev eth0`)";
    match entries("infiniband") {
        None => format!("this kernel has no RDMA devices ({} does not exist): {fix}", rdma_dir.display()),
        Some(devices) if devices.is_empty() => format!("this kernel has no RDMA devices ({} is empty): {fix}", rdma_dir.display()),
        Some(devices) => match entries("infiniband_verbs") {
            None => format!(
                "the kernel has RDMA devices ({}) but no verbs interface ({} does not exist): load the ib_uverbs module",
                devices.join(", "),
                class_dir.join("infiniband_verbs").display()
            ),
            Some(_) => match error {
                None => format!(
                    "the kernel has RDMA devices ({}) but libibverbs has no provider for them: install ibverbs-providers \
                     (Debian/Ubuntu) or rdma-core (RHEL); in a container, also pass /dev/infiniband through",
                    devices.join(", ")
                ),
                Some(e) => format!("the kernel has RDMA devices ({}) but listing them failed: {e}", devices.join(", ")),
            },
        },
    }
}

fn device_name(dev: *mut ibv::ibv_device) -> String {
    // SAFETY: a device from a live list has a NUL-terminated name.
    let name = unsafe { ibv::ibv_get_device_name(dev) };
    if name.is_null() {
        return "?".into();
    }
    unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

/// Maps a verbs return code (0, or an errno, or -1 with errno set) to an error.
pub(super) fn check(rc: i32, what: &str) -> Result<()> {
    match rc {
        0 => Ok(()),
        -1 => Err(os_error(what)),
        errno => Err(Error::new(ErrorCode::Transport, format!("{what}: {}", std::io::Error::from_raw_os_error(errno.abs())))),
    }
}

pub(super) fn os_error(what: &str) -> Error {
    let e = std::io::Error::last_os_error();
    let code = match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV) => ErrorCode::Unavailable,
        _ => ErrorCode::Transport,
    };
    Error::new(code, format!("{what}: {e}"))
}

fn port_state_name(s: ibv::ibv_port_state::Type) -> &'static str {
    use ibv::ibv_port_state::*;
    match s {
        IBV_PORT_DOWN => "DOWN",
        IBV_PORT_INIT => "INIT",
        IBV_PORT_ARMED => "ARMED",
        IBV_PORT_ACTIVE => "ACTIVE",
        IBV_PORT_ACTIVE_DEFER => "ACTIVE_DEFER",
        _ => "NOP",
    }
}

fn link_layer_name(l: u8) -> &'static str {
    match l {
        LINK_LAYER_ETHERNET => "Ethernet",
        LINK_LAYER_INFINIBAND | LINK_LAYER_UNSPECIFIED => "InfiniBand",
        _ => "unknown",
    }
}

pub(super) fn mtu_bytes(m: ibv::ibv_mtu::Type) -> u32 {
    if (1..=5).contains(&m) {
        128 << m
    } else {
        0
    }
}

/// A GID in the usual colon form: `0000:0000:0000:0000:0000:ffff:0a63:0001`.
pub fn format_gid(gid: &[u8; 16]) -> String {
    gid.chunks(2).map(|c| format!("{:02x}{:02x}", c[0], c[1])).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_and_mtu_formatting() {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 99, 0, 1]);
        assert_eq!(format_gid(&gid), "0000:0000:0000:0000:0000:ffff:0a63:0001");
        assert_eq!(mtu_bytes(ibv::ibv_mtu::IBV_MTU_4096), 4096);
        assert_eq!(mtu_bytes(ibv::ibv_mtu::IBV_MTU_256), 256);
    }

    #[test]
    fn no_devices_is_explained_by_what_the_kernel_shows() {
        let root = std::env::temp_dir().join(format!("kvtransfer-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let enosys = || Some(std::io::Error::from_raw_os_error(libc::ENOSYS));

        let why = why_no_devices(&root, enosys());
        assert!(why.starts_with("this kernel has no RDMA devices"), "{why}");
        assert!(why.contains("infiniband does not exist"), "{why}");
        assert!(!why.contains("Function not implemented"), "{why}");

        std::fs::create_dir_all(root.join("infiniband")).unwrap();
        let why = why_no_devices(&root, enosys());
        assert!(why.contains("infiniband is empty"), "{why}");

        std::fs::create_dir_all(root.join("infiniband/mlx5_0")).unwrap();
        let why = why_no_devices(&root, enosys());
        assert!(why.contains("(mlx5_0) but no verbs interface") && why.contains("ib_uverbs"), "{why}");

        std::fs::create_dir_all(root.join("infiniband_verbs/uverbs0")).unwrap();
        let why = why_no_devices(&root, None);
        assert!(why.contains("no provider") && why.contains("ibverbs-providers"), "{why}");

        let why = why_no_devices(&root, Some(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
        assert!(why.contains("libibverbs.so.1 is not installed"), "{why}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_machine_without_devices_says_so() {
        // This must not crash whether or not the machine has RDMA; where it has none, it is a clear error.
        match Device::open(Some("no-such-device"), 0) {
            Ok(_) => panic!("a device called no-such-device opened"),
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
                assert!(e.message().contains("RDMA"), "{e}");
            }
        }
    }
}
