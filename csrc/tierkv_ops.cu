// torch bindings of the kernels in tierkv_kernels.cuh, registered as torch.ops.tierkv.* and launched
// on the current CUDA stream. tierkv/ops.py validates arguments and chooses the launch shape before
// it calls these; the checks here only guard memory safety against direct callers.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <vector>

#include "tierkv_kernels.cuh"

namespace {

using tierkv::i64;
using tierkv::u64;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return tierkv::DT_BF16;
    case at::kHalf: return tierkv::DT_FP16;
    case at::kFloat: return tierkv::DT_FP32;
    default: TORCH_CHECK(false, "tierkv: expected bfloat16, float16 or float32 tensors, got ", t);
  }
  return -1;
}

void check_fmt(i64 fmt) {
  TORCH_CHECK(fmt == tierkv::FMT_BF16 || fmt == tierkv::FMT_FP16 || fmt == tierkv::FMT_INT2 ||
                  fmt == tierkv::FMT_INT4 || fmt == tierkv::FMT_INT8,
              "tierkv: unknown format code ", fmt);
}

void check_dims(i64 head_dim, i64 group) {
  TORCH_CHECK(head_dim >= 8 && head_dim % 8 == 0 && head_dim <= TIERKV_MAX_HEAD_DIM,
              "tierkv: head_dim must be a multiple of 8 in [8, ", TIERKV_MAX_HEAD_DIM, "], got ", head_dim);
  TORCH_CHECK(group >= 1 && head_dim % group == 0, "tierkv: group ", group, " does not divide head_dim ", head_dim);
}

// Kernels with more than 48 KiB of dynamic shared memory must say so before launch.
template <typename K>
void allow_smem(K kernel, i64 smem) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
}

void gather(at::TensorList sources, const at::Tensor& table, int64_t fmt, int64_t head_dim, int64_t group,
            const at::Tensor& k_out, const at::Tensor& v_out, int64_t parts, int64_t tile_tokens, int64_t blocks) {
  check_fmt(fmt);
  check_dims(head_dim, group);
  TORCH_CHECK(k_out.is_cuda() && v_out.is_cuda() && table.is_cuda(), "tierkv.gather: k_out, v_out and table must be CUDA tensors");
  TORCH_CHECK(k_out.device() == v_out.device() && table.device() == k_out.device(), "tierkv.gather: tensors on different devices");
  TORCH_CHECK(k_out.dim() == 4 && k_out.sizes() == v_out.sizes() && k_out.size(3) == head_dim,
              "tierkv.gather: expected k_out and v_out [B, H, N, head_dim] of one shape");
  TORCH_CHECK(k_out.scalar_type() == v_out.scalar_type() &&
                  (k_out.scalar_type() == at::kBFloat16 || k_out.scalar_type() == at::kHalf),
              "tierkv.gather: outputs must both be bfloat16 or both float16");
  TORCH_CHECK(k_out.stride(3) == 1 && v_out.stride(3) == 1, "tierkv.gather: outputs need a contiguous last dimension");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 5 && table.is_contiguous(),
              "tierkv.gather: table must be a contiguous int64 [E, 5] tensor");
  TORCH_CHECK(parts >= 1 && tile_tokens >= 8 && tile_tokens % 8 == 0 && blocks >= 1 && blocks < 0x7fffffff,
              "tierkv.gather: bad launch shape");
  const i64 n_entries = table.size(0);
  const i64 n_sources = (i64)sources.size();
  if (n_entries == 0) return;
  TORCH_CHECK(n_entries * parts < (i64)0x7fffffff, "tierkv.gather: too many entries for one launch");
  c10::cuda::CUDAGuard guard(k_out.device());

  tierkv::GatherArgs a;
  memset(&a, 0, sizeof(a));
  std::vector<i64> extra_host;
  if (n_sources > TIERKV_MAX_SOURCES) extra_host.resize(2 * n_sources);
  for (i64 i = 0; i < n_sources; ++i) {
    const at::Tensor& s = sources[i];
    TORCH_CHECK(s.scalar_type() == at::kByte && s.dim() == 1 && s.is_contiguous(),
                "tierkv.gather: source ", i, " must be a contiguous 1-D uint8 tensor");
    TORCH_CHECK((s.is_cuda() && s.device() == k_out.device()) || (s.is_cpu() && s.is_pinned()),
                "tierkv.gather: source ", i, " must be on the output's device or in pinned host memory");
    const u64 ptr = (u64)s.data_ptr(), size = (u64)s.numel();
    if (i < TIERKV_MAX_SOURCES) {
      a.src_ptr[i] = ptr;
      a.src_size[i] = size;
    }
    if (!extra_host.empty()) {
      extra_host[i] = (i64)ptr;
      extra_host[n_sources + i] = (i64)size;
    }
  }
  at::Tensor extra;
  if (!extra_host.empty()) {
    at::Tensor pinned = at::empty({2 * n_sources}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    memcpy(pinned.data_ptr(), extra_host.data(), extra_host.size() * sizeof(i64));
    extra = pinned.to(k_out.device(), /*non_blocking=*/true);
    a.extra = (u64)extra.data_ptr();
  }
  a.table = (u64)table.data_ptr();
  a.k_out = (u64)k_out.data_ptr();
  a.v_out = (u64)v_out.data_ptr();
  a.n_entries = n_entries;
  a.n_sources = n_sources;
  a.out_b = k_out.size(0);
  a.out_h = k_out.size(1);
  a.out_n = k_out.size(2);
  a.sk_b = k_out.stride(0);
  a.sk_h = k_out.stride(1);
  a.sk_n = k_out.stride(2);
  a.sv_b = v_out.stride(0);
  a.sv_h = v_out.stride(1);
  a.sv_n = v_out.stride(2);
  a.head_dim = head_dim;
  a.group = group;
  a.parts = parts;
  a.tile_tokens = tile_tokens;
  auto vec_ok = [](const at::Tensor& t) {
    return ((u64)t.data_ptr() % 16 == 0) && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  };
  a.out_vec = (vec_ok(k_out) && vec_ok(v_out)) ? 1 : 0;

  const int out = dtype_code(k_out.scalar_type());
  const i64 smem = tierkv::gather_smem_bytes((int)fmt, head_dim, head_dim / group, tile_tokens);
  const dim3 grid((unsigned)blocks);  // persistent warps walk all n_entries * parts items
  const dim3 block(TIERKV_THREADS);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(k_out.device().index()).stream();

#define TIERKV_LAUNCH(KERNEL)                                  \
  do {                                                         \
    allow_smem(KERNEL, smem);                                  \
    KERNEL<<<grid, block, (size_t)smem, stream>>>(a);          \
  } while (0)

  if (fmt == tierkv::FMT_BF16 || fmt == tierkv::FMT_FP16) {
    const int src = fmt == tierkv::FMT_BF16 ? tierkv::DT_BF16 : tierkv::DT_FP16;
    if (src == tierkv::DT_BF16 && out == tierkv::DT_BF16) TIERKV_LAUNCH((tierkv::gather_raw<0, 0>));
    else if (src == tierkv::DT_BF16) TIERKV_LAUNCH((tierkv::gather_raw<0, 1>));
    else if (out == tierkv::DT_BF16) TIERKV_LAUNCH((tierkv::gather_raw<1, 0>));
    else TIERKV_LAUNCH((tierkv::gather_raw<1, 1>));
  } else if (out == tierkv::DT_BF16) {
    if (fmt == 8) TIERKV_LAUNCH((tierkv::gather_int<8, 0>));
    else if (fmt == 4) TIERKV_LAUNCH((tierkv::gather_int<4, 0>));
    else TIERKV_LAUNCH((tierkv::gather_int<2, 0>));
  } else {
    if (fmt == 8) TIERKV_LAUNCH((tierkv::gather_int<8, 1>));
    else if (fmt == 4) TIERKV_LAUNCH((tierkv::gather_int<4, 1>));
    else TIERKV_LAUNCH((tierkv::gather_int<2, 1>));
  }
#undef TIERKV_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ingest(const at::Tensor& k, const at::Tensor& v, int64_t chunk, int64_t fmt,
                                          int64_t group) {
  check_fmt(fmt);
  TORCH_CHECK(k.is_cuda() && v.is_cuda() && k.device() == v.device(), "tierkv.ingest: k and v must be on one CUDA device");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), "tierkv.ingest: expected k and v [B, H, T, D] of one shape");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "tierkv.ingest: k and v differ in dtype");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "tierkv.ingest: k and v need a contiguous last dimension");
  const i64 B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  const bool raw = fmt == tierkv::FMT_BF16 || fmt == tierkv::FMT_FP16;
  if (raw) group = D;
  check_dims(D, group);
  TORCH_CHECK(chunk >= 1 && T % chunk == 0, "tierkv.ingest: T=", T, " is not a multiple of chunk_len=", chunk);
  const int in = dtype_code(k.scalar_type());
  const i64 C = T / chunk;
  const i64 hb = tierkv::head_bytes((int)fmt, chunk, D, group);
  at::Tensor packed = at::empty({B, C, H * hb}, k.options().dtype(at::kByte));
  at::Tensor abstracts = at::empty({B, C, H, 2, D}, k.options());
  if (B * C * H == 0) return {packed, abstracts};
  TORCH_CHECK(B * C * H < (i64)0x7fffffff, "tierkv.ingest: too many chunks for one launch");
  c10::cuda::CUDAGuard guard(k.device());

  tierkv::IngestArgs a;
  memset(&a, 0, sizeof(a));
  a.k = (u64)k.data_ptr();
  a.v = (u64)v.data_ptr();
  a.packed = (u64)packed.data_ptr();
  a.abstracts = (u64)abstracts.data_ptr();
  a.b = B; a.h = H; a.t = T; a.d = D;
  a.chunk = chunk;
  a.c = C;
  a.group = group;
  a.sk_b = k.stride(0); a.sk_h = k.stride(1); a.sk_t = k.stride(2);
  a.sv_b = v.stride(0); a.sv_h = v.stride(1); a.sv_t = v.stride(2);
  a.head_bytes = hb;
  const i64 per16 = in == tierkv::DT_FP32 ? 4 : 8;  // elements per 16 bytes
  auto vec_ok = [per16](const at::Tensor& t) {
    return ((u64)t.data_ptr() % 16 == 0) && t.stride(0) % per16 == 0 && t.stride(1) % per16 == 0 &&
           t.stride(2) % per16 == 0;
  };
  a.in_vec = (vec_ok(k) && vec_ok(v)) ? 1 : 0;
  a.v_tile = tierkv::ingest_v_tile(chunk, D / group);
  const i64 smem = tierkv::ingest_smem_bytes(D, D / group, a.v_tile);
  const dim3 grid((unsigned)(B * C * H));
  const dim3 block(TIERKV_THREADS);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(k.device().index()).stream();

#define TIERKV_INGEST(IN)                                                                        \
  do {                                                                                           \
    switch (fmt) {                                                                               \
      case 0: allow_smem(tierkv::ingest<IN, 0>, smem); tierkv::ingest<IN, 0><<<grid, block, smem, stream>>>(a); break; \
      case 1: allow_smem(tierkv::ingest<IN, 1>, smem); tierkv::ingest<IN, 1><<<grid, block, smem, stream>>>(a); break; \
      case 2: allow_smem(tierkv::ingest<IN, 2>, smem); tierkv::ingest<IN, 2><<<grid, block, smem, stream>>>(a); break; \
      case 4: allow_smem(tierkv::ingest<IN, 4>, smem); tierkv::ingest<IN, 4><<<grid, block, smem, stream>>>(a); break; \
      default: allow_smem(tierkv::ingest<IN, 8>, smem); tierkv::ingest<IN, 8><<<grid, block, smem, stream>>>(a); break; \
    }                                                                                            \
  } while (0)

  if (in == tierkv::DT_BF16) TIERKV_INGEST(0);
  else if (in == tierkv::DT_FP16) TIERKV_INGEST(1);
  else TIERKV_INGEST(2);
#undef TIERKV_INGEST
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, abstracts};
}

// Benchmark baseline: one cudaMemcpyAsync per row of `copies` (int64 [M, 4] on the CPU: source
// index, source byte offset, bytes, destination byte offset) into `dst`, on the current stream.
void copy_chunks(at::TensorList sources, const at::Tensor& copies, const at::Tensor& dst) {
  TORCH_CHECK(dst.is_cuda() && dst.scalar_type() == at::kByte && dst.is_contiguous(), "tierkv.copy_chunks: dst must be contiguous CUDA uint8");
  TORCH_CHECK(copies.is_cpu() && copies.scalar_type() == at::kLong && copies.dim() == 2 && copies.size(1) == 4 &&
                  copies.is_contiguous(),
              "tierkv.copy_chunks: copies must be a contiguous CPU int64 [M, 4] tensor");
  c10::cuda::CUDAGuard guard(dst.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dst.device().index()).stream();
  const int64_t* c = copies.data_ptr<int64_t>();
  const i64 m = copies.size(0);
  for (i64 i = 0; i < m; ++i) {
    const i64 s = c[4 * i], off = c[4 * i + 1], nbytes = c[4 * i + 2], doff = c[4 * i + 3];
    TORCH_CHECK(s >= 0 && s < (i64)sources.size(), "tierkv.copy_chunks: bad source index");
    const at::Tensor& src = sources[s];
    TORCH_CHECK(off >= 0 && nbytes >= 0 && off + nbytes <= src.numel() && doff >= 0 && doff + nbytes <= dst.numel(),
                "tierkv.copy_chunks: copy ", i, " out of bounds");
    C10_CUDA_CHECK(cudaMemcpyAsync((char*)dst.data_ptr() + doff, (const char*)src.data_ptr() + off, (size_t)nbytes,
                                   cudaMemcpyDefault, stream));
  }
}

// Mass scoring (see tierkv_kernels.cuh): out [B, H, G, C] float32 from q [B, H, G, D] float32 (scaled),
// abstracts [B, H, 2D, cap] (bf16/fp16) and codes [B, H, cap, L, D/4] uint8, for the first C chunks.
at::Tensor mass_logits(const at::Tensor& q, const at::Tensor& abstracts, const at::Tensor& codes, int64_t n_chunks) {
  TORCH_CHECK(q.is_cuda() && abstracts.is_cuda() && codes.is_cuda() && q.device() == abstracts.device() &&
                  codes.device() == q.device(), "tierkv.mass_logits: tensors must be on one CUDA device");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 4 && q.is_contiguous(), "tierkv.mass_logits: q must be contiguous float32 [B, H, G, D]");
  TORCH_CHECK(abstracts.dim() == 4 && abstracts.is_contiguous() && (abstracts.scalar_type() == at::kBFloat16 || abstracts.scalar_type() == at::kHalf),
              "tierkv.mass_logits: abstracts must be contiguous bf16/fp16 [B, H, 2D, cap]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 5 && codes.is_contiguous(), "tierkv.mass_logits: codes must be contiguous uint8 [B, H, cap, L, D/4]");
  const i64 B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), cap = abstracts.size(3), L = codes.size(3);
  TORCH_CHECK(G >= 1 && G <= TIERKV_MASS_MAX_G, "tierkv.mass_logits: at most ", TIERKV_MASS_MAX_G, " query rows per KV head, got ", G);
  TORCH_CHECK(D % 4 == 0 && D >= 4 && D <= TIERKV_MASS_MAX_HEAD_DIM, "tierkv.mass_logits: head dim must be a multiple of 4 up to ", TIERKV_MASS_MAX_HEAD_DIM);
  TORCH_CHECK(abstracts.size(0) == B && abstracts.size(1) == H && abstracts.size(2) == 2 * D, "tierkv.mass_logits: abstracts do not match q");
  TORCH_CHECK(codes.size(0) == B && codes.size(1) == H && codes.size(2) == cap && codes.size(4) == D / 4, "tierkv.mass_logits: codes do not match abstracts");
  TORCH_CHECK(n_chunks >= 0 && n_chunks <= cap, "tierkv.mass_logits: n_chunks ", n_chunks, " outside [0, ", cap, "]");
  at::Tensor out = at::empty({B, H, G, n_chunks}, q.options());
  if (B * H * n_chunks == 0) return out;
  c10::cuda::CUDAGuard guard(q.device());
  tierkv::MassArgs a;
  a.q = (u64)q.data_ptr(); a.ab = (u64)abstracts.data_ptr(); a.codes = (u64)codes.data_ptr(); a.out = (u64)out.data_ptr();
  a.bh = B * H; a.g = G; a.d = D; a.c = n_chunks; a.l = L; a.cap = cap;
  const i64 items = B * H * n_chunks;
  const i64 gt = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
  const i64 smem = tierkv::mass_smem_bytes(D, gt);
  const dim3 grid((unsigned)((items + TIERKV_MASS_WARPS - 1) / TIERKV_MASS_WARPS));
  const dim3 block(TIERKV_MASS_WARPS * 32);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
#define TIERKV_MASS(DT, GT) tierkv::mass_logits<DT, GT><<<grid, block, smem, stream>>>(a)
  const bool bf = abstracts.scalar_type() == at::kBFloat16;
  switch (gt) {
    case 1: if (bf) TIERKV_MASS(0, 1); else TIERKV_MASS(1, 1); break;
    case 2: if (bf) TIERKV_MASS(0, 2); else TIERKV_MASS(1, 2); break;
    case 4: if (bf) TIERKV_MASS(0, 4); else TIERKV_MASS(1, 4); break;
    default: if (bf) TIERKV_MASS(0, 8); else TIERKV_MASS(1, 8); break;
  }
#undef TIERKV_MASS
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY(tierkv, m) {
  m.def("gather(Tensor[] sources, Tensor table, int fmt, int head_dim, int group, Tensor(a!) k_out, Tensor(b!) v_out, "
        "int parts, int tile_tokens, int blocks) -> ()");
  m.def("ingest(Tensor k, Tensor v, int chunk_len, int fmt, int group) -> (Tensor, Tensor)");
  m.def("copy_chunks(Tensor[] sources, Tensor copies, Tensor(a!) dst) -> ()");
  m.def("mass_logits(Tensor q, Tensor abstracts, Tensor codes, int n_chunks) -> Tensor");
}

TORCH_LIBRARY_IMPL(tierkv, CUDA, m) {
  m.impl("gather", &gather);
  m.impl("ingest", &ingest);
  m.impl("copy_chunks", &copy_chunks);
  m.impl("mass_logits", &mass_logits);
}

// `import tierkv._C` loads this library, which registers the ops above; the module itself is empty.
static struct PyModuleDef tierkv_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tierkv_c_module); }
