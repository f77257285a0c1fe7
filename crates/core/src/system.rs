//! What this machine offers kvtransfer: the settings in force (bad values flagged), each transport with
//! whether it is usable here and why not, the RDMA devices and the GPUs. `kvtransfer info` prints it.
//!
//! ```
//! let report = kvtransfer::system::SystemReport::gather();
//! let tcp = report.transports.iter().find(|t| t.name == "tcp").unwrap();
//! assert!(tcp.usable);
//! ```

use crate::config::{Config, Setting};
use crate::cuda;
use crate::transport::rdma::{self, DeviceInfo};
use crate::transport;
use serde::Serialize;

/// Everything `kvtransfer info` reports (serialised with camelCase names for the bindings).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemReport {
    /// The library's version.
    pub version: &'static str,
    /// Every setting, with its environment variable's value and whether that value is valid.
    pub settings: Vec<SettingReport>,
    /// Every transport, with whether it can be used here.
    pub transports: Vec<TransportReport>,
    /// The RDMA devices.
    pub rdma: RdmaReport,
    /// The CUDA driver and its GPUs.
    pub gpus: GpuReport,
}

/// The RDMA devices of this machine, or why they cannot be listed.
#[derive(Debug, Clone, Serialize)]
pub struct RdmaReport {
    pub devices: Vec<DeviceInfo>,
    /// Set when the list could not be read (no libibverbs).
    pub error: Option<String>,
}

/// One setting as the environment gives it.
#[derive(Debug, Clone, Serialize)]
pub struct SettingReport {
    /// The environment variable (`KVCACHE_*`).
    pub env: &'static str,
    /// Its value, when set.
    pub value: Option<String>,
    /// The error a communicator would raise for that value, if any.
    pub error: Option<String>,
}

/// Whether one transport can be used on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct TransportReport {
    /// `cuda-ipc`, `shm`, `rdma` or `tcp`.
    pub name: &'static str,
    pub usable: bool,
    /// What it would use (a NIC, an interface), or why it cannot be used.
    pub detail: String,
}

/// The CUDA driver and the GPUs it sees, or why there are none.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    /// The CUDA version the driver supports, as `12.8`.
    pub driver: Option<String>,
    pub devices: Vec<cuda::GpuInfo>,
    /// Set when there is no usable driver or the devices could not be listed.
    pub error: Option<String>,
}

impl SystemReport {
    /// Looks at the process environment, the verbs library and the CUDA driver. Opens devices only to query
    /// them.
    pub fn gather() -> SystemReport {
        SystemReport::gather_from(|name| std::env::var(name).ok())
    }

    /// Like [`SystemReport::gather`], with the environment given as a lookup function.
    pub fn gather_from(env: impl Fn(&str) -> Option<String>) -> SystemReport {
        let settings: Vec<SettingReport> = Setting::ALL
            .into_iter()
            .filter_map(|s| s.env_name())
            .map(|name| {
                let value = env(name);
                let error = value.as_ref().and_then(|v| {
                    Config::load_from(|n| (n == name).then(|| v.clone()), &[]).err().map(|e| e.message().to_string())
                });
                // A secret is reported as set, never shown.
                let secret = Setting::ALL.iter().any(|s| s.is_secret() && s.env_name() == Some(name));
                let value = value.map(|v| if secret { "<set>".to_string() } else { v });
                SettingReport { env: name, value, error }
            })
            .collect();
        // The settings that are valid, for judging the transports as a communicator would.
        let config = Config::load_from(|name| env(name).filter(|_| settings.iter().any(|s| s.env == name && s.error.is_none())), &[])
            .unwrap_or_default();
        let gpus = gpu_report();
        let transports = transport::REGISTRY
            .iter()
            .map(|t| {
                let (usable, detail) = match t.probe(&config) {
                    Ok(what) => (true, what),
                    Err(why) => (false, why),
                };
                TransportReport { name: t.kind().as_str(), usable, detail }
            })
            .collect();
        let rdma = match rdma::devices() {
            Ok(devices) => RdmaReport { devices, error: None },
            Err(e) => RdmaReport { devices: Vec::new(), error: Some(e.message().to_string()) },
        };
        SystemReport { version: crate::VERSION, settings, transports, rdma, gpus }
    }
}

impl SystemReport {
    /// The report as JSON (camelCase names), for the bindings.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the report is plain data")
    }
}

fn gpu_report() -> GpuReport {
    let Some(version) = cuda::driver_version() else {
        let why = "no CUDA driver (libcuda.so.1 is not installed, or finds no GPU)";
        return GpuReport { driver: None, devices: Vec::new(), error: Some(why.into()) };
    };
    let driver = Some(format!("{}.{}", version / 1000, version % 1000 / 10));
    match cuda::devices() {
        Ok(devices) => GpuReport { driver, devices, error: None },
        Err(e) => GpuReport { driver, devices: Vec::new(), error: Some(e.message().to_string()) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_flagged_with_the_error_a_communicator_would_raise() {
        let r = SystemReport::gather_from(|name| match name {
            "KVCACHE_IB_TIMEOUT" => Some("99".into()),
            "KVCACHE_DEBUG" => Some("yes".into()),
            _ => None,
        });
        let get = |env: &str| r.settings.iter().find(|s| s.env == env).unwrap();
        let bad = get("KVCACHE_IB_TIMEOUT");
        assert_eq!(bad.value.as_deref(), Some("99"));
        assert!(bad.error.as_deref().unwrap().contains("KVCACHE_IB_TIMEOUT=\"99\""), "{bad:?}");
        assert!(get("KVCACHE_DEBUG").error.is_none());
        assert!(get("KVCACHE_RDMA_NICS").value.is_none() && get("KVCACHE_RDMA_NICS").error.is_none());

        let r = SystemReport::gather_from(|name| (name == "KVCACHE_AUTH_TOKEN").then(|| "a secret nobody may see".into()));
        let token = r.settings.iter().find(|s| s.env == "KVCACHE_AUTH_TOKEN").unwrap();
        assert_eq!(token.value.as_deref(), Some("<set>"));
        assert!(!r.to_json().contains("nobody may see"));

        let r = SystemReport::gather_from(|name| (name == "KVCACHE_SOCKET_IFNAME").then(|| "nosuchif9".into()));
        let tcp = r.transports.iter().find(|t| t.name == "tcp").unwrap();
        assert!(!tcp.usable && tcp.detail.contains("nosuchif9"), "{tcp:?}");
    }

    #[test]
    fn every_variable_is_reported_and_tcp_is_always_there() {
        let r = SystemReport::gather_from(|_| None);
        assert_eq!(r.settings.len(), 20);
        assert!(r.settings.iter().any(|s| s.env == "KVCACHE_IB_TIMEOUT"));
        let names: Vec<&str> = r.transports.iter().map(|t| t.name).collect();
        assert_eq!(names, ["cuda-ipc", "shm", "rdma", "tcp"], "every registered transport, fastest first");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"transports\""));
    }
}
