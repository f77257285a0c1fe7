//! The CUDA IPC transport between two processes (this binary is the prefill, on GPU 0, and starts itself again
//! as the decode, on GPU `KVTRANSFER_BENCH_DECODE_GPU`, default 0): 1538 scattered blocks per call, keys and
//! values, 1 KiB to 256 KiB, one thread. Against the ceiling (one copy of the same total bytes, contiguous,
//! between the same two GPUs) and against what a naive port does (one `cuMemcpyDtoDAsync` per block). Prints
//! a table; prints SKIPPED without a GPU.
//!
//!     cargo bench -p kvtransfer --bench gpu_copy        (or: bash .ci/gpu-tests.sh on a GPU machine)

use cudarc::driver::sys as cu;
use kvtransfer::cuda::{self, CopyStream, Gpu};
use kvtransfer::memory::CacheSpec;
use kvtransfer::{Communicator, CommunicatorSpec, Config, Role, TransportChoice};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/ids.rs"]
mod ids;
use ids::scattered;

const BATCH: u32 = 1538;
const SIZES: [u64; 5] = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10];
const CHILD: &str = "KVTRANSFER_BENCH_DECODE_BLOCK_BYTES";
const DECODE_GPU: &str = "KVTRANSFER_BENCH_DECODE_GPU";

fn ok(rc: cu::CUresult) {
    assert_eq!(rc, cu::CUresult::CUDA_SUCCESS);
}

/// `bytes` of device memory on GPU `gpu`.
fn device_alloc(gpu: u32, bytes: u64) -> u64 {
    Gpu::get(gpu).unwrap().bind().unwrap();
    let mut ptr = 0;
    // SAFETY: allocates and zeroes `bytes` of device memory; the pointer is written by the driver.
    unsafe {
        ok(cu::cuMemAlloc_v2(&mut ptr, bytes as usize));
        ok(cu::cuMemsetD8_v2(ptr, 7, bytes as usize));
    }
    ptr
}

/// Keys and values of one layer, each `BATCH` blocks of `block_bytes`, on GPU `gpu`.
fn cache(gpu: u32, block_bytes: u64) -> CacheSpec {
    let bytes = BATCH as u64 * block_bytes;
    CacheSpec {
        key: vec![device_alloc(gpu, bytes)],
        value: vec![device_alloc(gpu, bytes)],
        block_number: BATCH,
        block_bytes,
        ..CacheSpec::default()
    }
}

/// Lets GPU 0 reach GPU `peer`'s memory directly, as the baselines' copies need to run as peer copies.
fn enable_peer_access(peer: u32) {
    if peer == 0 {
        return;
    }
    let mut ctx = std::ptr::null_mut();
    // SAFETY: plain driver calls on an initialised driver; GPU `peer` exists (its context was opened).
    unsafe {
        let mut dev = 0;
        ok(cu::cuDeviceGet(&mut dev, peer as i32));
        ok(cu::cuDevicePrimaryCtxRetain(&mut ctx, dev));
        Gpu::get(0).unwrap().bind().unwrap();
        let rc = cu::cuCtxEnablePeerAccess(ctx, 0);
        assert!(matches!(rc, cu::CUresult::CUDA_SUCCESS | cu::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED), "{rc:?}");
    }
}

fn decode_gpu() -> u32 {
    std::env::var(DECODE_GPU).map(|v| v.parse().expect("a GPU ordinal")).unwrap_or(0)
}


/// Mean seconds per call of `f`, after a warm-up, over at least 0.5 s and 20 calls.
fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..10 {
        f();
    }
    let (start, mut calls) = (Instant::now(), 0u32);
    while calls < 20 || start.elapsed() < Duration::from_millis(500) {
        f();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / calls as f64
}

fn decode_child(block_bytes: u64) {
    let gpu = decode_gpu();
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: gpu, port: 0, cache: cache(gpu, block_bytes), tp_size: 1, tp_idx: 0 };
    let config = Config { transport: TransportChoice::CudaIpc, ..Config::default() };
    let decode = Communicator::new(spec, config).unwrap();
    println!("PORT {}", decode.port());
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().lock().lines().next();
}

fn main() {
    if let Ok(bytes) = std::env::var(CHILD) {
        return decode_child(bytes.parse().unwrap());
    }
    if cuda::driver_version().is_none() || Gpu::get(0).is_err() {
        println!("SKIPPED: no CUDA GPU here");
        return;
    }
    let peer = decode_gpu();
    if Gpu::get(peer).is_err() {
        panic!("{DECODE_GPU}={peer}, but there is no GPU {peer}");
    }
    enable_peer_access(peer);
    let local = scattered(BATCH, 1);
    let remote = scattered(BATCH, 2);
    let gpus = match peer {
        0 => "two processes on GPU 0".to_string(),
        p => format!("prefill process on GPU 0, decode process on GPU {p}"),
    };
    println!("CUDA IPC, {gpus}, {BATCH} scattered blocks per call, keys and values (GB/s = 1e9 B/s)");
    println!("| block | kvtransfer cuda-ipc | one large copy (ceiling) | copy per block | ours / ceiling | µs per call |");
    println!("|---|---|---|---|---|---|");
    for size in SIZES {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, size.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port: u16 = line.trim().strip_prefix("PORT ").expect("the decode process listens").parse().unwrap();

        let src = cache(0, size);
        let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: src.clone(), tp_size: 1, tp_idx: 0 };
        let prefill = Communicator::new(spec, Config { transport: TransportChoice::CudaIpc, ..Config::default() }).unwrap();
        prefill.connect("127.0.0.1", port, 1).unwrap();
        let total = 2 * BATCH as u64 * size;
        let ours = time(|| prefill.write_cache("127.0.0.1", port, &local, &remote, 0).unwrap());

        let stream = CopyStream::new(Gpu::get(0).unwrap()).unwrap();
        let (one_src, one_dst) = (device_alloc(0, total), device_alloc(peer, total));
        Gpu::get(0).unwrap().bind().unwrap();
        // SAFETY (both baselines): every range lies inside allocations made above for these sizes.
        let ceiling = time(|| unsafe {
            ok(cu::cuMemcpyDtoDAsync_v2(one_dst, one_src, total as usize, stream.raw()));
            stream.synchronize().unwrap();
        });
        let dst = cache(peer, size);
        Gpu::get(0).unwrap().bind().unwrap();
        let per_block = time(|| unsafe {
            for (s, d) in [(src.key[0], dst.key[0]), (src.value[0], dst.value[0])] {
                for (l, r) in local.iter().zip(&remote) {
                    ok(cu::cuMemcpyDtoDAsync_v2(d + *r as u64 * size, s + *l as u64 * size, size as usize, stream.raw()));
                }
            }
            stream.synchronize().unwrap();
        });
        let gbs = |t: f64| total as f64 / t / 1e9;
        println!(
            "| {} KiB | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} |",
            size >> 10,
            gbs(ours),
            gbs(ceiling),
            gbs(per_block),
            ceiling / ours,
            ours * 1e6
        );
        drop(prefill);
        drop(child.stdin.take());
        let _ = child.wait();
    }
}
