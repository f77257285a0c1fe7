//! The core's hot path, without Node: planning a call and building its RDMA work requests (ns per block,
//! no NIC needed), and the TCP transport against one plain stream of the same bytes over loopback. 1538
//! blocks per call, as in the reference benchmark. The shm transport (`process_vm_writev`) runs the same
//! calls.
//!
//!     cargo bench -p kvtransfer --bench hot_path

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvtransfer::memory::{CacheLayout, CacheSpec, HostAllocation};
use kvtransfer::plan::{BlockPlan, PlanForm, SliceGeometry};
use kvtransfer::transport::rdma::post::{LayerKeys, WriteChain};
use kvtransfer::transport::rdma::registration::RemoteRegion;
use kvtransfer::{Communicator, CommunicatorSpec, Config, Role, TransportChoice, TransportKind};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

#[path = "../tests/common/ids.rs"]
mod ids;
use ids::scattered;

const BATCH: u32 = 1538;
const SIZES: [u64; 5] = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10];

fn plan(c: &mut Criterion) {
    let local = scattered(BATCH, 1);
    let remote = scattered(BATCH, 2);
    let contiguous: Vec<u32> = (0..BATCH).collect();
    let mut g = c.benchmark_group("plan");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut p = BlockPlan::default();
    g.bench_function("scattered_1538", |b| b.iter(|| p.build(&local, &remote, 0, 1, BATCH, BATCH).unwrap()));
    g.bench_function("contiguous_1538", |b| b.iter(|| p.build(&contiguous, &contiguous, 0, 1, BATCH, BATCH).unwrap()));
    let mut ids = BlockPlan::new(PlanForm::Ids);
    g.bench_function("scattered_1538_ids", |b| b.iter(|| ids.build(&local, &remote, 0, 1, BATCH, BATCH).unwrap()));
    g.finish();
}

/// What `writeCache` does on the CPU before the doorbell: validate and coalesce the ids, build one
/// `RDMA_WRITE` per block and tensor (keys and values: 3076 work requests), and chain them into lists.
fn rdma_work_requests(c: &mut Criterion) {
    let local = scattered(BATCH, 1);
    let remote = scattered(BATCH, 2);
    let block_bytes = 1024;
    // SAFETY: made-up addresses: the bench only builds work requests, nothing is posted.
    let cache = unsafe { kvtransfer::memory::CacheLayout::new(CacheSpec {
        key: vec![0x1000_0000],
        value: vec![0x2000_0000],
        block_number: BATCH,
        block_bytes,
        ..CacheSpec::default()
    }) }
    .unwrap();
    let region = |addr| RemoteRegion { addr, len: BATCH as u64 * block_bytes, rkey: 7 };
    let keys = LayerKeys { lkeys: [1, 2, 0, 0], remote: [region(0x3000_0000), region(0x4000_0000), region(0), region(0)] };
    let mut plan = BlockPlan::default();
    let mut chain = WriteChain::default();
    let mut g = c.benchmark_group("rdma_work_requests_1538_scattered");
    g.throughput(Throughput::Elements(BATCH as u64));
    plan.build(&local, &remote, 0, 1, BATCH, BATCH).unwrap();
    g.bench_function("build_and_chain", |b| {
        b.iter(|| {
            chain.build(&plan, &cache, &keys, SliceGeometry::WHOLE, 1 << 30);
            chain.link(4096);
        })
    });
    g.bench_function("plan_build_and_chain", |b| {
        b.iter(|| {
            plan.build(&local, &remote, 0, 1, BATCH, BATCH).unwrap();
            chain.build(&plan, &cache, &keys, SliceGeometry::WHOLE, 1 << 30);
            chain.link(4096);
        })
    });
    g.finish();
}

fn cache(block_bytes: u64) -> (Vec<HostAllocation>, CacheSpec) {
    let bytes = (BATCH as u64 * block_bytes) as usize;
    let mut mem = vec![HostAllocation::new(bytes).unwrap(), HostAllocation::new(bytes).unwrap()];
    for m in &mut mem {
        m.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    }
    let spec = CacheSpec { key: vec![mem[0].addr()], value: vec![mem[1].addr()], block_number: BATCH, block_bytes, ..CacheSpec::default() };
    (mem, spec)
}

fn tcp(c: &mut Criterion) {
    write_1538_scattered(c, TransportChoice::Only(TransportKind::Tcp));
}

fn shm(c: &mut Criterion) {
    write_1538_scattered(c, TransportChoice::Only(TransportKind::Shm));
}

/// `writeCache` of 1538 scattered blocks, keys and values, between two communicators of this process.
fn write_1538_scattered(c: &mut Criterion, transport: TransportChoice) {
    let config = Config { transport, timeouts: kvtransfer::Timeouts::all(Duration::from_secs(30)), ..Config::default() };
    let local = scattered(BATCH, 3);
    let remote = scattered(BATCH, 4);
    let mut g = c.benchmark_group(format!("{}_write_1538_scattered", transport.as_str()));
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    for size in SIZES {
        let (_dst_mem, dst) = cache(size);
        let (_src_mem, src) = cache(size);
        // SAFETY: both allocations live until the end of this iteration, after the communicators.
        let spec = |role, cache| CommunicatorSpec { role, gpu_idx: 0, port: 0, cache: unsafe { CacheLayout::new(cache) }.unwrap(), tp_size: 1, tp_idx: 0 };
        let decode = Communicator::new(spec(Role::Decode, dst), config.clone()).unwrap();
        let prefill = Communicator::new(spec(Role::Prefill, src), config.clone()).unwrap();
        prefill.connect("127.0.0.1", decode.port(), 1).unwrap();
        g.throughput(Throughput::Bytes(2 * BATCH as u64 * size));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| prefill.write_cache("127.0.0.1", decode.port(), &local, &remote, 0).unwrap())
        });
    }
    g.finish();
}

/// The ceiling: the same bytes as one contiguous stream, one write and one read loop, with a one-byte
/// answer so each round trip is complete, as a write call is.
fn plain_stream(c: &mut Criterion) {
    let mut g = c.benchmark_group("plain_stream_same_bytes");
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    for size in SIZES {
        let total = (2 * BATCH as u64 * size) as usize;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = vec![0u8; total];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&[1]).is_err() {
                    break;
                }
            }
        });
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let data = vec![7u8; total];
        let mut ack = [0u8; 1];
        g.throughput(Throughput::Bytes(total as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| {
                s.write_all(&data).unwrap();
                s.read_exact(&mut ack).unwrap();
            })
        });
        drop(s);
        server.join().unwrap();
    }
    g.finish();
}

/// What the instruments add to each write call (`stats()`): two clock reads, the in-flight gauge up and down,
/// three counters and one histogram sample.
fn metrics(c: &mut Criterion) {
    let peer = kvtransfer::metrics::PeerInstruments::default();
    let mut g = c.benchmark_group("metrics");
    g.bench_function("per_write_call", |b| {
        b.iter(|| {
            let started = std::time::Instant::now();
            peer.in_flight.add(1);
            peer.in_flight.add(-1);
            peer.writes.add(1);
            peer.blocks.add(u64::from(BATCH));
            peer.bytes.add(u64::from(BATCH) * 2048);
            peer.write_time.record(started.elapsed());
        })
    });
    g.finish();
}

criterion_group!(benches, plan, rdma_work_requests, tcp, shm, plain_stream, metrics);
criterion_main!(benches);
