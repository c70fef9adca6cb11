// tierkv CUDA kernels: fused gather + dequantize of packed chunks, and quantize-on-ingest.
//
// One source for two compilers: nvcc builds it into the torch extension (csrc/tierkv_ops.cu), NVRTC
// compiles it at run time for the cupy backend (tierkv/_cupy_backend.py). So: no standard or torch
// headers, no cuda_fp16.h / cuda_bf16.h (conversions are written in PTX), only builtins.
//
// The packed byte layout read and written here is defined in tierkv/formats.py (the one source of
// truth); int_layout() below mirrors ChunkLayout.sections(). Results must equal formats.encode /
// formats.decode bit for bit, so every float step is a correctly rounded intrinsic (__fmul_rn,
// __fadd_rn, __fsub_rn, __fdiv_rn, rintf) that the compiler may not contract into an FMA, and every
// narrowing conversion is round-to-nearest-even, as torch's are.
#ifndef TIERKV_KERNELS_CUH
#define TIERKV_KERNELS_CUH

#define TIERKV_THREADS 256
#define TIERKV_MAX_SOURCES 64
#define TIERKV_MAX_HEAD_DIM 1024  // one 8-channel unit per thread per row, and bounded shared memory

namespace tierkv {

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

// Element types of K/V tensors (outputs of gather, inputs of ingest).
enum { DT_BF16 = 0, DT_FP16 = 1, DT_FP32 = 2 };
// Chunk formats: the raw ones by element type, the integer ones by bit width.
enum { FMT_BF16 = 0, FMT_FP16 = 1, FMT_INT2 = 2, FMT_INT4 = 4, FMT_INT8 = 8 };

// ---------------------------------------------------------------------------------------------
// Layout (mirrors tierkv.formats.ChunkLayout; host and device)
// ---------------------------------------------------------------------------------------------
__host__ __device__ inline i64 pad16(i64 x) { return (x + 15) & ~(i64)15; }

struct IntLayout {
  i64 kc, ks, kz, vc, vs, vz, bytes;  // section offsets inside a head block, and its size
};

// Head block of an integer format: K codes, K scale, K zero, V codes, V scale, V zero.
__host__ __device__ inline IntLayout int_layout(i64 n, i64 d, i64 bits, i64 ngroups) {
  IntLayout l;
  const i64 codes = n * d * bits / 8;
  const i64 vsz = n * ngroups * 2;
  l.kc = 0;
  l.ks = pad16(codes);
  l.kz = l.ks + 2 * d;  // 2*d is a multiple of 16 since d % 8 == 0
  l.vc = l.kz + 2 * d;
  l.vs = l.vc + pad16(codes);
  l.vz = l.vs + pad16(vsz);
  l.bytes = l.vz + pad16(vsz);
  return l;
}

__host__ __device__ inline i64 head_bytes(int fmt, i64 n, i64 d, i64 group) {
  if (fmt == FMT_BF16 || fmt == FMT_FP16) return 4 * n * d;  // K then V, n*d*2 each (a multiple of 16)
  return int_layout(n, d, fmt, d / group).bytes;
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments, passed by value (all fields 8 bytes: the cupy backend builds the same bytes)
// ---------------------------------------------------------------------------------------------
struct GatherArgs {
  u64 src_ptr[TIERKV_MAX_SOURCES];   // base address of each flat uint8 source (device or pinned host)
  u64 src_size[TIERKV_MAX_SOURCES];  // its size in bytes
  u64 extra;     // when n_sources > TIERKV_MAX_SOURCES: device u64[2 * n_sources], pointers then sizes
  u64 table;     // device i64 [n_entries][5]: source, byte offset of the head block, tokens, row, n0
  u64 k_out;     // [B, H, N, D] elements of the output type, last dim contiguous
  u64 v_out;
  i64 n_entries;
  i64 n_sources;
  i64 out_b, out_h, out_n;         // B, H, N
  i64 sk_b, sk_h, sk_n;            // k_out strides (elements)
  i64 sv_b, sv_h, sv_n;            // v_out strides (elements)
  i64 head_dim;
  i64 group;                       // channels per value group (integer formats)
  i64 parts;                       // blocks per entry (work split along the tokens)
  i64 tile_tokens;                 // tokens per tile, a multiple of 8
  i64 out_vec;                     // 1: both outputs allow 16-byte stores
};

struct IngestArgs {
  u64 k, v;            // [B, H, T, D] elements of the input type, last dim contiguous
  u64 packed;          // u8 [B, C, H * head_bytes]
  u64 abstracts;       // [B, C, H, 2, D] in the input type, contiguous
  i64 b, h, t, d;
  i64 chunk;           // tokens per chunk (L)
  i64 c;               // chunks per sequence (C = T / L)
  i64 group;           // channels per value group (integer formats)
  i64 sk_b, sk_h, sk_t;  // k strides (elements)
  i64 sv_b, sv_h, sv_t;  // v strides (elements)
  i64 head_bytes;
  i64 in_vec;          // 1: rows of k and v allow 16-byte loads
  i64 v_tile;          // tokens whose value scales are held in shared memory at once
};

// Tokens of values whose per-group scales an ingest block keeps in shared memory at once, and the
// dynamic shared memory that block needs; the host sides (C++ and Python) call / mirror these.
__host__ __device__ inline i64 ingest_v_tile(i64 chunk, i64 ngroups) {
  i64 vt = 1024 / ngroups;
  if (vt < 1) vt = 1;
  return vt < chunk ? vt : chunk;
}

// Shared memory of one gather warp: none for raw formats; for integer formats the K scale and zero
// as floats (8d bytes) and two tiles of `tile` tokens (codes of K and V, value scales and zeros).
__host__ __device__ inline i64 gather_warp_smem_bytes(int fmt, i64 d, i64 ngroups, i64 tile) {
  if (fmt == FMT_BF16 || fmt == FMT_FP16) return 0;
  return pad16(8 * d + 2 * tile * (2 * (d * fmt / 8) + 4 * ngroups));
}

// Dynamic shared memory of a gather block (TIERKV_THREADS / 32 warps).
__host__ __device__ inline i64 gather_smem_bytes(int fmt, i64 d, i64 ngroups, i64 tile) {
  return (TIERKV_THREADS / 32) * gather_warp_smem_bytes(fmt, d, ngroups, tile);
}

__host__ __device__ inline i64 ingest_smem_bytes(i64 d, i64 ngroups, i64 v_tile) {
  const i64 upr = d / 8;
  const i64 rows = TIERKV_THREADS / upr;
  return 8 * rows * d + 8 * d + 8 * v_tile * ngroups;  // partial min/max, K scale/zero, V scale/zero
}

// ---------------------------------------------------------------------------------------------
// Conversions (PTX: no cuda_fp16.h under NVRTC). All narrowing is round-to-nearest-even.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float bf16_to_f32(u32 h) { return __uint_as_float(h << 16); }

__device__ __forceinline__ float f16_to_f32(u32 h) {
  float f;
  unsigned short hs = (unsigned short)h;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(hs));
  return f;
}

__device__ __forceinline__ u32 f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ u32 f32_to_bf16(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// Two floats -> one 32-bit word of two 16-bit values, `lo` in the low half (lower channel).
template <int DT>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  if (DT == DT_BF16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

template <int DT>
__device__ __forceinline__ float half_to_f32(u32 h) {
  return DT == DT_BF16 ? bf16_to_f32(h & 0xffffu) : f16_to_f32(h & 0xffffu);
}

template <int DT>
__device__ __forceinline__ u32 f32_to_half(float f) {
  return DT == DT_BF16 ? f32_to_bf16(f) : f32_to_f16(f);
}

// ---------------------------------------------------------------------------------------------
// Memory helpers
// ---------------------------------------------------------------------------------------------
// Read-only 16-byte load. Works on device memory and on pinned host memory mapped through unified
// addressing alike (the kernel reads host-resident chunks over PCIe itself, no staging copy).
__device__ __forceinline__ uint4 ld16(const u8* p) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// The same 16 bytes from an address of any alignment (the slow path for oddly placed chunks).
__device__ __forceinline__ uint4 ld16_bytes(const u8* p) {
  u32 w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = (u32)p[4 * i] | ((u32)p[4 * i + 1] << 8) | ((u32)p[4 * i + 2] << 16) | ((u32)p[4 * i + 3] << 24);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ u64 to_global(const void* p) {
  u64 g;
  asm("cvta.to.global.u64 %0, %1;" : "=l"(g) : "l"(p));
  return g;
}

// The output stores' cache qualifier: .L1::no_allocate. On the H200 it made the quantized gathers of
// bench_kernels' scene 5-16% faster than the plain store, in two runs, and left the raw ones within
// 1% (bench/results/store_paths_h200_*.json). A build may ask for another, e.g.
// -DTIERKV_ST_HINT='""' (plain) or '".cs"' (streaming); bench/bench_store_paths.py compares them
// through NVRTC in one run. TIERKV_ST_L2_EVICT_FIRST instead marks the stores evict-first in L2
// through a cache policy.
#ifndef TIERKV_ST_HINT
#define TIERKV_ST_HINT ".L1::no_allocate"
#endif
// Unrolling of the integer gathers' per-row decode loops (-DTIERKV_ROW_UNROLL=n; default: the
// compiler's choice), for the same comparison.
#ifdef TIERKV_ROW_UNROLL
#define TIERKV_STR(x) #x
#define TIERKV_UNROLL(n) _Pragma(TIERKV_STR(unroll n))
#define TIERKV_ROW_LOOP TIERKV_UNROLL(TIERKV_ROW_UNROLL)
#else
#define TIERKV_ROW_LOOP
#endif

// 8 consecutive 16-bit outputs; `vec` says the address allows one 16-byte store.
__device__ __forceinline__ void st16(u16* p, uint4 v, bool vec) {
  if (vec) {
#ifdef TIERKV_ST_L2_EVICT_FIRST
    u64 pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(to_global(p)), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w), "l"(pol)
                 : "memory");
#else
    asm volatile("st.global" TIERKV_ST_HINT ".v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(to_global(p)), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
#endif
  } else {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      p[2 * i] = (u16)(w[i] & 0xffffu);
      p[2 * i + 1] = (u16)(w[i] >> 16);
    }
  }
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u64 a;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
  return (u32)a;
}

// 16 bytes global -> shared without passing through registers (L1 bypassed: read-once data).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem)), "l"(to_global(gmem)) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Gather: table entries
// ---------------------------------------------------------------------------------------------
struct Entry {
  const u8* base;  // head block
  i64 n, n0;
  u16* k;          // first output element of this entry's row at token n0 (K and V)
  u16* v;
  bool ok;
};

// Checks table row (s, off, n, dst, n0). An entry that would read or write out of bounds is skipped
// (the host validates tables when asked; the kernel only refuses to touch memory it was not given).
__device__ __forceinline__ Entry make_entry(const GatherArgs& a, i64 s, i64 off, i64 n, i64 dst, i64 n0, int fmt) {
  Entry en;
  en.ok = false;
  en.n = n;
  en.n0 = n0;
  if (s < 0 || s >= a.n_sources || n < 1 || off < 0 || dst < 0 || dst >= a.out_b * a.out_h || n0 < 0 ||
      n > a.out_n || n0 > a.out_n - n)
    return en;
  u64 ptr, size;
  if (s < TIERKV_MAX_SOURCES) {
    ptr = a.src_ptr[s];
    size = a.src_size[s];
  } else {
    const u64* extra = reinterpret_cast<const u64*>(a.extra);
    ptr = extra[s];
    size = extra[a.n_sources + s];
  }
  const i64 hb = head_bytes(fmt, n, a.head_dim, a.group);
  if (ptr == 0 || (u64)hb > size || (u64)off > size - (u64)hb) return en;
  en.base = reinterpret_cast<const u8*>(ptr) + off;
  const i64 b = dst / a.out_h, h = dst - b * a.out_h;
  en.k = reinterpret_cast<u16*>(a.k_out) + b * a.sk_b + h * a.sk_h + n0 * a.sk_n;
  en.v = reinterpret_cast<u16*>(a.v_out) + b * a.sv_b + h * a.sv_h + n0 * a.sv_n;
  en.ok = true;
  return en;
}

// Lane j < 5 loads field j of the table row of `item`'s entry: issued one item ahead, so a warp
// never waits on the table before its data loads.
__device__ __forceinline__ i64 fetch_row(const GatherArgs& a, i64 item, i64 total, int lane) {
  if (item >= total || lane >= 5) return 0;
  const i64* row = reinterpret_cast<const i64*>(a.table) + (item / a.parts) * 5;
  return row[lane];
}

__device__ __forceinline__ i64 shfl_i64(i64 v, int src);

__device__ __forceinline__ Entry row_entry(const GatherArgs& a, i64 field, int fmt) {
  return make_entry(a, shfl_i64(field, 0), shfl_i64(field, 1), shfl_i64(field, 2), shfl_i64(field, 3),
                    shfl_i64(field, 4), fmt);
}

// Token range [t0, t1) of part `part` of an entry of n tokens, split in whole tiles.
__device__ __forceinline__ void part_tiles(i64 n, i64 tile, i64 parts, i64 part, i64& tile0, i64& tile1) {
  const i64 nt = (n + tile - 1) / tile;
  tile0 = nt * part / parts;
  tile1 = nt * (part + 1) / parts;
}

// ---------------------------------------------------------------------------------------------
// Gather work division. The unit of work is a warp-sized item: one part (a run of whole tiles) of
// one table entry. Warps are persistent: each walks items blockIdx * WARPS + warp, + grid * WARPS,
// ... with no block-wide barrier, so a warp waiting on its loads (HBM, or PCIe for host chunks)
// never holds up another, and many items are in flight per SM.
//
// Inside an item a lane handles 8 channels (one 16-byte output store) of a token row at a time.
// For head_dim <= 256 the warp covers 32 / (head_dim / 8) rows per step with a fixed column per
// lane; wider heads walk a flat index over (row, column).
// ---------------------------------------------------------------------------------------------
#define TIERKV_WARPS (TIERKV_THREADS / 32)

struct LaneMap {
  int upr;    // 8-channel units per row
  int rows;   // rows per warp step (row mapping)
  int ro;     // this lane's row in the step
  int col;    // this lane's column (row mapping)
  bool flat;  // wide heads: flat index instead
};

__device__ __forceinline__ LaneMap lane_map(int d, int lane) {
  LaneMap m;
  m.upr = d / 8;
  m.flat = m.upr > 32;
  m.rows = m.flat ? 1 : 32 / m.upr;
  m.ro = m.flat ? 0 : lane / m.upr;
  m.col = m.flat ? lane : lane - m.ro * m.upr;
  return m;
}

// Units this lane handles among `rows_total` rows, and the (row, column) of its k-th.
template <bool FLAT>
__device__ __forceinline__ int lane_units(const LaneMap& m, int lane, int rows_total) {
  if (FLAT) {
    const int tu = rows_total * m.upr;
    return lane < tu ? (tu - lane + 31) / 32 : 0;
  }
  return m.ro < m.rows && m.ro < rows_total ? (rows_total - m.ro + m.rows - 1) / m.rows : 0;
}

template <bool FLAT>
__device__ __forceinline__ void lane_unit(const LaneMap& m, int lane, int k, int& r, int& c) {
  if (FLAT) {
    const int u = lane + 32 * k;
    r = u / m.upr;
    c = u - r * m.upr;
  } else {
    r = m.ro + k * m.rows;
    c = m.col;
  }
}

__device__ __forceinline__ u32 shfl_u32(u32 v, int src) {
  u32 r;
  asm volatile("shfl.sync.idx.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=r"(r) : "r"(v), "r"(src));
  return r;
}

__device__ __forceinline__ i64 shfl_i64(i64 v, int src) {
  const u32 lo = shfl_u32((u32)((u64)v & 0xffffffffu), src);
  const u32 hi = shfl_u32((u32)((u64)v >> 32), src);
  return (i64)(((u64)hi << 32) | lo);
}

__device__ __forceinline__ void syncwarp() { asm volatile("bar.warp.sync 0xffffffff;" ::: "memory"); }

// ---------------------------------------------------------------------------------------------
// Gather, raw formats: 16-byte loads straight from the source (device or host) into registers,
// U per lane in flight, converted if the output type differs, stored as 16 bytes.
// ---------------------------------------------------------------------------------------------
template <int SRC, int OUT>
__device__ __forceinline__ uint4 convert8(uint4 x) {
  if (SRC == OUT) return x;
  const u32 w[4] = {x.x, x.y, x.z, x.w};
  u32 r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = pack2<OUT>(half_to_f32<SRC>(w[i]), half_to_f32<SRC>(w[i] >> 16));
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// Dense outputs (rows of D contiguous): the part's K and V are each one contiguous run in the
// source and in the output, moved as flat 16-byte pieces, a warp 512 bytes per step; each lane
// keeps 4 K and 4 V pieces in flight, addressed as fixed offsets from one pointer each.
template <int SRC, int OUT>
__device__ __forceinline__ void raw_item_dense(const GatherArgs& a, const Entry& en, int lane, i64 t0, int np) {
  const i64 row_bytes = a.head_dim * 2;
  const u8* ks = en.base + t0 * row_bytes + lane * 16;
  const u8* vs = en.base + (en.n + t0) * row_bytes + lane * 16;
  u16* kd = en.k + t0 * a.sk_n + lane * 8;
  u16* vd = en.v + t0 * a.sv_n + lane * 8;
  const int pieces = (int)((i64)np * row_bytes / 16);  // per K (and per V)
  const int mine = lane < pieces ? (pieces - lane + 31) / 32 : 0;
  const int U = 4;
  for (int k0 = 0; k0 < mine; k0 += U) {
    uint4 xk[U], xv[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (k0 + j < mine) {
        xk[j] = ld16(ks + (i64)(k0 + j) * 512);
        xv[j] = ld16(vs + (i64)(k0 + j) * 512);
      }
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (k0 + j < mine) {
        st16(kd + (i64)(k0 + j) * 256, convert8<SRC, OUT>(xk[j]), true);
        st16(vd + (i64)(k0 + j) * 256, convert8<SRC, OUT>(xv[j]), true);
      }
    }
  }
}

// Any output strides: a lane moves 8 channels of a token row at a time (row mapping or flat index).
template <int SRC, int OUT, bool FAST, bool FLAT>
__device__ __forceinline__ void raw_item(const GatherArgs& a, const Entry& en, const LaneMap& m, int lane, i64 t0,
                                         int np) {
  const i64 row_bytes = a.head_dim * 2;
  const u8* ksrc = en.base + t0 * row_bytes;
  const u8* vsrc = ksrc + en.n * row_bytes;
  u16* kdst = en.k + t0 * a.sk_n;
  u16* vdst = en.v + t0 * a.sv_n;
  const int count = lane_units<FLAT>(m, lane, 2 * np);
  const int U = 4;
  for (int k0 = 0; k0 < count; k0 += U) {
    uint4 x[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (k0 + j < count) {
        int r, c;
        lane_unit<FLAT>(m, lane, k0 + j, r, c);
        const bool isv = r >= np;
        const int t = isv ? r - np : r;
        const u8* p = (isv ? vsrc : ksrc) + t * row_bytes + c * 16;
        x[j] = FAST ? ld16(p) : ld16_bytes(p);
      }
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (k0 + j < count) {
        int r, c;
        lane_unit<FLAT>(m, lane, k0 + j, r, c);
        const bool isv = r >= np;
        const int t = isv ? r - np : r;
        u16* q = (isv ? vdst + t * a.sv_n : kdst + t * a.sk_n) + c * 8;
        st16(q, convert8<SRC, OUT>(x[j]), FAST);
      }
    }
  }
}

template <int SRC, int OUT>
__global__ void __launch_bounds__(TIERKV_THREADS, 3) gather_raw(const __grid_constant__ GatherArgs a) {
  const int lane = threadIdx.x & 31;
  const LaneMap m = lane_map((int)a.head_dim, lane);
  const bool dense = a.sk_n == a.head_dim && a.sv_n == a.head_dim;
  const i64 total = a.n_entries * a.parts;
  const i64 stride = (i64)gridDim.x * TIERKV_WARPS;
  i64 item = (i64)blockIdx.x * TIERKV_WARPS + (threadIdx.x >> 5);
  i64 field = fetch_row(a, item, total, lane);
  for (; item < total; item += stride) {
    const Entry en = row_entry(a, field, SRC == DT_BF16 ? FMT_BF16 : FMT_FP16);
    field = fetch_row(a, item + stride, total, lane);
    if (!en.ok) continue;
    const i64 part = item - (item / a.parts) * a.parts;
    i64 tile0, tile1;
    part_tiles(en.n, a.tile_tokens, a.parts, part, tile0, tile1);
    const i64 t0 = tile0 * a.tile_tokens;
    const i64 t1 = tile1 * a.tile_tokens < en.n ? tile1 * a.tile_tokens : en.n;
    if (t0 >= t1) continue;
    const int np = (int)(t1 - t0);
    if (a.out_vec && ((reinterpret_cast<u64>(en.base) & 15) == 0)) {
      if (dense) raw_item_dense<SRC, OUT>(a, en, lane, t0, np);
      else if (m.flat) raw_item<SRC, OUT, true, true>(a, en, m, lane, t0, np);
      else raw_item<SRC, OUT, true, false>(a, en, m, lane, t0, np);
    } else {
      raw_item<SRC, OUT, false, true>(a, en, m, lane, t0, np);  // the slow path needs no fast indexing
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gather, integer formats. Each warp stages a tile of its item (codes and scales of TT tokens: four
// 16-byte aligned segments of the head block) into its own slice of shared memory with coalesced
// 16-byte loads, then decodes it there: a lane turns the codes of 8 channels into one 16-byte store.
// Wide reads suit PCIe (host sources) and HBM alike, and the decode pattern is free of the load
// pattern. The K scale and zero of the item are converted to float once, into shared memory.
// ---------------------------------------------------------------------------------------------
struct Segments {
  const u8* base;              // head block
  int src0, src1, src2, src3;  // segment offsets in the head block
  int end0, end1, end2, end3;  // cumulative sizes (multiples of 16)
  int at1, at2, at3;           // destination offsets of segments 1..3 (segment 0 at 0)
};

__device__ __forceinline__ void seg_locate(const Segments& s, int i, const u8*& src, int& dst) {
  // segment of flat byte i: select chains, no indexed arrays (they would go to local memory)
  int o;
  if (i < s.end0) { o = s.src0 + i; dst = i; }
  else if (i < s.end1) { o = s.src1 + (i - s.end0); dst = s.at1 + (i - s.end0); }
  else if (i < s.end2) { o = s.src2 + (i - s.end1); dst = s.at2 + (i - s.end1); }
  else { o = s.src3 + (i - s.end2); dst = s.at3 + (i - s.end2); }
  src = s.base + o;
}

// Copies the segments into shared memory: asynchronous 16-byte copies when the head block is
// aligned (completion awaited with cp_async_wait), plain byte copies otherwise.
template <bool FAST>
__device__ __forceinline__ void stage_tile(u8* smem_dst, const Segments& s, int lane) {
  if (FAST) {
    for (int i = lane * 16; i < s.end3; i += 32 * 16) {
      const u8* src;
      int dst;
      seg_locate(s, i, src, dst);
      cp_async16(smem_dst + dst, src);
    }
  } else {
    for (int i = lane; i < s.end3; i += 32) {
      const u8* src;
      int dst;
      seg_locate(s, i, src, dst);
      smem_dst[dst] = *src;
    }
  }
}

template <int BITS>
__device__ __forceinline__ float code_at(u32 lo, u32 hi, int j) {
  // channel j (0..7) of 8 channels whose codes are in lo (and hi for 8-bit codes)
  if (BITS == 8) return (float)(((j < 4 ? lo : hi) >> (8 * (j & 3))) & 0xffu);
  return (float)((lo >> (BITS * j)) & ((1u << BITS) - 1u));
}

template <int BITS>
__device__ __forceinline__ void smem_codes(const u8* p, u32& lo, u32& hi) {
  // 8 channels of codes: BITS bytes, aligned to BITS
  if (BITS == 8) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    lo = w.x;
    hi = w.y;
  } else if (BITS == 4) {
    lo = *reinterpret_cast<const u32*>(p);
    hi = 0;
  } else {
    lo = *reinterpret_cast<const u16*>(p);
    hi = 0;
  }
}

template <int BITS, int OUT>
__device__ __forceinline__ uint4 dequant8(u32 lo, u32 hi, const float s[8], const float z[8]) {
  float y[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) y[j] = __fadd_rn(__fmul_rn(code_at<BITS>(lo, hi, j), s[j]), z[j]);
  return make_uint4(pack2<OUT>(y[0], y[1]), pack2<OUT>(y[2], y[3]), pack2<OUT>(y[4], y[5]), pack2<OUT>(y[6], y[7]));
}

// dequant8 with one scale and zero for all 8 channels (a value group of at least 8 channels): the same
// arithmetic, value for value.
template <int BITS, int OUT>
__device__ __forceinline__ uint4 dequant8s(u32 lo, u32 hi, float s, float z) {
  float y[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) y[j] = __fadd_rn(__fmul_rn(code_at<BITS>(lo, hi, j), s), z);
  return make_uint4(pack2<OUT>(y[0], y[1]), pack2<OUT>(y[2], y[3]), pack2<OUT>(y[4], y[5]), pack2<OUT>(y[6], y[7]));
}

// Segments of tile `tile` (TT tokens from token tile * TT) of a head block.
__device__ __forceinline__ Segments tile_segments(const Segments& proto, const IntLayout& L, int n, int TT, int R, int ng,
                                                  int tile) {
  Segments seg = proto;
  const int ta = tile * TT;
  const int tn = n - ta < TT ? n - ta : TT;
  const int cb = (int)pad16((i64)tn * R), sb = (int)pad16((i64)tn * ng * 2);
  seg.src0 = (int)L.kc + ta * R;
  seg.src1 = (int)L.vc + ta * R;
  seg.src2 = (int)L.vs + ta * ng * 2;
  seg.src3 = (int)L.vz + ta * ng * 2;
  seg.end0 = cb;
  seg.end1 = 2 * cb;
  seg.end2 = 2 * cb + sb;
  seg.end3 = 2 * cb + 2 * sb;
  return seg;
}

template <int BITS, int OUT, bool FAST, bool FLAT>
__device__ __forceinline__ void int_item(const GatherArgs& a, const Entry& en, const LaneMap& m, int lane, i64 part,
                                         u8* wsm) {
  const int TT = (int)a.tile_tokens;
  i64 tile0l, tile1l;
  part_tiles(en.n, TT, a.parts, part, tile0l, tile1l);
  const int tile0 = (int)tile0l, tile1 = (int)tile1l;
  if (tile0 >= tile1) return;
  const int d = (int)a.head_dim;
  const int g = (int)a.group;
  const int ng = d / g;
  const int R = d * BITS / 8;  // code bytes of one token row
  const int n = (int)en.n;
  const IntLayout L = int_layout(en.n, d, BITS, ng);
  const bool vec = a.out_vec != 0;
  const bool one_group = (g % 8) == 0;  // a lane's 8 channels share one value group

  // two tile buffers: K codes [TT][R], V codes [TT][R], V scale [TT][ng], V zero [TT][ng]
  const int tile_bytes = TT * (2 * R + 4 * ng);
  u8* const tb0 = wsm + 8 * d;
  Segments proto;
  proto.base = en.base;
  proto.at1 = TT * R;
  proto.at2 = 2 * TT * R;
  proto.at3 = 2 * TT * R + TT * ng * 2;

  // the first tile's copies and the K scale/zero loads go out together
  stage_tile<FAST>(tb0, tile_segments(proto, L, n, TT, R, ng, tile0), lane);
  cp_async_commit();
  float* kf = reinterpret_cast<float*>(wsm);  // K scale [d] then zero [d], as floats
  for (int i = lane; i < m.upr; i += 32) {
    const u8* ps = en.base + L.ks + i * 16;
    const uint4 sv = FAST ? ld16(ps) : ld16_bytes(ps);
    const uint4 zv = FAST ? ld16(ps + 2 * d) : ld16_bytes(ps + 2 * d);
    float4* ks = reinterpret_cast<float4*>(kf + i * 8);
    float4* kz = reinterpret_cast<float4*>(kf + d + i * 8);
    ks[0] = make_float4(f16_to_f32(sv.x), f16_to_f32(sv.x >> 16), f16_to_f32(sv.y), f16_to_f32(sv.y >> 16));
    ks[1] = make_float4(f16_to_f32(sv.z), f16_to_f32(sv.z >> 16), f16_to_f32(sv.w), f16_to_f32(sv.w >> 16));
    kz[0] = make_float4(f16_to_f32(zv.x), f16_to_f32(zv.x >> 16), f16_to_f32(zv.y), f16_to_f32(zv.y >> 16));
    kz[1] = make_float4(f16_to_f32(zv.z), f16_to_f32(zv.z >> 16), f16_to_f32(zv.w), f16_to_f32(zv.w >> 16));
  }

  for (int tile = tile0; tile < tile1; ++tile) {
    const u8* tb = tb0 + ((tile - tile0) & 1) * tile_bytes;
    if (tile + 1 < tile1) {  // the next tile's copies are in flight while this one is decoded
      stage_tile<FAST>(tb0 + ((tile + 1 - tile0) & 1) * tile_bytes, tile_segments(proto, L, n, TT, R, ng, tile + 1),
                       lane);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    syncwarp();  // this tile (and the K scales) are in shared memory for every lane
    const u8* kc = tb;
    const u8* vc = tb + TT * R;
    const u16* vs = reinterpret_cast<const u16*>(tb + 2 * TT * R);
    const u16* vz = reinterpret_cast<const u16*>(tb + 2 * TT * R + TT * ng * 2);
    const int ta = tile * TT;
    const int tn = n - ta < TT ? n - ta : TT;
    u16* kdst = en.k + (i64)ta * a.sk_n;
    u16* vdst = en.v + (i64)ta * a.sv_n;
    if (!FLAT && one_group) {
      // Row mapping (head_dim <= 256): the lane's column is fixed, so K rows and V rows run in loops of
      // their own, with the column's value group found once: no K-or-V branch, no integer division
      // and no scale copies per 16-byte store (the generic loop below spends most of its instructions
      // there). The lane takes the same rows of V as of K.
      if (m.ro < m.rows) {
        const int c = m.col;
        const int cstep = m.rows * R;  // code bytes from one of this lane's rows to the next
        {
          // the column's K scales and zeros, read from shared memory once per tile (the stores' memory
          // clobber would make the compiler read them again for every row)
          const float4 s0 = reinterpret_cast<const float4*>(kf + c * 8)[0];
          const float4 s1 = reinterpret_cast<const float4*>(kf + c * 8)[1];
          const float4 z0 = reinterpret_cast<const float4*>(kf + d + c * 8)[0];
          const float4 z1 = reinterpret_cast<const float4*>(kf + d + c * 8)[1];
          const float sk[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
          const float zk[8] = {z0.x, z0.y, z0.z, z0.w, z1.x, z1.y, z1.z, z1.w};
          const u8* src = kc + m.ro * R + c * BITS;
          u16* dst = kdst + (i64)m.ro * a.sk_n + c * 8;
          const i64 dstep = (i64)m.rows * a.sk_n;
          TIERKV_ROW_LOOP
          for (int t = m.ro; t < tn; t += m.rows, src += cstep, dst += dstep) {
            u32 lo, hi;
            smem_codes<BITS>(src, lo, hi);
            st16(dst, dequant8<BITS, OUT>(lo, hi, sk, zk), vec);
          }
        }
        const u8* src = vc + m.ro * R + c * BITS;
        u16* dst = vdst + (i64)m.ro * a.sv_n + c * 8;
        const i64 dstep = (i64)m.rows * a.sv_n;
        int gi = m.ro * ng + (c * 8) / g;  // the value group of this lane's 8 channels in its row
        const int gstep = m.rows * ng;
        TIERKV_ROW_LOOP
        for (int t = m.ro; t < tn; t += m.rows, src += cstep, dst += dstep, gi += gstep) {
          u32 lo, hi;
          smem_codes<BITS>(src, lo, hi);
          st16(dst, dequant8s<BITS, OUT>(lo, hi, f16_to_f32(vs[gi]), f16_to_f32(vz[gi])), vec);
        }
      }
      syncwarp();  // decoded: the buffer may be overwritten (next tile, or the next item)
      continue;
    }
    const int count = lane_units<FLAT>(m, lane, 2 * tn);
    for (int k = 0; k < count; ++k) {
      int r, c;
      lane_unit<FLAT>(m, lane, k, r, c);
      const bool isv = r >= tn;
      const int t = isv ? r - tn : r;
      u32 lo, hi;
      smem_codes<BITS>((isv ? vc : kc) + t * R + c * BITS, lo, hi);
      float s[8], z[8];
      if (!isv) {
        const float4 s0 = reinterpret_cast<const float4*>(kf + c * 8)[0];
        const float4 s1 = reinterpret_cast<const float4*>(kf + c * 8)[1];
        const float4 z0 = reinterpret_cast<const float4*>(kf + d + c * 8)[0];
        const float4 z1 = reinterpret_cast<const float4*>(kf + d + c * 8)[1];
        s[0] = s0.x; s[1] = s0.y; s[2] = s0.z; s[3] = s0.w; s[4] = s1.x; s[5] = s1.y; s[6] = s1.z; s[7] = s1.w;
        z[0] = z0.x; z[1] = z0.y; z[2] = z0.z; z[3] = z0.w; z[4] = z1.x; z[5] = z1.y; z[6] = z1.z; z[7] = z1.w;
      } else if (one_group) {
        const int gi = t * ng + (c * 8) / g;
        const float s0 = f16_to_f32(vs[gi]), z0 = f16_to_f32(vz[gi]);
#pragma unroll
        for (int j = 0; j < 8; ++j) { s[j] = s0; z[j] = z0; }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int gi = t * ng + (c * 8 + j) / g;
          s[j] = f16_to_f32(vs[gi]);
          z[j] = f16_to_f32(vz[gi]);
        }
      }
      st16((isv ? vdst + (i64)t * a.sv_n : kdst + (i64)t * a.sk_n) + c * 8, dequant8<BITS, OUT>(lo, hi, s, z), vec);
    }
    syncwarp();  // decoded: the buffer may be overwritten (next tile, or the next item)
  }
}

template <int BITS, int OUT>
__global__ void __launch_bounds__(TIERKV_THREADS, 3) gather_int(const __grid_constant__ GatherArgs a) {
  extern __shared__ uint4 smem4[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int d = (int)a.head_dim;
  const LaneMap m = lane_map(d, lane);
  u8* wsm = reinterpret_cast<u8*>(smem4) + warp * gather_warp_smem_bytes(BITS, d, d / a.group, a.tile_tokens);
  const i64 total = a.n_entries * a.parts;
  const i64 stride = (i64)gridDim.x * TIERKV_WARPS;
  i64 item = (i64)blockIdx.x * TIERKV_WARPS + warp;
  i64 field = fetch_row(a, item, total, lane);
  for (; item < total; item += stride) {
    const Entry en = row_entry(a, field, BITS);
    field = fetch_row(a, item + stride, total, lane);
    if (!en.ok) continue;
    const i64 part = item - (item / a.parts) * a.parts;
    if ((reinterpret_cast<u64>(en.base) & 15) == 0) {
      if (m.flat) int_item<BITS, OUT, true, true>(a, en, m, lane, part, wsm);
      else int_item<BITS, OUT, true, false>(a, en, m, lane, part, wsm);
    } else {
      int_item<BITS, OUT, false, true>(a, en, m, lane, part, wsm);  // the slow path needs no fast indexing
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Ingest: one block per (sequence, chunk, KV head) head block. K is read for its per-channel
// min/max (the abstract, and the KIVI key scales), then K and V are quantized tile by tile; value
// groups' scales are computed into shared memory first. Raw formats convert and copy in the same
// pass as the min/max.
// ---------------------------------------------------------------------------------------------
template <int IN>
__device__ __forceinline__ void load8(const void* p, bool vec, float x[8]) {
  if (IN == DT_FP32) {
    const float* f = reinterpret_cast<const float*>(p);
    if (vec) {
      const float4 a = *reinterpret_cast<const float4*>(f);
      const float4 b = *reinterpret_cast<const float4*>(f + 4);
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = f[j];
    }
  } else {
    const u16* h = reinterpret_cast<const u16*>(p);
    if (vec) {
      const uint4 w = *reinterpret_cast<const uint4*>(h);
      const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        x[2 * i] = half_to_f32<IN>(ws[i]);
        x[2 * i + 1] = half_to_f32<IN>(ws[i] >> 16);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = half_to_f32<IN>(h[j]);
    }
  }
}

template <int IN>
__device__ __forceinline__ float load1(const void* p, i64 i) {
  if (IN == DT_FP32) return reinterpret_cast<const float*>(p)[i];
  return half_to_f32<IN>(reinterpret_cast<const u16*>(p)[i]);
}

// torch.amin / amax propagate NaN; so do these.
__device__ __forceinline__ float min_nan(float a, float b) { return (b < a || b != b) ? b : a; }
__device__ __forceinline__ float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// scale = fp16(min((hi - lo) / q, 65504)), zero = fp16(clamp(lo, -65504, 65504)); comparisons
// written so NaN passes through as torch.clamp lets it.
__device__ __forceinline__ void quant_params(float lo, float hi, float q, u32& s16, u32& z16) {
  float s = __fdiv_rn(__fsub_rn(hi, lo), q);
  s = s > 65504.0f ? 65504.0f : s;
  float z = lo < -65504.0f ? -65504.0f : lo;
  z = z > 65504.0f ? 65504.0f : z;
  s16 = f32_to_f16(s);
  z16 = f32_to_f16(z);
}

// code = clamp(round_half_even((x - zero) / scale), 0, q), 0 where scale == 0 (s, z already fp16-rounded)
__device__ __forceinline__ u32 quant_code(float x, float s, float z, float q) {
  if (!(s > 0.0f)) return 0u;
  float c = rintf(__fdiv_rn(__fsub_rn(x, z), s));
  c = fminf(fmaxf(c, 0.0f), q);
  return (u32)c;
}

template <int IN>
__device__ __forceinline__ void store_abstract(void* base, i64 i, float f) {
  if (IN == DT_FP32) reinterpret_cast<float*>(base)[i] = f;
  else reinterpret_cast<u16*>(base)[i] = (u16)f32_to_half<IN>(f);
}

template <int IN, int FMT>
__global__ void __launch_bounds__(TIERKV_THREADS) ingest(const __grid_constant__ IngestArgs a) {
  extern __shared__ uint4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int d = (int)a.d;
  const int L = (int)a.chunk;
  const int upr = d / 8;
  const int rows = TIERKV_THREADS / upr;
  const int ro = threadIdx.x / upr;
  const int col = threadIdx.x - ro * upr;
  const bool active = ro < rows;
  const bool vec = a.in_vec != 0;
  const int es = IN == DT_FP32 ? 4 : 2;

  const i64 blk = blockIdx.x;  // ((b * C) + c) * H + h
  const i64 h = blk % a.h;
  const i64 c = (blk / a.h) % a.c;
  const i64 b = blk / (a.h * a.c);
  const u8* kin = reinterpret_cast<const u8*>(a.k) + (b * a.sk_b + h * a.sk_h + c * L * a.sk_t) * es;
  const u8* vin = reinterpret_cast<const u8*>(a.v) + (b * a.sv_b + h * a.sv_h + c * L * a.sv_t) * es;
  u8* out = reinterpret_cast<u8*>(a.packed) + blk * a.head_bytes;
  u8* abs_out = reinterpret_cast<u8*>(a.abstracts) + blk * 2 * d * es;

  float* red_min = smem;                  // [rows][d]
  float* red_max = smem + rows * d;       // [rows][d]
  float* kf = smem + 2 * rows * d;        // K scale [d], zero [d] as floats
  float* vf = kf + 2 * d;                 // V scale [v_tile * ng], zero [v_tile * ng]

  // pass 1: per-channel min/max of K (and, for raw formats, the converted copy of K and V)
  float mn[8], mx[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) { mn[j] = __int_as_float(0x7f800000); mx[j] = -__int_as_float(0x7f800000); }
  if (active) {
    for (int t = ro; t < L; t += rows) {
      float x[8];
      load8<IN>(kin + ((i64)t * a.sk_t + col * 8) * es, vec, x);
#pragma unroll
      for (int j = 0; j < 8; ++j) { mn[j] = min_nan(mn[j], x[j]); mx[j] = max_nan(mx[j], x[j]); }
      if (FMT == FMT_BF16 || FMT == FMT_FP16) {
        const int DT = FMT == FMT_BF16 ? DT_BF16 : DT_FP16;
        const uint4 o = make_uint4(pack2<DT>(x[0], x[1]), pack2<DT>(x[2], x[3]), pack2<DT>(x[4], x[5]),
                                   pack2<DT>(x[6], x[7]));
        *reinterpret_cast<uint4*>(out + (i64)t * d * 2 + col * 16) = o;
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      red_min[ro * d + col * 8 + j] = mn[j];
      red_max[ro * d + col * 8 + j] = mx[j];
    }
    if (FMT == FMT_BF16 || FMT == FMT_FP16) {
      const int DT = FMT == FMT_BF16 ? DT_BF16 : DT_FP16;
      for (int t = ro; t < L; t += rows) {
        float x[8];
        load8<IN>(vin + ((i64)t * a.sv_t + col * 8) * es, vec, x);
        const uint4 o = make_uint4(pack2<DT>(x[0], x[1]), pack2<DT>(x[2], x[3]), pack2<DT>(x[4], x[5]),
                                   pack2<DT>(x[6], x[7]));
        *reinterpret_cast<uint4*>(out + (i64)L * d * 2 + (i64)t * d * 2 + col * 16) = o;
      }
    }
  }
  __syncthreads();

  const int rows_used = rows < L ? rows : L;  // rows >= L never wrote partials
  const float q = (float)((1 << (FMT == FMT_BF16 || FMT == FMT_FP16 ? 1 : FMT)) - 1);
  IntLayout lay = int_layout(L, d, FMT, d / (int)a.group);
  for (int ch = threadIdx.x; ch < d; ch += TIERKV_THREADS) {
    float lo = red_min[ch], hi = red_max[ch];
    for (int r = 1; r < rows_used; ++r) {
      lo = min_nan(lo, red_min[r * d + ch]);
      hi = max_nan(hi, red_max[r * d + ch]);
    }
    store_abstract<IN>(abs_out, ch, lo);
    store_abstract<IN>(abs_out, d + ch, hi);
    if (FMT != FMT_BF16 && FMT != FMT_FP16) {
      u32 s16, z16;
      quant_params(lo, hi, q, s16, z16);
      reinterpret_cast<u16*>(out + lay.ks)[ch] = (u16)s16;
      reinterpret_cast<u16*>(out + lay.kz)[ch] = (u16)z16;
      kf[ch] = f16_to_f32(s16);
      kf[d + ch] = f16_to_f32(z16);
    }
  }
  if (FMT == FMT_BF16 || FMT == FMT_FP16) return;  // raw head blocks have no padding

  const int BITS = FMT;
  const int g = (int)a.group;
  const int ng = d / g;
  const int R = d * BITS / 8;
  // zero the padding after each section that does not end on 16 bytes
  {
    const i64 codes = (i64)L * R, vsz = (i64)L * ng * 2;
    const int pc = (int)(pad16(codes) - codes), pv = (int)(pad16(vsz) - vsz);
    const int tid = threadIdx.x;
    if (tid < pc) { out[lay.kc + codes + tid] = 0; out[lay.vc + codes + tid] = 0; }
    if (tid < pv) { out[lay.vs + vsz + tid] = 0; out[lay.vz + vsz + tid] = 0; }
  }
  const int VT = (int)a.v_tile;
  const bool one_group = (g % 8) == 0;
  for (int t0 = 0; t0 < L; t0 += VT) {
    const int tn = L - t0 < VT ? L - t0 : VT;
    __syncthreads();  // K scales visible (first tile); previous tile's V scales no longer read
    // value groups of this tile: min/max over g channels of one token
    for (int it = threadIdx.x; it < tn * ng; it += TIERKV_THREADS) {
      const int t = it / ng, gi = it - t * ng;
      const u8* p = vin + ((i64)(t0 + t) * a.sv_t + (i64)gi * g) * es;
      float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000);
      if (one_group && vec) {
        for (int j = 0; j < g; j += 8) {
          float x[8];
          load8<IN>(p + (i64)j * es, true, x);
#pragma unroll
          for (int k = 0; k < 8; ++k) { lo = min_nan(lo, x[k]); hi = max_nan(hi, x[k]); }
        }
      } else {
        for (int j = 0; j < g; ++j) {
          const float x = load1<IN>(p, j);
          lo = min_nan(lo, x);
          hi = max_nan(hi, x);
        }
      }
      u32 s16, z16;
      quant_params(lo, hi, q, s16, z16);
      reinterpret_cast<u16*>(out + lay.vs)[(i64)(t0 + t) * ng + gi] = (u16)s16;
      reinterpret_cast<u16*>(out + lay.vz)[(i64)(t0 + t) * ng + gi] = (u16)z16;
      vf[it] = f16_to_f32(s16);
      vf[VT * ng + it] = f16_to_f32(z16);
    }
    __syncthreads();
    if (active) {
      for (int r = ro; r < 2 * tn; r += rows) {
        const bool isv = r >= tn;
        const int t = isv ? r - tn : r;
        float x[8], s[8], z[8];
        if (isv) {
          load8<IN>(vin + ((i64)(t0 + t) * a.sv_t + col * 8) * es, vec, x);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int gi = t * ng + (col * 8 + j) / g;
            s[j] = vf[gi];
            z[j] = vf[VT * ng + gi];
          }
        } else {
          load8<IN>(kin + ((i64)(t0 + t) * a.sk_t + col * 8) * es, vec, x);
#pragma unroll
          for (int j = 0; j < 8; ++j) { s[j] = kf[col * 8 + j]; z[j] = kf[d + col * 8 + j]; }
        }
        u32 lo = 0, hi = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const u32 cj = quant_code(x[j], s[j], z[j], q);
          if (BITS == 8) {
            if (j < 4) lo |= cj << (8 * j); else hi |= cj << (8 * (j - 4));
          } else {
            lo |= cj << (BITS * j);
          }
        }
        u8* dst = out + (isv ? lay.vc : lay.kc) + (i64)(t0 + t) * R + col * BITS;
        if (BITS == 8) *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
        else if (BITS == 4) *reinterpret_cast<u32*>(dst) = lo;
        else *reinterpret_cast<u16*>(dst) = (u16)lo;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Mass scoring: per (sequence, KV head, chunk, query row) the log of sum_t exp(q . k_t) over the
// chunk's keys as their 2-bit codes give them, k_t[d] = lo[d] + code[t][d] * (hi[d] - lo[d]) / 3
// (tierkv.abstracts.chunk_log_mass is the reference). One warp per (b * h, chunk): the warp first
// writes q[g][d] * w[d] (w = (hi - lo) / 3) for its chunk into its shared-memory slice and sums
// q[g] . lo; then each lane takes whole tokens (t = lane, lane + 32, ...), reads the token's codes
// a 32-bit word (16 channels) at a time and keeps a running log-sum-exp per query row; one shuffle
// reduction per chunk merges the lanes. q is float32 [B, H, G, D], already times the softmax scale.
// GT (1, 2, 4, 8) is G rounded up to a power of two; rows >= G are computed on zeros and not written.
// ---------------------------------------------------------------------------------------------
#define TIERKV_MASS_MAX_G 8
#define TIERKV_MASS_MAX_HEAD_DIM 256
#define TIERKV_MASS_WARPS 4

struct MassArgs {
  u64 q, ab, codes, out;        // q f32 [B,H,G,D]; ab [B,H,2D,cap] (min rows, then max rows); codes u8 [B,H,cap,L,D/4]; out f32 [B,H,G,C]
  i64 bh, g, d, c, l, cap;      // B*H, query rows per KV head, head dim, chunks scored, tokens per chunk, capacity
};

__host__ __device__ inline i64 mass_smem_bytes(i64 d, i64 gt) { return TIERKV_MASS_WARPS * d * gt * 4; }

template <int DT, int GT>
__global__ void __launch_bounds__(TIERKV_MASS_WARPS * 32) mass_logits(const __grid_constant__ MassArgs a) {
  extern __shared__ float mass_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 item = (i64)blockIdx.x * TIERKV_MASS_WARPS + warp;
  if (item >= a.bh * a.c) return;  // no block-wide barrier below: warps are independent
  const i64 bh = item / a.c, c = item - bh * a.c;
  const int G = (int)a.g, D = (int)a.d, NB = D / 4;
  float* qw = mass_smem + (i64)warp * D * GT;
  const float* q = reinterpret_cast<const float*>(a.q) + bh * G * D;
  const u16* ab = reinterpret_cast<const u16*>(a.ab) + bh * 2 * D * a.cap + c;
  float base[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) base[g] = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float lo = half_to_f32<DT>(ab[(i64)d * a.cap]);
    const float hi = half_to_f32<DT>(ab[(i64)(D + d) * a.cap]);
    const float w = (hi - lo) / 3.f;
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float qv = g < G ? q[g * D + d] : 0.f;
      qw[d * GT + g] = qv * w;
      base[g] = __fmaf_rn(qv, lo, base[g]);
    }
  }
#pragma unroll
  for (int g = 0; g < GT; ++g) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) base[g] += __shfl_xor_sync(0xffffffffu, base[g], o);
  }
  __syncwarp();
  float m[GT], s[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) { m[g] = -3.402823466e38f; s[g] = 0.f; }
  const u8* cp = reinterpret_cast<const u8*>(a.codes) + (bh * a.cap + c) * a.l * NB;
  const bool words = (NB % 4) == 0 && ((u64)cp % 4) == 0;
  for (i64 t = lane; t < a.l; t += 32) {
    const u8* tp = cp + t * NB;
    float acc[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) acc[g] = 0.f;
    for (int i0 = 0; i0 < NB; i0 += 4) {
      u32 v;
      if (words) {
        v = *reinterpret_cast<const u32*>(tp + i0);
      } else {
        v = 0;
        for (int b = 0; b < 4 && i0 + b < NB; ++b) v |= (u32)tp[i0 + b] << (8 * b);
      }
      const int kmax = min(16, 4 * (NB - i0));
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        if (k < kmax) {
          const float code = (float)((v >> (2 * k)) & 3u);
          const float* wq = qw + (4 * i0 + k) * GT;
#pragma unroll
          for (int g = 0; g < GT; ++g) acc[g] = __fmaf_rn(wq[g], code, acc[g]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float x = base[g] + acc[g];
      const float nm = fmaxf(m[g], x);
      s[g] = s[g] * __expf(m[g] - nm) + __expf(x - nm);
      m[g] = nm;
    }
  }
#pragma unroll
  for (int g = 0; g < GT; ++g) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], o), so = __shfl_xor_sync(0xffffffffu, s[g], o);
      const float nm = fmaxf(m[g], mo);
      s[g] = s[g] * __expf(m[g] - nm) + so * __expf(mo - nm);
      m[g] = nm;
    }
  }
  if (lane == 0) {
    float* out = reinterpret_cast<float*>(a.out) + bh * G * a.c + c;
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      if (g < G) out[(i64)g * a.c] = m[g] + __logf(s[g]);
    }
  }
}

}  // namespace tierkv

#endif  // TIERKV_KERNELS_CUH
