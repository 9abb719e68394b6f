// Native CPU kernels of the vocabulary pass: per-row softmax statistics and the logits gradient, each one sweep over
// a GEMM'd [n, V] logits chunk (the plain-torch reference makes several). Registered for the CPU dispatch key of the
// ops that rlvr_kernels/cpu/vocab_rows.py defines (schemas, fake implementations and the plain-torch fallback live there).
//
// For scaled logits s = z * inv_temp of a row with target y, m = max s, d = s - m, S = sum exp(d), A = sum exp(d) d:
//   lse = m + log S,  logp = s_y - lse,  entropy = log S - A / S
// and with p = exp(s - lse) the gradient with respect to z is
//   dz = inv_temp * (g_logp * onehot(y) - p * (c_p + g_ent * (log p + entropy))).
// Entries with s = -inf have p = 0 and add nothing; rows whose target is ignore_index give logp = entropy = 0 and a
// zero gradient whatever their logits hold. Float32 runs on at::vec (AVX2/AVX-512 when the build enables them), float64
// the same code; OpenMP splits rows when a chunk is large enough to pay for it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace {

using at::vec::Vectorized;

// exp of a vector: float32 takes ATen's polynomial exp_u20 (max error 20 ulp, relative 1.2e-6, below the rounding of
// an fp32 log-normaliser of magnitude 16 and above: the same exp as ATen's own softmax kernels), float64 Sleef's
// 1-ulp exp.
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// Rows per parallel task: about 64K logits each, so small chunks stay on one thread (no fork/join overhead, no
// collapse when the machine's cores are busy).
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

template <typename T>
T row_max_scaled(const T* row, int64_t V, T it) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec vm(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + W <= V; j += W) vm = at::vec::maximum(vm, Vec::loadu(row + j));
  T m = -std::numeric_limits<T>::infinity();
  bool nan = false;
  T buf[W];
  vm.store(buf);
  for (int64_t k = 0; k < W; ++k) {
    nan |= std::isnan(buf[k]);
    m = std::max(m, buf[k]);
  }
  for (; j < V; ++j) {
    nan |= std::isnan(row[j]);
    m = std::max(m, row[j]);
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : m * it;
}

template <typename T>
void stats_rows(const T* z, const int64_t* tgt, int64_t n, int64_t V, T it, int64_t ignore, T* logp, T* ent, T* lse) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = z + r * V;
      T m = row_max_scaled(row, V, it);
      if (!std::isfinite(m)) m = T(0);  // all -inf (S = 0, lse = -inf), +inf or NaN (lse not finite): flagged later
      const Vec vit(it), vnm(-m), zero(T(0));
      Vec vs(T(0)), va(T(0));
      int64_t j = 0;
      for (; j + W <= V; j += W) {
        Vec d = at::vec::fmadd(Vec::loadu(row + j), vit, vnm);  // one rounding: z * it - m
        Vec e = vexp(d);
        vs = vs + e;
        va = va + Vec::blendv(zero, e * d, e > zero);  // exp(-inf) * -inf would be NaN: p = 0 adds nothing
      }
      T s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vs);
      T a = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, va);
      for (; j < V; ++j) {
        T d = std::fma(row[j], it, -m);
        T e = std::exp(d);
        s += e;
        if (e > T(0)) a += e * d;
      }
      T log_s = std::log(s);
      lse[r] = m + log_s;
      int64_t y = tgt[r];
      if (y == ignore) {
        logp[r] = T(0);
        ent[r] = T(0);
      } else {
        logp[r] = std::fma(row[y], it, -m) - log_s;
        ent[r] = log_s - a / s;
      }
    }
  });
}

template <typename T>
void grad_rows(T* z, const int64_t* tgt, const T* lse, const T* ent, const T* g_logp, const T* g_ent, const T* c_p,
               int64_t n, int64_t V, T it, int64_t ignore) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = z + r * V;
      int64_t y = tgt[r];
      if (y == ignore) {
        std::fill(row, row + V, T(0));
        continue;
      }
      const T L = lse[r], H = ent[r], cp = c_p[r], gh = g_ent ? g_ent[r] : T(0);
      const Vec vit(it), vnL(-L), vH(H), vcp(cp), vgh(gh), zero(T(0)), vneg(-it);
      int64_t j = 0;
      if (g_ent) {
        for (; j + W <= V; j += W) {
          Vec lz = at::vec::fmadd(Vec::loadu(row + j), vit, vnL);
          Vec p = vexp(lz);
          Vec t = Vec::blendv(zero, lz, p > zero);  // log p = -inf where p = 0: that entry's gradient is 0
          (vneg * p * (vcp + vgh * (t + vH))).store(row + j);
        }
        for (; j < V; ++j) {
          T lz = std::fma(row[j], it, -L);
          T p = std::exp(lz);
          row[j] = -it * p * (cp + gh * ((p > T(0) ? lz : T(0)) + H));
        }
      } else {
        for (; j + W <= V; j += W) {
          Vec p = vexp(at::vec::fmadd(Vec::loadu(row + j), vit, vnL));
          (vneg * vcp * p).store(row + j);
        }
        for (; j < V; ++j) row[j] = -it * cp * std::exp(std::fma(row[j], it, -L));
      }
      row[y] += it * g_logp[r];
    }
  });
}

void check_rows(const at::Tensor& z, const at::Tensor& targets, const char* what) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous(), what, ": z must be a contiguous [n, V] tensor");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, what, ": z must be float32 or float64");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == z.size(0) && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous(),
              what, ": targets must be a contiguous int64 [n] tensor");
}

void check_vec(const at::Tensor& t, const at::Tensor& z, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == z.size(0) && t.scalar_type() == z.scalar_type() && t.is_contiguous(),
              "vocab_row_grad_: ", name, " must be a contiguous [n] tensor of z's dtype");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vocab_row_stats(const at::Tensor& z, const at::Tensor& targets,
                                                               double inv_temp, int64_t ignore_index) {
  check_rows(z, targets, "vocab_row_stats");
  const int64_t n = z.size(0), V = z.size(1);
  auto logp = at::empty({n}, z.options());
  auto ent = at::empty({n}, z.options());
  auto lse = at::empty({n}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "vocab_row_stats", [&] {
    stats_rows<scalar_t>(z.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), n, V,
                         static_cast<scalar_t>(inv_temp), ignore_index, logp.mutable_data_ptr<scalar_t>(),
                         ent.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>());
  });
  return {logp, ent, lse};
}

void vocab_row_grad_(at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
                     const at::Tensor& g_logp, const std::optional<at::Tensor>& g_ent, const at::Tensor& c_p,
                     double inv_temp, int64_t ignore_index) {
  check_rows(z, targets, "vocab_row_grad_");
  check_vec(lse, z, "lse");
  check_vec(entropy, z, "entropy");
  check_vec(g_logp, z, "g_logp");
  check_vec(c_p, z, "c_p");
  if (g_ent.has_value()) check_vec(*g_ent, z, "g_ent");
  const int64_t n = z.size(0), V = z.size(1);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "vocab_row_grad_", [&] {
    grad_rows<scalar_t>(z.mutable_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(),
                        lse.const_data_ptr<scalar_t>(), entropy.const_data_ptr<scalar_t>(),
                        g_logp.const_data_ptr<scalar_t>(),
                        g_ent.has_value() ? g_ent->const_data_ptr<scalar_t>() : nullptr, c_p.const_data_ptr<scalar_t>(),
                        n, V, static_cast<scalar_t>(inv_temp), ignore_index);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rlvr_kernels, CPU, m) {
  m.impl("vocab_row_stats", &vocab_row_stats);
  m.impl("vocab_row_grad_", &vocab_row_grad_);
}
