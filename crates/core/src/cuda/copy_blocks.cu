// The one kernel kvtransfer ships: copies a list of blocks, each from one address to another, for up to four
// tensors at once. One warp moves one (tensor, block) item; 16-byte accesses when everything is aligned.
// Compiled to PTX (compute_70, so the driver JITs it for any GPU from Volta on) by build_ptx.py; the PTX is
// checked in and embedded in the library.

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

// Item `j` in [begin, end) is block `j % blocks` of tensor `j / blocks`; it copies source block
// `src_ids[j % blocks]` to destination block `dst_ids[j % blocks]` (an absent list means the identity).
struct BlockCopy {
    TensorCopy tensor[4];
    const unsigned int* src_ids;
    const unsigned int* dst_ids;
    unsigned int blocks;
    unsigned int begin;
    unsigned int end;
};

extern "C" __global__ void __launch_bounds__(256) copy_blocks(const BlockCopy p) {
    const unsigned int lane = threadIdx.x & 31;
    const unsigned int warps = (gridDim.x * blockDim.x) >> 5;
    for (unsigned int item = p.begin + ((blockIdx.x * blockDim.x + threadIdx.x) >> 5); item < p.end; item += warps) {
        const unsigned int t = item / p.blocks;
        const unsigned int i = item - t * p.blocks;
        const TensorCopy c = p.tensor[t];
        const u64 s = p.src_ids ? p.src_ids[i] : i;
        const u64 d = p.dst_ids ? p.dst_ids[i] : i;
        const char* src = (const char*)(c.src + s * c.src_stride + c.src_offset);
        char* dst = (char*)(c.dst + d * c.dst_stride + c.dst_offset);
        const u64 n = c.bytes;
        if ((((u64)src | (u64)dst | n) & 15) == 0) {
            const uint4* __restrict__ s4 = (const uint4*)src;
            uint4* __restrict__ d4 = (uint4*)dst;
            const u64 n4 = n >> 4;
            u64 k = lane;
            // Four loads in flight per lane before the stores: enough bytes moving to hide latency.
            for (; k + 96 < n4; k += 128) {
                const uint4 a = s4[k], b = s4[k + 32], e = s4[k + 64], f = s4[k + 96];
                d4[k] = a;
                d4[k + 32] = b;
                d4[k + 64] = e;
                d4[k + 96] = f;
            }
            for (; k < n4; k += 32) d4[k] = s4[k];
        } else {
            for (u64 k = lane; k < n; k += 32) dst[k] = src[k];
        }
    }
}
