//! The CUDA IPC transport between two processes (this binary is the prefill, on GPU 0, and starts itself again
//! as the decode, on GPU `KVTRANSFER_BENCH_DECODE_GPU`, default 0): 1538 scattered blocks per call, keys and
//! values, 1 KiB to 256 KiB, one thread. Against the ceiling (one copy of the same total bytes, contiguous,
//! between the same two GPUs) and against what a naive port does (one `cuMemcpyDtoDAsync` per block). Prints
//! a table; prints SKIPPED without a GPU.
//!
//!     cargo bench -p kvtransfer --bench gpu_copy        (or: bash .ci/gpu-tests.sh on a GPU machine)

use cudarc::driver::sys as cu;
use kvtransfer::cuda::ipc::{IpcHandle, IpcMapping};
use kvtransfer::cuda::{self, BlockCopy, CopyStream, Gpu, PinnedBuffer, TensorCopy};
use kvtransfer::plan::{BlockPlan, PlanForm};
use kvtransfer::memory::{CacheLayout, CacheSpec};

/// The layout of a bench cache.
fn layout(spec: CacheSpec) -> CacheLayout {
    // SAFETY: the bench's device allocations are never freed while a communicator uses them.
    unsafe { CacheLayout::new(spec) }.unwrap()
}
use kvtransfer::{Communicator, CommunicatorSpec, Config, Role, TransportChoice, TransportKind};
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
    let cache = cache(gpu, block_bytes);
    let handles = [cache.key[0], cache.value[0]].map(|addr| cuda::ipc::export(addr).unwrap().handle.to_hex());
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: gpu, port: 0, cache: layout(cache), tp_size: 1, tp_idx: 0 };
    let config = Config { transport: TransportChoice::Only(TransportKind::CudaIpc), ..Config::default() };
    let decode = Communicator::new(spec, config).unwrap();
    println!("PORT {} {} {}", decode.port(), handles[0], handles[1]);
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
    let mut breakdown = Vec::new();
    let mut costs = Vec::new();
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
        let words: Vec<&str> = line.trim().strip_prefix("PORT ").expect("the decode process listens").split(' ').collect();
        let port: u16 = words[0].parse().unwrap();
        let mapped: Vec<IpcMapping> =
            words[1..].iter().map(|h| IpcMapping::open(&Gpu::get(0).unwrap(), IpcHandle::from_hex(h).unwrap()).unwrap()).collect();

        let src = cache(0, size);
        let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: layout(src.clone()), tp_size: 1, tp_idx: 0 };
        let prefill = Communicator::new(spec, Config { transport: TransportChoice::Only(TransportKind::CudaIpc), ..Config::default() }).unwrap();
        prefill.connect("127.0.0.1", port, 1).unwrap();
        let total = 2 * BATCH as u64 * size;
        let ours = time(|| prefill.write_cache("127.0.0.1", port, &local, &remote, 0).unwrap());
        // The same call as a layer of a request (a new request every 32 calls, as an engine writes a request
        // layer by layer: its Start once, a Done per call), alternated with the plain call so that both see the
        // same machine.
        let mut n = 0u64;
        let mut id = kvtransfer::communicator::RequestId::new("bench-0").unwrap();
        let mut with_request = || {
            n += 1;
            if n % 32 == 0 {
                id = kvtransfer::communicator::RequestId::new(format!("bench-{n}")).unwrap();
            }
            prefill.write_request("127.0.0.1", port, &local, &remote, 0, Some(&id)).unwrap()
        };
        let (mut plain_t, mut request_t) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            plain_t.push(time(|| prefill.write_cache("127.0.0.1", port, &local, &remote, 0).unwrap()));
            request_t.push(time(&mut with_request));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        costs.push(format!(
            "| {} KiB | {:.1} | {:.1} | {:+.1} |",
            size >> 10,
            median(&mut plain_t) * 1e6,
            median(&mut request_t) * 1e6,
            (median(&mut request_t) - median(&mut plain_t)) * 1e6
        ));

        let stream = CopyStream::new(Gpu::get(0).unwrap()).unwrap();
        let (one_src, one_dst) = (device_alloc(0, total), device_alloc(peer, total));
        Gpu::get(0).unwrap().bind().unwrap();
        // SAFETY (both baselines): every range lies inside allocations made above for these sizes.
        let ceiling = time(|| unsafe {
            ok(cu::cuMemcpyDtoDAsync_v2(one_dst, one_src, total as usize, stream.raw()));
            stream.synchronize().unwrap();
        });
        // The decode's cache, mapped here as the transport maps it.
        let dst = CacheSpec { key: vec![mapped[0].addr()], value: vec![mapped[1].addr()], ..src.clone() };
        Gpu::get(0).unwrap().bind().unwrap();
        let per_block = time(|| unsafe {
            for (s, d) in [(src.key[0], dst.key[0]), (src.value[0], dst.value[0])] {
                for (l, r) in local.iter().zip(&remote) {
                    ok(cu::cuMemcpyDtoDAsync_v2(d + *r as u64 * size, s + *l as u64 * size, size as usize, stream.raw()));
                }
            }
            stream.synchronize().unwrap();
        });
        let mut plan = BlockPlan::new(PlanForm::Ids);
        let planning = time(|| plan.build(&local, &remote, 0, 1, BATCH, BATCH).unwrap());
        let split = where_the_time_goes(&src, &dst, &local, &remote, size, &stream);
        let row: Vec<String> = [ours, planning].iter().chain(&split).chain([&ceiling]).map(|t| format!("{:.1}", t * 1e6)).collect();
        breakdown.push(format!("| {} KiB | {} |", size >> 10, row.join(" | ")));
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
        for (gpu, ptr) in [(0, one_src), (peer, one_dst)] {
            Gpu::get(gpu).unwrap().bind().unwrap();
            // SAFETY: the stream is idle (every timing loop synchronised); nothing uses the buffer again.
            ok(unsafe { cu::cuMemFree_v2(ptr) });
        }
        drop(prefill);
        drop(mapped);
        drop(child.stdin.take());
        let _ = child.wait();
    }
    println!();
    println!("A request id's cost (µs per call, median of three alternated runs): writeCache, the same call as a layer of a");
    println!("32-layer request (its Done on the request channel, and the decode's notification), and the difference.");
    println!("| block | without | with a request id | difference |");
    println!("|---|---|---|---|");
    for row in &costs {
        println!("{row}");
    }
    println!();
    println!("Where one call's time goes (µs): the whole writeCache; checking the call's ids alone; the same kernel");
    println!("launched into the decode's cache and waited for directly (no checks or locking); the kernel alone between two");
    println!("events, with the ids in mapped host memory (as writeCache launches it) or in device memory; the ceiling's call.");
    println!("| block | writeCache | plan | launch + sync | kernel, ids in host memory | kernel, ids in device memory | ceiling |");
    println!("|---|---|---|---|---|---|---|");
    for row in breakdown {
        println!("{row}");
    }
}

/// Seconds per call of the copy kernel moving `local` → `remote` of both tensors from `src` into `decode` (the
/// decode's cache, mapped), launched directly: [launch + sync with the ids in mapped host memory, as
/// writeCache does; kernel time by events, ids in mapped host memory; the same with the ids in device memory].
fn where_the_time_goes(src: &CacheSpec, decode: &CacheSpec, local: &[u32], remote: &[u32], size: u64, stream: &CopyStream) -> [f64; 3] {
    let gpu = Gpu::get(0).unwrap();
    let n = local.len();
    let mut host_ids = PinnedBuffer::new(&gpu, 8 * n).unwrap();
    let ids = host_ids.as_mut_u32();
    ids[..n].copy_from_slice(local);
    ids[n..2 * n].copy_from_slice(remote);
    let device_ids = device_alloc(0, 8 * n as u64);
    gpu.bind().unwrap();
    // SAFETY: copies the 8n bytes of id lists into the device buffer of that size.
    ok(unsafe { cu::cuMemcpyHtoD_v2(device_ids, host_ids.addr() as *const _, 8 * n) });
    let tensor = |s: u64, d: u64| TensorCopy { src: s, src_stride: size, src_offset: 0, dst: d, dst_stride: size, dst_offset: 0, bytes: size };
    let copy = |ids: u64| BlockCopy {
        tensor: [tensor(src.key[0], decode.key[0]), tensor(src.value[0], decode.value[0]), TensorCopy::default(), TensorCopy::default()],
        src_ids: ids,
        dst_ids: ids + 4 * n as u64,
        blocks: n as u32,
        begin: 0,
        end: 2 * n as u32,
        warp_shift: 0, // `launch` sets it
    };
    let (host, device) = (copy(host_ids.addr()), copy(device_ids));
    // SAFETY (all launches): the ids are in range for both caches, which are allocated for BATCH blocks of `size`.
    let launch_and_sync = time(|| unsafe {
        stream.launch(&host).unwrap();
        stream.synchronize().unwrap();
    });
    let kernel = |c: &BlockCopy| events(stream.raw(), &mut || unsafe { stream.launch(c).unwrap() });
    [launch_and_sync, kernel(&host), kernel(&device)]
}

/// Mean seconds of `launch` on `stream`, timed by events around each call, after a warm-up.
fn events(stream: cu::CUstream, launch: &mut dyn FnMut()) -> f64 {
    let (mut start, mut end) = (std::ptr::null_mut(), std::ptr::null_mut());
    let mut total = 0f32;
    // SAFETY: two timing events on the current context, recorded around each launch, destroyed after.
    unsafe {
        ok(cu::cuEventCreate(&mut start, 0));
        ok(cu::cuEventCreate(&mut end, 0));
        for i in 0..60 {
            ok(cu::cuEventRecord(start, stream));
            launch();
            ok(cu::cuEventRecord(end, stream));
            ok(cu::cuEventSynchronize(end));
            let mut ms = 0f32;
            ok(cu::cuEventElapsedTime(&mut ms, start, end));
            if i >= 10 {
                total += ms;
            }
        }
        cu::cuEventDestroy_v2(start);
        cu::cuEventDestroy_v2(end);
    }
    total as f64 / 50.0 / 1e3
}
