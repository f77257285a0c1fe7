//! Caches in GPU memory, between two processes: this test binary is the prefill, and it starts itself again
//! as the decode (`decode_child`). Every byte of the decode cache is checked: blocks written hold the
//! prefill's bytes, all others their own. Runs where a CUDA GPU is present (`bash .ci/gpu-tests.sh` on a
//! device machine); elsewhere each test prints SKIPPED.
//!
//! The prefill cache lives on GPU 0 and the decode cache on GPU `KVTRANSFER_TEST_DECODE_GPU` (default 0), so
//! the same tests cover one GPU and two GPUs of one host (peer copies over NVLink or PCIe).

use cudarc::driver::sys as cu;
use kvtransfer::cuda::{self, Gpu};
use kvtransfer::memory::{CacheLayout, CacheSpec};
use kvtransfer::{Communicator, CommunicatorSpec, Config, ErrorCode, Role, TransportChoice, TransportKind};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

#[path = "common/ids.rs"]
mod ids;

/// `count` distinct pseudo-random ids in `0..n`.
fn scattered(count: usize, n: u32, seed: u64) -> Vec<u32> {
    let mut ids = ids::scattered(n, seed);
    ids.truncate(count);
    ids
}

const CHILD: &str = "KVTRANSFER_TEST_DECODE_CHILD";
const DECODE_GPU: &str = "KVTRANSFER_TEST_DECODE_GPU";

/// The GPU the decode cache lives on.
fn decode_gpu() -> u32 {
    std::env::var(DECODE_GPU).map(|v| v.parse().expect("KVTRANSFER_TEST_DECODE_GPU is a GPU ordinal")).unwrap_or(0)
}

fn gpu() -> bool {
    if cuda::driver_version().is_some() && Gpu::get(0).is_ok() {
        let decode = decode_gpu();
        assert!(Gpu::get(decode).is_ok(), "{DECODE_GPU}={decode}, but there is no GPU {decode}");
        return true;
    }
    // The GPU suite sets this, so that a GPU the driver cannot reach fails instead of skipping.
    assert!(std::env::var_os("KVTRANSFER_REQUIRE_GPU").is_none(), "KVTRANSFER_REQUIRE_GPU is set, but GPU 0 cannot be used");
    eprintln!("SKIPPED: no CUDA GPU here (run `bash .ci/gpu-tests.sh` on a GPU machine)");
    false
}

/// The byte at `index` of `tensor`/`layer` of a cache filled with `seed`.
fn pattern(seed: u32, tensor: usize, layer: usize, index: usize) -> u8 {
    (index as u32).wrapping_mul(31).wrapping_add((tensor * 7 + layer * 13) as u32 + seed * 101) as u8
}

/// A cache of `tensors` × `layers` in one allocation per tensor (as engines lay it out), on a GPU or in host
/// memory, filled with `pattern(seed)`.
struct TestCache {
    /// The GPU holding it, or `None` for host memory.
    gpu: Option<u32>,
    tensors: usize,
    layers: usize,
    blocks: u32,
    block_bytes: u64,
    bases: Vec<u64>,
    _host: Vec<kvtransfer::memory::HostAllocation>,
}

impl TestCache {
    fn new(gpu: Option<u32>, tensors: usize, layers: usize, blocks: u32, block_bytes: u64, seed: u32) -> TestCache {
        let layer_bytes = blocks as u64 * block_bytes;
        let total = layer_bytes * layers as u64;
        let mut bases = Vec::new();
        let mut host = Vec::new();
        for t in 0..tensors {
            let image: Vec<u8> = (0..layers)
                .flat_map(|l| (0..layer_bytes as usize).map(move |i| pattern(seed, t, l, i)))
                .collect();
            if let Some(ordinal) = gpu {
                Gpu::get(ordinal).unwrap().bind().unwrap();
                let mut ptr = 0u64;
                // SAFETY: allocates `total` bytes of device memory and fills it from `image`, which is as long.
                unsafe {
                    assert_eq!(cu::cuMemAlloc_v2(&mut ptr, total as usize), cu::CUresult::CUDA_SUCCESS);
                    assert_eq!(cu::cuMemcpyHtoD_v2(ptr, image.as_ptr() as *const _, image.len()), cu::CUresult::CUDA_SUCCESS);
                }
                bases.push(ptr);
            } else {
                let mut a = kvtransfer::memory::HostAllocation::new(total as usize).unwrap();
                a.as_mut_slice().copy_from_slice(&image);
                bases.push(a.addr());
                host.push(a);
            }
        }
        TestCache { gpu, tensors, layers, blocks, block_bytes, bases, _host: host }
    }

    fn layout(&self) -> CacheLayout {
        // SAFETY: the test keeps the cache (device and host memory) alive past its communicators.
        unsafe { CacheLayout::new(self.spec()) }.unwrap()
    }

    fn spec(&self) -> CacheSpec {
        let ptrs = |t: usize| match t < self.tensors {
            true => (0..self.layers).map(|l| self.bases[t] + l as u64 * self.blocks as u64 * self.block_bytes).collect(),
            false => Vec::new(),
        };
        CacheSpec { key: ptrs(0), value: ptrs(1), block_number: self.blocks, block_bytes: self.block_bytes, ..CacheSpec::default() }
    }

    /// The whole of tensor `t` (all layers), read back.
    fn read(&self, t: usize) -> Vec<u8> {
        let total = self.blocks as usize * self.block_bytes as usize * self.layers;
        let mut out = vec![0u8; total];
        if let Some(ordinal) = self.gpu {
            Gpu::get(ordinal).unwrap().bind().unwrap();
            // SAFETY: copies `total` bytes, the allocation's size, into `out`, which is as long.
            let rc = unsafe { cu::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut _, self.bases[t], total) };
            assert_eq!(rc, cu::CUresult::CUDA_SUCCESS);
        } else {
            // SAFETY: the host allocation is `total` bytes long and alive.
            out.copy_from_slice(unsafe { std::slice::from_raw_parts(self.bases[t] as *const u8, total) });
        }
        out
    }

    /// Block `block` of tensor `t`, layer `layer`, read back.
    fn read_block(&self, t: usize, layer: usize, block: u32) -> Vec<u8> {
        let bb = self.block_bytes as usize;
        let at = (layer * self.blocks as usize + block as usize) * bb;
        assert!(block < self.blocks && layer < self.layers);
        let mut out = vec![0u8; bb];
        if let Some(ordinal) = self.gpu {
            Gpu::get(ordinal).unwrap().bind().unwrap();
            // SAFETY: copies one block, inside the allocation (checked above), into `out`, which is as long.
            let rc = unsafe { cu::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut _, self.bases[t] + at as u64, bb) };
            assert_eq!(rc, cu::CUresult::CUDA_SUCCESS);
        } else {
            // SAFETY: one block inside the host allocation (checked above), which is alive.
            out.copy_from_slice(unsafe { std::slice::from_raw_parts((self.bases[t] as usize + at) as *const u8, bb) });
        }
        out
    }
}

/// Bytes `[offset, offset + len)` of decode block `block` (tensor, layer) should hold the first `len` bytes of
/// block `src_block` of a source cache filled with `src_seed` whose blocks are `src_block_bytes` long.
#[derive(Debug, Clone, Copy)]
struct Expect {
    tensor: usize,
    layer: usize,
    block: u32,
    offset: u64,
    len: u64,
    src_seed: u32,
    src_block: u32,
    src_block_bytes: u64,
}

fn config(transport: TransportChoice) -> Config {
    Config { transport, timeouts: kvtransfer::Timeouts::all(Duration::from_secs(20)), ..Config::default() }
}

/// The decode side, in its own process: builds its cache, listens, and checks what it was told to expect.
#[test]
fn decode_child() {
    let Ok(args) = std::env::var(CHILD) else { return };
    let a: Vec<&str> = args.split(',').collect();
    let transport = match a[0] {
        "tcp" => TransportChoice::Only(TransportKind::Tcp),
        "cuda-ipc" => TransportChoice::Only(TransportKind::CudaIpc),
        _ => TransportChoice::Auto,
    };
    let (on_gpu, tensors, layers, blocks, block_bytes, seed) =
        (a[1] == "gpu", a[2].parse().unwrap(), a[3].parse().unwrap(), a[4].parse().unwrap(), a[5].parse().unwrap(), a[6].parse().unwrap());
    let gpu = on_gpu.then(decode_gpu);
    let cache = TestCache::new(gpu, tensors, layers, blocks, block_bytes, seed);
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: gpu.unwrap_or(0), port: 0, cache: cache.layout(), tp_size: 1, tp_idx: 0 };
    let decode = std::sync::Arc::new(Communicator::new(spec, config(transport)).unwrap());
    // Every notification is checked the moment it arrives (see `notification_holds_its_bytes`).
    let notes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let cache = std::sync::Arc::new(cache);
    take_notifications(decode.clone(), cache.clone(), notes.clone());
    println!("PORT {}", decode.port());
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if let Some(args) = line.strip_prefix("WAIT ") {
            // WAIT <request> <layer> [<ms>, default 20 s]
            let a: Vec<&str> = args.split(' ').collect();
            let request = kvtransfer::communicator::RequestId::new(a[0]).unwrap();
            let ms = a.get(2).map_or(20_000, |ms| ms.parse().unwrap());
            let outcome = decode.wait_for(&request, Some(vec![a[1].parse().unwrap()]), Duration::from_millis(ms));
            println!("WAITED {}", outcome.map_or_else(|e| e.code().as_str().to_string(), |()| "OK".into()));
            std::io::stdout().flush().unwrap();
            continue;
        }
        if let Some(count) = line.strip_prefix("NOTES ") {
            // Notifications queued while none was being taken are handed over at the next take: wait for them.
            let (want, deadline) = (count.parse::<usize>().unwrap(), std::time::Instant::now() + Duration::from_secs(10));
            while notes.lock().unwrap().len() < want && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            println!("NOTES {}", notes.lock().unwrap().join(";"));
            std::io::stdout().flush().unwrap();
            continue;
        }
        if let Some(id) = line.strip_prefix("REVOKE ") {
            let outcome = decode.revoke(&kvtransfer::communicator::RequestId::new(id).unwrap());
            println!("REVOKED {}", unchanged_after(&cache, outcome));
            std::io::stdout().flush().unwrap();
            continue;
        }
        if line == "OPEN" {
            // Requests started and not yet ended, from every prefill (as `kvtransfer soak` counts them).
            let ended = |r: kvtransfer::metrics::RequestStats| r.done + r.failed + r.aborted + r.revoked + r.expired;
            let open: u64 = decode.stats().peers.iter().map(|p| p.requests.started.saturating_sub(ended(p.requests))).sum();
            println!("OPEN {open}");
            std::io::stdout().flush().unwrap();
            continue;
        }
        if line == "CLOSE" {
            decode.close().unwrap();
            println!("CLOSED {}", unchanged_after(&cache, Ok(())));
            std::io::stdout().flush().unwrap();
            continue;
        }
        let Some(list) = line.strip_prefix("CHECK ") else { break };
        let expects: Vec<Expect> = list
            .split(';')
            .filter(|s| !s.is_empty())
            .map(|e| {
                let v: Vec<u64> = e.split(':').map(|x| x.parse().unwrap()).collect();
                Expect {
                    tensor: v[0] as usize,
                    layer: v[1] as usize,
                    block: v[2] as u32,
                    offset: v[3],
                    len: v[4],
                    src_seed: v[5] as u32,
                    src_block: v[6] as u32,
                    src_block_bytes: v[7],
                }
            })
            .collect();
        println!("{}", verify(&cache, seed, &expects));
        std::io::stdout().flush().unwrap();
    }
}

/// After `outcome` of a revoke or a close: its error code, `CHANGED` where the cache still changes afterwards
/// (looked at again a while later), else `OK`.
fn unchanged_after(cache: &TestCache, outcome: kvtransfer::Result<()>) -> String {
    let after: Vec<Vec<u8>> = (0..cache.tensors).map(|t| cache.read(t)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let changed = (0..cache.tensors).any(|t| cache.read(t) != after[t]);
    match (outcome, changed) {
        (Err(e), _) => e.code().as_str().to_string(),
        (Ok(()), true) => "CHANGED".into(),
        (Ok(()), false) => "OK".into(),
    }
}

/// Request `r-<k>` writes source blocks `(k * 32 + i) % 256` (seed 1) into decode blocks `i` (`0..32`, or the
/// two of [`chaos_request`]): blocks reused by other requests, so a notification that came before its bytes
/// finds another request's bytes there.
fn notification_holds_its_bytes(cache: &TestCache, n: &kvtransfer::communicator::Notification) -> bool {
    let k: u32 = n.request_id.trim_start_matches("r-").parse().unwrap_or(0);
    let layer = n.layer.unwrap_or(0) as usize;
    let bb = cache.block_bytes as usize;
    (0..cache.tensors).all(|t| {
        n.block_ids.iter().all(|&i| {
            let src = ((k * 32 + i) % 256) as usize;
            let got = cache.read_block(t, layer, i);
            (0..bb).all(|b| got[b] == pattern(1, t, layer, src * bb + b))
        })
    })
}

/// Takes the decode's notifications as they come, checking each `r-<k>` one's bytes at once.
fn take_notifications(decode: std::sync::Arc<Communicator>, cache: std::sync::Arc<TestCache>, notes: std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let d = decode.clone();
    decode.next_notifications_then(move |batch| {
        if batch.is_empty() {
            return;
        }
        for n in &batch {
            if n.request_id.starts_with("r-") && n.status == kvtransfer::communicator::Status::Done {
                let ok = notification_holds_its_bytes(&cache, n);
                notes.lock().unwrap().push(format!("{}/{}:{}", n.request_id, n.layer.unwrap_or(0), if ok { "OK" } else { "EARLY" }));
            }
        }
        take_notifications(d, cache, notes);
    });
}

/// Compares every byte of `cache` with its own pattern overlaid with `expects`.
fn verify(cache: &TestCache, seed: u32, expects: &[Expect]) -> String {
    let layer_bytes = cache.blocks as usize * cache.block_bytes as usize;
    for t in 0..cache.tensors {
        let mut want: Vec<u8> = (0..cache.layers).flat_map(|l| (0..layer_bytes).map(move |i| pattern(seed, t, l, i))).collect();
        for e in expects.iter().filter(|e| e.tensor == t) {
            let at = e.layer * layer_bytes + (e.block as u64 * cache.block_bytes + e.offset) as usize;
            for k in 0..e.len as usize {
                want[at + k] = pattern(e.src_seed, t, e.layer, e.src_block as usize * e.src_block_bytes as usize + k);
            }
        }
        let got = cache.read(t);
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            return format!("MISMATCH tensor {t} layer {} block {} byte {}", i / layer_bytes, (i % layer_bytes) / cache.block_bytes as usize, i % cache.block_bytes as usize);
        }
    }
    "OK".into()
}

/// A decode process and the pipes to it.
struct DecodeProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

impl DecodeProcess {
    fn start(transport: &str, on_gpu: bool, tensors: usize, layers: usize, blocks: u32, block_bytes: u64, seed: u32) -> DecodeProcess {
        let args = format!("{transport},{},{tensors},{layers},{blocks},{block_bytes},{seed}", if on_gpu { "gpu" } else { "host" });
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["decode_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let port = loop {
            let mut line = String::new();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "the decode process ended before listening");
            // libtest may have written "test decode_child ... " on the same line first.
            if let Some(p) = line.trim().rsplit_once("PORT ") {
                break p.1.parse().unwrap();
            }
        };
        DecodeProcess { child, stdin, stdout, port }
    }

    fn check(&mut self, expects: &[Expect]) -> String {
        let list: Vec<String> = expects
            .iter()
            .map(|e| format!("{}:{}:{}:{}:{}:{}:{}:{}", e.tensor, e.layer, e.block, e.offset, e.len, e.src_seed, e.src_block, e.src_block_bytes))
            .collect();
        writeln!(self.stdin, "CHECK {}", list.join(";")).unwrap();
        loop {
            let mut line = String::new();
            assert!(self.stdout.read_line(&mut line).unwrap() > 0, "the decode process died");
            let line = line.trim();
            if line.ends_with("OK") || line.contains("MISMATCH") {
                return line.rsplit_once("MISMATCH").map_or("OK".to_string(), |(_, m)| format!("MISMATCH{m}"));
            }
        }
    }
}

impl DecodeProcess {
    /// Sends a command and returns the decode's answer: the first line that starts with `answer`.
    fn ask(&mut self, command: &str, answer: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.stdout.read_line(&mut line).unwrap() > 0, "the decode process died");
            if let Some((_, rest)) = line.trim().split_once(answer) {
                return rest.trim().to_string();
            }
        }
    }
}

impl Drop for DecodeProcess {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "QUIT");
        let _ = self.child.wait();
    }
}

fn prefill(cache: &TestCache, tp_size: u32, tp_idx: u32, transport: TransportChoice) -> Communicator {
    let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: cache.gpu.unwrap_or(0), port: 0, cache: cache.layout(), tp_size, tp_idx };
    Communicator::new(spec, config(transport)).unwrap()
}


/// Writes `layers` layers of 1538 scattered blocks from a prefill cache to a decode process, then checks
/// every byte there.
fn all_layers_scattered(transport: &str, choice: TransportChoice, decode_on_gpu: bool, tensors: usize, block_bytes: u64, want_link: &str) {
    scattered_calls(transport, choice, decode_on_gpu, tensors, block_bytes, want_link, (3, 2048, 1538));
}

/// As [`all_layers_scattered`], with `layers` layers of `blocks` blocks, `per_call` of them per call.
fn scattered_calls(
    transport: &str,
    choice: TransportChoice,
    decode_on_gpu: bool,
    tensors: usize,
    block_bytes: u64,
    want_link: &str,
    (layers, blocks, per_call): (usize, u32, usize),
) {
    let mut d = DecodeProcess::start(transport, decode_on_gpu, tensors, layers, blocks, block_bytes, 2);
    let src = TestCache::new(Some(0), tensors, layers, blocks, block_bytes, 1);
    let p = prefill(&src, 1, 0, choice);
    p.connect("127.0.0.1", d.port, 1).unwrap();
    assert_eq!(p.connected_transport("127.0.0.1", d.port).map(|k| k.as_str()), Some(want_link));
    let local = scattered(per_call, blocks, 3);
    let remote = scattered(per_call, blocks, 4);
    let mut expects = Vec::new();
    for layer in 0..layers {
        p.write_cache("127.0.0.1", d.port, &local, &remote, layer as u32).unwrap();
        for t in 0..tensors {
            for (l, r) in local.iter().zip(&remote) {
                expects.push(Expect { tensor: t, layer, block: *r, offset: 0, len: block_bytes, src_seed: 1, src_block: *l, src_block_bytes: block_bytes });
            }
        }
    }
    // A contiguous run too.
    p.write_cache("127.0.0.1", d.port, &[0, 1, 2, 3], &[remote[0], remote[1], remote[2], remote[3]], 0).unwrap();
    for t in 0..tensors {
        for k in 0..4 {
            expects.retain(|e| !(e.tensor == t && e.layer == 0 && e.block == remote[k]));
            expects.push(Expect { tensor: t, layer: 0, block: remote[k], offset: 0, len: block_bytes, src_seed: 1, src_block: k as u32, src_block_bytes: block_bytes });
        }
    }
    assert_eq!(d.check(&expects), "OK");
}

#[test]
fn cuda_ipc_all_layers_scattered_keys_and_values() {
    if gpu() {
        all_layers_scattered("cuda-ipc", TransportChoice::Only(TransportKind::CudaIpc), true, 2, 1024, "cuda-ipc");
        all_layers_scattered("cuda-ipc", TransportChoice::Only(TransportKind::CudaIpc), true, 2, 64 << 10, "cuda-ipc");
    }
}

/// A long call: 9000 blocks of keys and values, more than the kernel's grid covers in one pass.
#[test]
fn cuda_ipc_long_call() {
    if gpu() {
        scattered_calls("cuda-ipc", TransportChoice::Only(TransportKind::CudaIpc), true, 2, 256, "cuda-ipc", (1, 12000, 9000));
    }
}

#[test]
fn cuda_ipc_unaligned_blocks_and_key_only() {
    if gpu() {
        // 1000-byte blocks take the kernel's byte path; one tensor is key-only (MLA).
        all_layers_scattered("cuda-ipc", TransportChoice::Only(TransportKind::CudaIpc), true, 1, 1000, "cuda-ipc");
    }
}

#[test]
fn auto_picks_cuda_ipc_for_gpu_caches_on_one_host() {
    if gpu() {
        all_layers_scattered("auto", TransportChoice::Auto, true, 2, 4096, "cuda-ipc");
    }
}

#[test]
fn device_memory_over_tcp_both_sides_and_one_side() {
    if gpu() {
        all_layers_scattered("tcp", TransportChoice::Only(TransportKind::Tcp), true, 2, 16 << 10, "tcp");
        // Large enough for many staging chunks, with a host-memory decode.
        all_layers_scattered("tcp", TransportChoice::Only(TransportKind::Tcp), false, 2, 4096, "tcp");
    }
}

/// Two prefill ranks (tp 2) fill the halves of each decode block (dstTpSize 1). Rank 1 lives on the decode's
/// GPU, rank 0 on GPU 0: with two GPUs, one rank writes across them and the other within one.
fn hetero_tp(transport: &str, choice: TransportChoice, want_link: &str) {
    let (layers, blocks, decode_bytes) = (2, 256u32, 2048u64);
    let mut d = DecodeProcess::start(transport, true, 2, layers, blocks, decode_bytes, 5);
    let ranks: Vec<TestCache> =
        (0..2).map(|r| TestCache::new(Some(if r == 0 { 0 } else { decode_gpu() }), 2, layers, blocks, decode_bytes / 2, 10 + r)).collect();
    let local = scattered(100, blocks, 7);
    let remote = scattered(100, blocks, 8);
    let mut expects = Vec::new();
    for (rank, src) in ranks.iter().enumerate() {
        let p = prefill(src, 2, rank as u32, choice);
        p.connect("127.0.0.1", d.port, 1).unwrap();
        assert_eq!(p.connected_transport("127.0.0.1", d.port).map(|k| k.as_str()), Some(want_link));
        for layer in 0..layers {
            p.write_cache("127.0.0.1", d.port, &local, &remote, layer as u32).unwrap();
            for t in 0..2 {
                for (l, r) in local.iter().zip(&remote) {
                    expects.push(Expect {
                        tensor: t,
                        layer,
                        block: *r,
                        offset: rank as u64 * decode_bytes / 2,
                        len: decode_bytes / 2,
                        src_seed: 10 + rank as u32,
                        src_block: *l,
                        src_block_bytes: decode_bytes / 2,
                    });
                }
            }
        }
    }
    assert_eq!(d.check(&expects), "OK");
}

#[test]
fn cuda_ipc_hetero_tp() {
    if gpu() {
        hetero_tp("cuda-ipc", TransportChoice::Only(TransportKind::CudaIpc), "cuda-ipc");
    }
}

#[test]
fn device_memory_over_tcp_hetero_tp() {
    if gpu() {
        hetero_tp("tcp", TransportChoice::Only(TransportKind::Tcp), "tcp");
    }
}

#[test]
fn refusals_on_the_gpu_touch_nothing() {
    if !gpu() {
        return;
    }
    let mut d = DecodeProcess::start("cuda-ipc", true, 2, 2, 64, 1024, 2);
    let src = TestCache::new(Some(0), 2, 2, 64, 1024, 1);
    let p = prefill(&src, 1, 0, TransportChoice::Only(TransportKind::CudaIpc));
    p.connect("127.0.0.1", d.port, 1).unwrap();
    for (local, remote, layer) in [(vec![64u32], vec![0u32], 0u32), (vec![0], vec![64], 0), (vec![0], vec![1], 2), (vec![0, 1], vec![1], 0)] {
        let e = p.write_cache("127.0.0.1", d.port, &local, &remote, layer).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    }
    assert_eq!(d.check(&[]), "OK");
    // A host-memory decode cannot take cuda-ipc; a GPU cache cannot take shm.
    let host = TestCache::new(None, 2, 2, 64, 1024, 1);
    let spec = CommunicatorSpec { role: Role::Decode, gpu_idx: 0, port: 0, cache: host.layout(), tp_size: 1, tp_idx: 0 };
    let e = Communicator::new(spec, config(TransportChoice::Only(TransportKind::CudaIpc))).err().unwrap();
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
    let spec = CommunicatorSpec { role: Role::Prefill, gpu_idx: 0, port: 0, cache: src.layout(), tp_size: 1, tp_idx: 0 };
    let e = Communicator::new(spec, config(TransportChoice::Only(TransportKind::Shm))).err().unwrap();
    assert!(e.message().contains("memory of GPU"), "{e}");
}

#[test]
fn a_cache_past_its_allocation_is_refused() {
    if !gpu() {
        return;
    }
    let c = TestCache::new(Some(0), 1, 1, 16, 1024, 1);
    let mut spec = c.spec();
    spec.block_number = 4096;
    // SAFETY: refused before any address is used.
    let e = unsafe { CacheLayout::new(spec) }.err().unwrap();
    assert!(e.message().contains("past the end of its GPU allocation"), "{e}");
}

#[test]
fn cuda_ipc_notifications_come_after_the_bytes_and_revoke_stops_a_writer() {
    if !gpu() {
        return;
    }
    let (layers, blocks, block_bytes) = (2usize, 64u32, 64 * 1024u64);
    let mut d = DecodeProcess::start("cuda-ipc", true, 2, layers, blocks, block_bytes, 2);
    let src = TestCache::new(Some(0), 2, layers, 256, block_bytes, 1);
    let p = std::sync::Arc::new(prefill(&src, 1, 0, TransportChoice::Only(TransportKind::CudaIpc)));
    p.connect("127.0.0.1", d.port, 1).unwrap();
    let remote: Vec<u32> = (0..32).collect();
    let local = |k: u32| -> Vec<u32> { (0..32).map(|i| (k * 32 + i) % 256).collect() };
    for k in 0..8u32 {
        let request = kvtransfer::communicator::RequestId::new(format!("r-{k}")).unwrap();
        for layer in 0..layers as u32 {
            p.write_request("127.0.0.1", d.port, &local(k), &remote, layer, Some(&request)).unwrap();
            assert_eq!(d.ask(&format!("WAIT r-{k} {layer}"), "WAITED"), "OK");
        }
    }
    let notes = d.ask("NOTES 16", "NOTES");
    assert_eq!(notes.split(';').count(), 16, "{notes}");
    assert!(!notes.contains("EARLY"), "a notification came before its bytes: {notes}");
    // Revoke with a writer still running: nothing changes after the revoke returned; the writer sees REVOKED.
    let writer = {
        let (p, port, remote) = (p.clone(), d.port, remote.clone());
        std::thread::spawn(move || {
            let stale = kvtransfer::communicator::RequestId::new("stale").unwrap();
            for n in 0u32.. {
                if let Err(e) = p.write_request("127.0.0.1", port, &local(n % 8), &remote, 0, Some(&stale)) {
                    return (e.code(), n);
                }
            }
            unreachable!()
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(d.ask("REVOKE stale", "REVOKED"), "OK");
    let (code, writes) = writer.join().unwrap();
    assert_eq!(code, ErrorCode::Revoked);
    assert!(writes > 0);
    // Many requests in flight at once, queued on the peer's thread.
    let (tx, done) = std::sync::mpsc::channel();
    for k in 8..16u32 {
        for layer in 0..layers as u32 {
            let tx = tx.clone();
            let request = kvtransfer::communicator::RequestId::new(format!("many-{k}")).unwrap();
            let remote: Vec<u32> = (0..4).map(|i| 32 + (k - 8) * 4 + i).collect();
            p.write_cache_then("127.0.0.1", d.port, local(k)[..4].to_vec(), remote, layer, Some(request), None, move |r| tx.send(r).unwrap());
        }
    }
    for k in 8..16u32 {
        for layer in 0..layers {
            assert_eq!(d.ask(&format!("WAIT many-{k} {layer}"), "WAITED"), "OK");
        }
    }
    for _ in 0..8 * layers {
        done.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    }
    // Abort reaches the waiting decode.
    let doomed = kvtransfer::communicator::RequestId::new("doomed").unwrap();
    p.write_request("127.0.0.1", d.port, &local(1), &remote, 0, Some(&doomed)).unwrap();
    p.abort_request("127.0.0.1", d.port, &doomed, "the client left").unwrap();
    assert_eq!(d.ask("WAIT doomed 1", "WAITED"), "ABORTED");
    // A prefill that goes away in the middle of a request: the decode's wait fails at once.
    let other = prefill(&src, 1, 0, TransportChoice::Only(TransportKind::CudaIpc));
    other.connect("127.0.0.1", d.port, 1).unwrap();
    let orphan = kvtransfer::communicator::RequestId::new("orphan").unwrap();
    other.write_request("127.0.0.1", d.port, &local(2), &remote, 0, Some(&orphan)).unwrap();
    drop(other);
    assert_eq!(d.ask("WAIT orphan 1", "WAITED"), "TRANSPORT");
    // The decode closes with a writer still running: nothing changes after its close returned, and the writer
    // stops with an error.
    let writer = {
        let (p, port, remote) = (p.clone(), d.port, remote.clone());
        std::thread::spawn(move || {
            // A writer that is never stopped gives up after a while, and the test fails (rather than hangs).
            let until = std::time::Instant::now() + Duration::from_secs(10);
            for n in 0u32.. {
                if std::time::Instant::now() > until {
                    return (None, n);
                }
                if let Err(e) = p.write_cache("127.0.0.1", port, &local(n % 8), &remote, 1) {
                    return (Some(e), n);
                }
            }
            unreachable!()
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let closed = d.ask("CLOSE", "CLOSED");
    let (err, writes) = writer.join().unwrap();
    assert_eq!(closed, "OK", "bytes changed after the decode's close returned");
    let err = err.unwrap_or_else(|| panic!("the writer was never stopped: {writes} writes, the last after the close"));
    assert!(writes > 0, "the writer never wrote");
    eprintln!("the writer stopped after {writes} writes: {err}");
}

const PREFILL_CHILD: &str = "KVTRANSFER_TEST_PREFILL_CHILD";

/// A prefill in its own process, for the chaos test: connects to the decode at the port it is given and runs
/// requests `r-<k>` (`k` from the first it is given) of every layer, one after another, until it is killed;
/// prints `STARTED k` before each request's first write and `COMPLETED k` after its last.
#[test]
fn prefill_child() {
    let Ok(args) = std::env::var(PREFILL_CHILD) else { return };
    let a: Vec<u64> = args.split(',').map(|x| x.parse().unwrap()).collect();
    let (port, first, layers, block_bytes) = (a[0] as u16, a[1] as u32, a[2] as usize, a[3]);
    let src = TestCache::new(Some(0), 2, layers, 256, block_bytes, 1);
    let p = prefill(&src, 1, 0, TransportChoice::Only(TransportKind::CudaIpc));
    p.connect("127.0.0.1", port, 1).unwrap();
    for k in first.. {
        println!("STARTED {k}");
        std::io::stdout().flush().unwrap();
        match chaos_request(&p, port, k, layers) {
            Ok(()) => println!("COMPLETED {k}"),
            Err(e) => {
                println!("FAILED {k} {}", e.code().as_str());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::io::stdout().flush().unwrap();
    }
}

/// Request `r-<k>` of the chaos test, every layer: two decode blocks of 64 (`2 × (k mod 32)` and the next), so a
/// block is written again only 32 requests later, and a pause of 1 ms after it, so that the decode's check of
/// each notification (a read of its blocks) keeps up: a check that ran behind would find a later request's
/// bytes and call the notification early.
fn chaos_request(p: &Communicator, port: u16, k: u32, layers: usize) -> kvtransfer::Result<()> {
    let remote: Vec<u32> = (0..2).map(|i| (k % 32) * 2 + i).collect();
    let local: Vec<u32> = remote.iter().map(|&i| (k * 32 + i) % 256).collect();
    let request = kvtransfer::communicator::RequestId::new(format!("r-{k}")).unwrap();
    let written = (0..layers as u32).try_for_each(|layer| p.write_request("127.0.0.1", port, &local, &remote, layer, Some(&request)));
    std::thread::sleep(Duration::from_millis(1));
    written
}

/// A prefill process of [`prefill_child`], and what it printed.
struct PrefillProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    started: Vec<u32>,
    completed: Vec<u32>,
}

impl PrefillProcess {
    fn start(port: u16, first: u32, layers: usize, block_bytes: u64) -> PrefillProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["prefill_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(PREFILL_CHILD, format!("{port},{first},{layers},{block_bytes}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        PrefillProcess { child, lines, started: Vec::new(), completed: Vec::new() }
    }

    /// Takes what it printed so far (within `wait`); `false` once it has ended (its output closed).
    fn read(&mut self, wait: Duration) -> bool {
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let number = |p: &str| line.rsplit_once(p).and_then(|(_, k)| k.trim().parse::<u32>().ok());
                    if let Some(k) = number("STARTED ") {
                        self.started.push(k);
                    } else if let Some(k) = number("COMPLETED ") {
                        self.completed.push(k);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return true,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: a signal to this test's own child, which has not been reaped yet (`kill` waits for it).
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// SIGKILL, then reaped, then everything it printed read.
    fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.child.wait().unwrap();
        while self.read(Duration::from_secs(5)) {}
    }
}

impl Drop for PrefillProcess {
    /// A test that failed half-way leaves no writer behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `p`-th percentile of `ms` (sorted here).
fn percentile(ms: &mut [u128], p: usize) -> u128 {
    ms.sort_unstable();
    ms.get((ms.len().saturating_sub(1)) * p / 100).copied().unwrap_or(0)
}

/// Chaos over CUDA IPC: prefill processes killed (some stopped and resumed first) at random moments of their
/// requests, again and again, then the decode process killed under a writing prefill and replaced. Each killed
/// prefill's requests must end at the decode (none open 5 s after the kill), every `Done` notification must
/// find its request's bytes in the cache, and the decode must keep serving new prefills; each killed decode
/// must fail the prefill's write within its deadline, and the next decode complete a request. Iterations:
/// `KVTRANSFER_TEST_CHAOS_ITERATIONS` (default 30, and a fifth as many decode kills).
#[test]
fn cuda_ipc_chaos_kills_and_stops_prefills_and_decodes() {
    if !gpu() {
        return;
    }
    let iterations: u32 = std::env::var("KVTRANSFER_TEST_CHAOS_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let (layers, block_bytes) = (4usize, 64 * 1024u64);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut d = DecodeProcess::start("cuda-ipc", true, 2, layers, 64, block_bytes, 2);
    let (mut stops, mut ended_ms, mut outcomes) = (0, Vec::new(), std::collections::BTreeMap::<String, u32>::new());
    for i in 0..iterations {
        let mut p = PrefillProcess::start(d.port, i * 100_000, layers, block_bytes);
        // Until its first request has started, then a random moment of its requests.
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while p.started.is_empty() {
            assert!(p.read(Duration::from_millis(20)) && std::time::Instant::now() < until, "prefill {i} never started a request");
        }
        p.read(Duration::from_millis(random(150)));
        if random(3) == 0 {
            p.signal(libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(100 + random(700)));
            p.signal(libc::SIGCONT);
            stops += 1;
            p.read(Duration::from_millis(random(50)));
        }
        p.kill();
        let killed = std::time::Instant::now();
        // The decode ends every request of the killed process it had started.
        loop {
            let open: u64 = d.ask("OPEN", "OPEN").parse().unwrap();
            if open == 0 {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(5), "iteration {i}: the decode still held {open} requests open 5 s after the kill");
            std::thread::sleep(Duration::from_millis(10));
        }
        ended_ms.push(killed.elapsed().as_millis());
        // What the request in flight became at the decode: complete, failed with its connection, or never heard of
        // (a wait that runs out: the decode holds none open, so it never had it).
        let last = *p.started.last().unwrap();
        let outcome = d.ask(&format!("WAIT r-{last} {} 300", layers - 1), "WAITED");
        let outcome = match outcome.as_str() {
            "OK" => "complete".to_string(),
            "TIMEOUT" => "unheard".to_string(),
            code => code.to_lowercase(),
        };
        assert!(["complete", "unheard", "transport", "aborted"].contains(&outcome.as_str()), "iteration {i}: request r-{last} ended {outcome}");
        *outcomes.entry(outcome).or_default() += 1;
        let done = p.completed.iter().filter(|&&k| k != last).count();
        *outcomes.entry("completed before it".into()).or_default() += done as u32;
    }
    // Every Done notification found its bytes in place.
    let notes = d.ask("NOTES 1", "NOTES");
    assert!(!notes.contains("EARLY"), "a notification came before its bytes: {notes}");
    let checked = notes.split(';').filter(|n| n.ends_with(":OK")).count();
    assert!(outcomes.get("completed before it").copied().unwrap_or(0) > 0, "no killed prefill completed a request: {outcomes:?}");
    // The survivor serves a new prefill, whose request completes.
    let src = TestCache::new(Some(0), 2, layers, 256, block_bytes, 1);
    let p = prefill(&src, 1, 0, TransportChoice::Only(TransportKind::CudaIpc));
    let write_request = |port: u16, k: u32| chaos_request(&p, port, k, layers);
    p.connect("127.0.0.1", d.port, 1).unwrap();
    // A request id no prefill of the chaos used (theirs start at multiples of 100,000).
    write_request(d.port, 99_999).unwrap();
    assert_eq!(d.ask(&format!("WAIT r-99999 {}", layers - 1), "WAITED"), "OK");
    // The decode killed under a writing prefill, and replaced.
    let (mut failed_ms, mut serving_ms, mut codes) = (Vec::new(), Vec::new(), std::collections::BTreeMap::<String, u32>::new());
    for j in 0..(iterations / 5).max(1) {
        let port = d.port;
        let victim = d.child.id() as i32;
        let killer = std::thread::spawn({
            let wait = Duration::from_millis(50 + random(200));
            move || {
                std::thread::sleep(wait);
                let killed = std::time::Instant::now();
                // SAFETY: a signal to the decode child, reaped only when `d` is replaced below.
                unsafe { libc::kill(victim, libc::SIGKILL) };
                killed
            }
        });
        let (mut k, writing) = (1000 * (j + 1), std::time::Instant::now());
        let failure = loop {
            if let Err(e) = write_request(port, k) {
                break e;
            }
            assert!(writing.elapsed() < Duration::from_secs(30), "decode kill {j}: the prefill still writes 30 s later");
            k += 1;
        };
        let failed = std::time::Instant::now();
        let killed = killer.join().unwrap();
        assert!(failed > killed, "decode kill {j}: a write failed before the kill: {failure}");
        assert!(failed - killed < Duration::from_secs(20), "decode kill {j}: the write failed {:?} after it", failed - killed);
        let code = failure.code();
        assert!(
            matches!(code, ErrorCode::Transport | ErrorCode::NotConnected | ErrorCode::Unreachable | ErrorCode::Timeout),
            "decode kill {j}: the write failed with {failure}"
        );
        failed_ms.push((failed - killed).as_millis());
        *codes.entry(code.as_str().to_string()).or_default() += 1;
        drop(std::mem::replace(&mut d, DecodeProcess::start("cuda-ipc", true, 2, layers, 64, block_bytes, 2)));
        p.connect("127.0.0.1", d.port, 1).unwrap();
        write_request(d.port, 99_999).unwrap();
        assert_eq!(d.ask(&format!("WAIT r-99999 {}", layers - 1), "WAITED"), "OK");
        serving_ms.push(killed.elapsed().as_millis());
    }
    let notes = d.ask("NOTES 1", "NOTES");
    assert!(!notes.contains("EARLY"), "a notification came before its bytes: {notes}");
    eprintln!(
        "CHAOS cuda-ipc: {iterations} prefill kills ({stops} stopped and resumed first): the request in flight {outcomes:?}; \
         the decode held none of them {} ms after the kill (p50; {} max); {checked} notifications, each found its bytes; \
         {} decode kills: the prefill's write failed {codes:?} {} ms after the kill (p50; {} max), a request completed on the next decode {} ms after it (p50; {} max)",
        percentile(&mut ended_ms, 50),
        percentile(&mut ended_ms, 100),
        failed_ms.len(),
        percentile(&mut failed_ms, 50),
        percentile(&mut failed_ms, 100),
        percentile(&mut serving_ms, 50),
        percentile(&mut serving_ms, 100),
    );
}
