// The torch-facing wrappers of the per-token ops and the attention ops' argument checks, shared by the AVX-512
// library (decode_ops.cpp) and the AVX2 one (decode_ops_avx2.cpp): included inside each file's anonymous
// namespace after its kernels `rms_norm_rows(x, ldx, w, w_offset, y, rows, H, eps)`, `silu_mul_rows(x, y, rows, I)`
// and `rotary_rows(x, xs0, xs1, cos, sin, y, T, H, D, rotary_dim, interleaved)`, so that the two instruction sets
// differ only in their kernels.
#pragma once

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool add_unit_offset) {
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu(), "rms_norm: x must be a CPU tensor with a last dim");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H, "rms_norm: weight has ", weight.numel(), " elements, x has ", H, " features");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "rms_norm: bf16 or fp32 x");
  at::Tensor xc = x.contiguous().view({-1, H});
  // The weight is read in its own dtype (bf16 or fp32): no conversion copy per call.
  at::Tensor w = (weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kFloat)
                     ? weight.contiguous()
                     : weight.to(at::kFloat).contiguous();
  const float w_offset = add_unit_offset ? 1.0f : 0.0f;  // Gemma: x * (1 + w)
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = xc.size(0);
  if (rows == 0 || H == 0) return y.view(x.sizes());
  auto run = [&](auto* wp) {
    if (x.scalar_type() == at::kFloat)
      rms_norm_rows(xc.data_ptr<float>(), H, wp, w_offset, y.data_ptr<float>(), rows, H, float(eps));
    else
      rms_norm_rows(xc.data_ptr<c10::BFloat16>(), H, wp, w_offset, y.data_ptr<c10::BFloat16>(), rows, H, float(eps));
  };
  if (w.scalar_type() == at::kBFloat16)
    run(w.data_ptr<c10::BFloat16>());
  else
    run(w.data_ptr<float>());
  return y.view(x.sizes());
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu(), "silu_and_mul: x must be a CPU tensor with a last dim");
  TORCH_CHECK(x.size(-1) % 2 == 0, "silu_and_mul: the last dim must be even ([gate | up])");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "silu_and_mul: bf16 or fp32 x");
  const int64_t I = x.size(-1) / 2;
  at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, xc.options());
  const int64_t rows = I ? xc.numel() / (2 * I) : 0;
  if (rows == 0) return y;
  if (x.scalar_type() == at::kFloat)
    silu_mul_rows(xc.data_ptr<float>(), y.data_ptr<float>(), rows, I);
  else
    silu_mul_rows(xc.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, I);
  return y;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dim,
                  bool interleaved) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && x.stride(2) == 1,
              "rotary: x must be a CPU [T, H, D] tensor with contiguous head dims");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "rotary: bf16 or fp32 x");
  const int64_t Tn = x.size(0), H = x.size(1), D = x.size(2);
  const int64_t rd = rotary_dim > 0 ? rotary_dim : D;
  TORCH_CHECK(rd % 2 == 0 && rd <= D, "rotary: rotary_dim must be even and at most the head dim");
  at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  TORCH_CHECK(c.numel() == Tn * (rd / 2) && s.numel() == c.numel(), "rotary: cos/sin must be [T, rotary_dim / 2]");
  at::Tensor y = at::empty({Tn, H, D}, x.options());
  if (Tn * H == 0 || D == 0) return y;
  if (x.scalar_type() == at::kFloat)
    rotary_rows(x.data_ptr<float>(), x.stride(0), x.stride(1), c.data_ptr<float>(), s.data_ptr<float>(),
                y.data_ptr<float>(), Tn, H, D, rd, interleaved);
  else
    rotary_rows(x.data_ptr<c10::BFloat16>(), x.stride(0), x.stride(1), c.data_ptr<float>(), s.data_ptr<float>(),
                y.data_ptr<c10::BFloat16>(), Tn, H, D, rd, interleaved);
  return y;
}

// Shapes and dtypes both attention ops need; returns {S, Hq, D, Hk, Dv}.
std::array<int64_t, 5> check_attention(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, int64_t block_size) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, op,
              ": q [S, Hq, D], k_cache [slots, Hk, D], v_cache [slots, Hk, Dv]");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), op,
              ": q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, op, ": bf16 or fp32 only");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1, op,
              ": the head dim must be contiguous");
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2), Hk = k_cache.size(1), Dv = v_cache.size(2);
  TORCH_CHECK(k_cache.size(2) == D && v_cache.size(1) == Hk, op, ": cache shapes disagree with q");
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, op, ": query heads must be a multiple of KV heads");
  TORCH_CHECK(block_size > 0, op, ": block_size must be positive");
  return {S, Hq, D, Hk, Dv};
}

// Every slot that `len` keys read through `table` (width blocks) must exist: a bad table must not read out of
// bounds.
void check_table(const char* op, const int64_t* table, int64_t width, int64_t len, int64_t block_size,
                 int64_t slots, int64_t seq) {
  TORCH_CHECK(len >= 1 && len <= width * block_size, op, ": seq_lens[", seq, "] = ", len,
              " does not fit its block table (", width, " blocks of ", block_size, ")");
  const int64_t used = (len + block_size - 1) / block_size;
  for (int64_t b = 0; b < used; ++b)
    TORCH_CHECK(table[b] >= 0 && (table[b] + 1) * block_size <= slots, op, ": block id ", table[b],
                " is outside the cache");
}

// paged_attention_prefill's block tables, seq_lens and query_start_loc as int64, checked against q's T rows and
// the cache (each sequence's table where it has new tokens).
struct PrefillArgs {
  at::Tensor tables, lens, starts;
  int64_t S = 0, width = 0;
  const int64_t* tp = nullptr;
  const int64_t* lp = nullptr;
  const int64_t* sp = nullptr;
};
PrefillArgs prefill_args(const char* op, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, int64_t T, int64_t block_size, int64_t slots) {
  PrefillArgs a;
  a.tables = block_tables.to(at::kLong).contiguous();
  a.lens = seq_lens.to(at::kLong).contiguous();
  a.starts = query_start_loc.to(at::kLong).contiguous();
  TORCH_CHECK(a.tables.dim() == 2 && a.lens.dim() == 1 && a.tables.size(0) == a.lens.size(0) &&
                  a.starts.numel() == a.lens.numel() + 1, op,
              ": block_tables [S, W], seq_lens [S] and query_start_loc [S + 1] must agree");
  a.S = a.lens.numel();
  a.width = a.tables.size(1);
  a.lp = a.lens.data_ptr<int64_t>();
  a.tp = a.tables.data_ptr<int64_t>();
  a.sp = a.starts.data_ptr<int64_t>();
  TORCH_CHECK(a.sp[0] == 0 && a.sp[a.S] == T, op, ": query_start_loc must run from 0 to q's ", T, " rows");
  for (int64_t i = 0; i < a.S; ++i) {
    const int64_t n = a.sp[i + 1] - a.sp[i];
    TORCH_CHECK(n >= 0 && n <= a.lp[i], op, ": sequence ", i, " has ", n, " new tokens but seq_lens[", i, "] = ",
                a.lp[i]);
    if (n > 0) check_table(op, a.tp + i * a.width, a.width, a.lp[i], block_size, slots, i);
  }
  return a;
}

