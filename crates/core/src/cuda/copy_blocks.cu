// The kernel kvtransfer ships: copies a list of blocks, each from one address to another, for up to four
// tensors at once. Compiled to PTX (compute_70, so the driver JITs it for any GPU from Volta on) by
// build_ptx.py; the PTX is checked in and embedded in the library.
//
// Work is handed out in items: item `j` is block `j % blocks` of tensor `j / blocks`. A CTA (eight warps)
// takes `8 >> warp_shift` consecutive items per pass, each moved by `1 << warp_shift` warps: one warp per
// small block, several for a large one; passes stride over the grid. The block ids usually live in mapped
// host memory, where a read is a trip over PCIe: before copying, each thread of the CTA fetches the ids of
// one of the CTA's next 256 items into shared memory, so that one round trip serves many passes.

typedef unsigned long long u64;

// Where the blocks of one tensor come from and go to: block `i` of the source lies at
// `src + i * src_stride + src_offset`, and is `bytes` long.
struct TensorCopy {
    u64 src;
    u64 src_stride;
    u64 src_offset;
    u64 dst;
    u64 dst_stride;
    u64 dst_offset;
    u64 bytes;
};

// Items [begin, end) of one launch; item `j` copies source block `src_ids[j % blocks]` to destination block
// `dst_ids[j % blocks]` (an absent list means the identity).
struct BlockCopy {
    TensorCopy tensor[4];
    const unsigned int* src_ids;
    const unsigned int* dst_ids;
    unsigned int blocks;
    unsigned int begin;
    unsigned int end;
    unsigned int warp_shift;
};

// How the eight warps of a CTA share its items.
struct Team {
    unsigned int per_cta;  // items per CTA per pass
    unsigned int slot;     // this warp's item in the pass
    unsigned int g;        // this thread's index among the item's threads
    unsigned int G;        // threads per item
    __device__ explicit Team(const unsigned int warp_shift) {
        const unsigned int warp = threadIdx.x >> 5;
        per_cta = 8u >> warp_shift;
        slot = warp >> warp_shift;
        G = 32u << warp_shift;
        g = ((warp & ((1u << warp_shift) - 1)) << 5) | (threadIdx.x & 31);
    }
};

// Copies item `item` from source block `s` to destination block `d`: thread `g` of the `G` sharing it.
// 16-byte accesses when everything is aligned, eight loads in flight per thread before their stores.
__device__ __forceinline__ void copy_item(const BlockCopy& p, const u64 item, const u64 s, const u64 d, const Team& team) {
    const TensorCopy c = p.tensor[item / p.blocks];
    const char* src = (const char*)(c.src + s * c.src_stride + c.src_offset);
    char* dst = (char*)(c.dst + d * c.dst_stride + c.dst_offset);
    const u64 n = c.bytes;
    const unsigned int g = team.g, G = team.G;
    if ((((u64)src | (u64)dst | n) & 15) == 0) {
        const uint4* __restrict__ s4 = (const uint4*)src;
        uint4* __restrict__ d4 = (uint4*)dst;
        const u64 n4 = n >> 4;
        for (u64 k = g; k < n4; k += 8ull * G) {
            uint4 v[8];
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (k + (u64)u * G < n4) v[u] = s4[k + (u64)u * G];
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (k + (u64)u * G < n4) d4[k + (u64)u * G] = v[u];
        }
    } else {
        for (u64 k = g; k < n; k += G) dst[k] = src[k];
    }
}

extern "C" __global__ void __launch_bounds__(256) copy_blocks(const BlockCopy p) {
    __shared__ unsigned int ids[2][256];
    const Team team(p.warp_shift);
    const u64 stride = (u64)gridDim.x * team.per_cta;  // items from one of this CTA's passes to the next
    const unsigned int passes = 256 / team.per_cta;     // passes whose ids one fetch covers
    for (u64 round = p.begin + (u64)blockIdx.x * team.per_cta; round < p.end; round += passes * stride) {
        const u64 mine = round + threadIdx.x / team.per_cta * stride + threadIdx.x % team.per_cta;
        if (mine < p.end) {
            const unsigned int i = (unsigned int)(mine % p.blocks);
            ids[0][threadIdx.x] = p.src_ids ? p.src_ids[i] : i;
            ids[1][threadIdx.x] = p.dst_ids ? p.dst_ids[i] : i;
        }
        __syncthreads();
        for (unsigned int pass = 0; pass < passes; pass++) {
            const u64 item = round + pass * stride + team.slot;
            if (item >= p.end) break;
            const unsigned int k = pass * team.per_cta + team.slot;
            copy_item(p, item, ids[0][k], ids[1][k], team);
        }
        __syncthreads();
    }
}
