// Native CPU kernels of the DelTA coefficients (docs/methods/delta.md, "How the package computes it"): the two skinny
// sweeps over the hidden states and the whole one-shot estimate (centroids, margins, gammas, refinements,
// coefficients) in one call, without the hundreds of small torch ops of the plain-torch reference. Registered for the
// CPU dispatch key of the ops that rlvr_kernels/cpu/delta_sweeps.py defines (schemas, fake implementations and the
// plain-torch fallback, which is the reference rlvr_kernels/reference/delta.py, live there).
//
// Flat inputs as in the reference: h [N, H] (fp32 / fp64 / bf16 / fp16, last dim contiguous, any row stride; rows
// that are not valid may hold anything, NaN included, and are never read), fp32 s = 1 - p_old and a (the advantage)
// [N], bool valid [N]. Precision as the reference: h is rounded to fp32 and the sweeps accumulate in fp32 (at::vec,
// AVX2 / AVX-512 when the build enables them); side masses and centroids in fp32; margin moments and the normaliser
// in float64.
//
// Threads: rows are split into tasks of at least kGrainElems elements of h (16 MiB of fp32, milliseconds of
// work), so a small estimation set runs on the calling thread only. Fork/join per tiny op is what made the reference
// collapse when the machine's cores are busy (a task waits for a descheduled worker for a whole time slice).
// colsum sums fixed row chunks in a fixed order: the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;
using Vec = Vectorized<float>;

constexpr int64_t kGrainElems = int64_t{1} << 22;  // elements of h per parallel task
constexpr int64_t kMaxChunks = 64;                 // bound on colsum's per-chunk partial sums: 64 x [2, H] fp32

int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H, 1)); }

// Row n of h as fp32: the row itself for fp32, else converted into buf (H floats).
template <typename T>
const float* row_f32(const T* row, int64_t H, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t j = 0; j < H; ++j) buf[j] = static_cast<float>(row[j]);
    return buf;
  }
}

float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// (x . m0, x . m1), fp32 accumulation.
void dot2(const float* x, const float* m0, const float* m1, int64_t H, float& d0, float& d1) {
  constexpr int64_t W = Vec::size();
  Vec a0(0.f), a1(0.f);
  int64_t j = 0;
  for (; j + W <= H; j += W) {
    Vec v = Vec::loadu(x + j);
    a0 = at::vec::fmadd(v, Vec::loadu(m0 + j), a0);
    a1 = at::vec::fmadd(v, Vec::loadu(m1 + j), a1);
  }
  d0 = reduce_sum(a0);
  d1 = reduce_sum(a1);
  for (; j < H; ++j) {
    d0 += x[j] * m0[j];
    d1 += x[j] * m1[j];
  }
}

// acc0 += w0 x, acc1 += w1 x.
void axpy2(const float* x, float w0, float w1, int64_t H, float* acc0, float* acc1) {
  constexpr int64_t W = Vec::size();
  const Vec v0(w0), v1(w1);
  int64_t j = 0;
  for (; j + W <= H; j += W) {
    Vec v = Vec::loadu(x + j);
    at::vec::fmadd(v, v0, Vec::loadu(acc0 + j)).store(acc0 + j);
    at::vec::fmadd(v, v1, Vec::loadu(acc1 + j)).store(acc1 + j);
  }
  for (; j < H; ++j) {
    acc0[j] += w0 * x[j];
    acc1[j] += w1 * x[j];
  }
}

// The flat inputs of one call.
template <typename T>
struct Rows {
  const T* h;
  int64_t ld, N, H;
  const bool* valid;
};

// p0[n ps], p1[n ps] = h_n . mu0, h_n . mu1 on valid rows, 0 elsewhere.
template <typename T>
void rowdot2(const Rows<T>& r, const float* mu0, const float* mu1, float* p0, float* p1, int64_t ps) {
  at::parallel_for(0, r.N, grain_rows(r.H), [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : r.H);
    for (int64_t n = n0; n < n1; ++n) {
      if (!r.valid[n]) {
        p0[n * ps] = p1[n * ps] = 0.f;
        continue;
      }
      dot2(row_f32(r.h + n * r.ld, r.H, buf.data()), mu0, mu1, r.H, p0[n * ps], p1[n * ps]);
    }
  });
}

// out0, out1 [H] = sum over valid rows of w0[n] h_n, w1[n] h_n. Every valid row is read, even with zero weights, so
// a non-finite hidden state shows in the centroids exactly as in the reference (0 * inf = NaN).
template <typename T>
void colsum2(const Rows<T>& r, const float* w0, const float* w1, float* out0, float* out1) {
  const int64_t H = r.H;
  const int64_t chunk = std::max(grain_rows(H), (r.N + kMaxChunks - 1) / kMaxChunks);
  const int64_t nchunks = r.N == 0 ? 0 : (r.N + chunk - 1) / chunk;
  std::fill(out0, out0 + H, 0.f);
  std::fill(out1, out1 + H, 0.f);
  if (nchunks == 0) return;
  std::vector<float> part(nchunks > 1 ? nchunks * 2 * H : 0, 0.f);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : H);
    for (int64_t c = c0; c < c1; ++c) {
      float* a0 = nchunks > 1 ? part.data() + c * 2 * H : out0;
      float* a1 = nchunks > 1 ? a0 + H : out1;
      for (int64_t n = c * chunk, end = std::min(r.N, (c + 1) * chunk); n < end; ++n) {
        if (r.valid[n]) axpy2(row_f32(r.h + n * r.ld, H, buf.data()), w0[n], w1[n], H, a0, a1);
      }
    }
  });
  for (int64_t c = 0; c < nchunks && nchunks > 1; ++c) {  // fixed order: same bits for any thread count
    const float* a0 = part.data() + c * 2 * H;
    for (int64_t j = 0; j < H; ++j) {
      out0[j] += a0[j];
      out1[j] += a0[H + j];
    }
  }
}

float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// Status codes shared with rlvr_kernels/cpu/delta_sweeps.py (which turns them into the ValueErrors of the public op).
enum Status : int64_t { kOk = 0, kMassOverflow = 1, kCentroidsNonFinite = 2, kMarginsOverflow = 3 };

// The one-shot estimate of reference.delta.delta_coefficients_flat, step for step.
template <typename T>
class OneShot {
 public:
  OneShot(const Rows<T>& r, const float* s, const float* a, double eps)
      : r_(r), s_(s), a_(a), eps_(eps), N_(r.N), H_(r.H), side_(N_), m_(N_), w0_(N_), w1_(N_), p0_(N_), p1_(N_),
        mu_(2 * H_) {
    for (int64_t n = 0; n < N_; ++n) side_[n] = !r.valid[n] ? 0 : a[n] > 0.f ? 1 : a[n] < 0.f ? -1 : 0;
  }

  // Centroids from the weights in w0_, w1_ and the side masses; then the margins against them. Returns a Status.
  int64_t centroids_and_margins(float mass0, float mass1) {
    if (!std::isfinite(mass0) || !std::isfinite(mass1)) return kMassOverflow;
    float* mu0 = mu_.data();
    float* mu1 = mu0 + H_;
    colsum2(r_, w0_.data(), w1_.data(), mu0, mu1);
    const float d0 = std::max(mass0, static_cast<float>(eps_)), d1 = std::max(mass1, static_cast<float>(eps_));
    float b0 = 0.f, b1 = 0.f;
    bool finite = true;
    for (int64_t j = 0; j < H_; ++j) {
      mu0[j] /= d0;
      mu1[j] /= d1;
      finite &= std::isfinite(mu0[j]) && std::isfinite(mu1[j]);
      b0 += mu0[j] * mu0[j];
      b1 += mu1[j] * mu1[j];
    }
    if (!finite) return kCentroidsNonFinite;
    rowdot2(r_, mu0, mu1, p0_.data(), p1_.data(), 1);
    const float b = b0 - b1;
    for (int64_t n = 0; n < N_; ++n) {
      if (!r_.valid[n]) {
        m_[n] = 0.f;
        continue;
      }
      const float m = 2.f * s_[n] * (p0_[n] - p1_[n]) - b;
      m_[n] = side_[n] > 0 ? m : -m;
      if (!std::isfinite(m_[n])) return kMarginsOverflow;
    }
    return kOk;
  }

  int64_t initial() {
    float mass0 = 0.f, mass1 = 0.f;
    for (int64_t n = 0; n < N_; ++n) {
      const float ap = side_[n] > 0 ? a_[n] : 0.f, an = side_[n] < 0 ? -a_[n] : 0.f;
      mass0 += ap;
      mass1 += an;
      w0_[n] = ap * s_[n];
      w1_[n] = an * s_[n];
    }
    return centroids_and_margins(mass0, mass1);
  }

  // gamma per side from the current margins: sqrt(max(population variance, eps)) in float64, then fp32.
  void gamma(float& g0, float& g1) const {
    double c[2] = {0, 0}, s1[2] = {0, 0}, s2[2] = {0, 0};
    for (int64_t n = 0; n < N_; ++n) {
      if (side_[n] == 0) continue;
      const int k = side_[n] > 0 ? 0 : 1;
      const double m = m_[n];
      c[k] += 1.0;
      s1[k] += m;
      s2[k] += m * m;
    }
    float g[2];
    for (int k = 0; k < 2; ++k) {
      const double n = std::max(c[k], 1.0), mean = s1[k] / n;
      g[k] = static_cast<float>(std::sqrt(std::max(s2[k] / n - mean * mean, eps_)));
    }
    g0 = g[0];
    g1 = g[1];
  }

  // One refinement: soft weights sigmoid(m / gamma) |A| from the current margins, new centroids and margins.
  int64_t refine(float g0, float g1) {
    float mass0 = 0.f, mass1 = 0.f;
    for (int64_t n = 0; n < N_; ++n) {
      const float om = sigmoid(m_[n] / (side_[n] > 0 ? g0 : g1)) * std::abs(a_[n]);
      const float op = side_[n] > 0 ? om : 0.f, on = side_[n] < 0 ? om : 0.f;
      mass0 += op;
      mass1 += on;
      w0_[n] = op * s_[n];
      w1_[n] = on * s_[n];
    }
    return centroids_and_margins(mass0, mass1);
  }

  // c~ from the final margins and gammas into out [N].
  void coefficients(float g0, float g1, double lam_min, double lam_max, bool exclude_zero_adv, float* out) const {
    const float lo = static_cast<float>(lam_min), span = static_cast<float>(lam_max - lam_min);
    double sum_c = 0.0, n_e = 0.0;
    for (int64_t n = 0; n < N_; ++n) {
      float c = 0.f;
      if (r_.valid[n]) c = side_[n] != 0 ? lo + span * sigmoid(m_[n] / (side_[n] > 0 ? g0 : g1)) : lo;
      out[n] = c;
      if (r_.valid[n] && (!exclude_zero_adv || side_[n] != 0)) {
        sum_c += c;
        n_e += 1.0;
      }
    }
    const double scale = n_e / std::max(sum_c, eps_);
    for (int64_t n = 0; n < N_; ++n) {
      if (!r_.valid[n]) continue;
      out[n] = exclude_zero_adv && side_[n] == 0 ? 1.f : static_cast<float>(out[n] * scale);
    }
  }

 private:
  Rows<T> r_;
  const float *s_, *a_;
  double eps_;
  int64_t N_, H_;
  std::vector<int8_t> side_;  // +1 Pos (A > 0), -1 Neg (A < 0), 0 zero advantage or invalid
  std::vector<float> m_, w0_, w1_, p0_, p1_, mu_;
};

template <typename T>
int64_t one_shot(const Rows<T>& r, const float* s, const float* a, int64_t iters, double lam_min, double lam_max,
                 double eps, bool exclude_zero_adv, float* out) {
  OneShot<T> st(r, s, a, eps);
  int64_t status = st.initial();
  if (status != kOk) return status;
  float g0, g1;
  st.gamma(g0, g1);
  for (int64_t k = 0; k < iters; ++k) {
    const float w0 = g0, w1 = g1;  // the weights use the gamma of the previous step (official order) ...
    st.gamma(g0, g1);              // ... and the next gamma comes from these same pre-update margins
    status = st.refine(w0, w1);
    if (status != kOk) return status;
  }
  st.coefficients(g0, g1, lam_min, lam_max, exclude_zero_adv, out);
  return kOk;
}

void check_flat(const at::Tensor& h, const at::Tensor& valid, const char* what) {
  TORCH_CHECK(h.dim() == 2 && h.stride(1) == 1, what, ": h must be [N, H] with a contiguous last dim");
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == h.size(0) && valid.scalar_type() == at::kBool &&
                  valid.is_contiguous(),
              what, ": valid must be a contiguous bool [N] tensor");
}

void check_f32(const at::Tensor& t, int64_t rows, int64_t cols, const char* what, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == rows * cols, what, ": ", name,
              " must be a contiguous fp32 tensor of ", rows * cols, " elements");
}

#define DELTA_DISPATCH(h, what, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (h).scalar_type(), what, __VA_ARGS__)

template <typename T>
Rows<T> rows_of(const at::Tensor& h, const at::Tensor& valid) {
  return Rows<T>{h.const_data_ptr<T>(), h.stride(0), h.size(0), h.size(1), valid.const_data_ptr<bool>()};
}

at::Tensor delta_rowdot(const at::Tensor& h, const at::Tensor& mu, const at::Tensor& valid) {
  check_flat(h, valid, "delta_rowdot");
  check_f32(mu, 2, h.size(1), "delta_rowdot", "mu");
  const int64_t N = h.size(0), H = h.size(1);
  auto p = at::empty({N, 2}, h.options().dtype(at::kFloat));
  DELTA_DISPATCH(h, "delta_rowdot", [&] {
    const float* m = mu.const_data_ptr<float>();
    float* out = p.mutable_data_ptr<float>();
    rowdot2(rows_of<scalar_t>(h, valid), m, m + H, out, out + 1, 2);
  });
  return p;
}

at::Tensor delta_colsum(const at::Tensor& h, const at::Tensor& w, const at::Tensor& valid) {
  check_flat(h, valid, "delta_colsum");
  check_f32(w, h.size(0), 2, "delta_colsum", "w");
  const int64_t N = h.size(0), H = h.size(1);
  auto wt = w.t().contiguous();  // [2, N]: each weight column contiguous
  auto out = at::empty({2, H}, h.options().dtype(at::kFloat));
  DELTA_DISPATCH(h, "delta_colsum", [&] {
    const float* wp = wt.const_data_ptr<float>();
    colsum2(rows_of<scalar_t>(h, valid), wp, wp + N, out.mutable_data_ptr<float>(), out.mutable_data_ptr<float>() + H);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> delta_flat_coefficients(const at::Tensor& h, const at::Tensor& s,
                                                           const at::Tensor& a, const at::Tensor& valid,
                                                           int64_t iters, double lam_min, double lam_max, double eps,
                                                           bool exclude_zero_adv) {
  check_flat(h, valid, "delta_flat_coefficients");
  const int64_t N = h.size(0);
  check_f32(s, N, 1, "delta_flat_coefficients", "s");
  check_f32(a, N, 1, "delta_flat_coefficients", "a");
  TORCH_CHECK(iters >= 0, "delta_flat_coefficients: iters must be >= 0");
  auto out = at::zeros({N}, h.options().dtype(at::kFloat));
  int64_t status = kOk;
  DELTA_DISPATCH(h, "delta_flat_coefficients", [&] {
    status = one_shot(rows_of<scalar_t>(h, valid), s.const_data_ptr<float>(), a.const_data_ptr<float>(), iters,
                      lam_min, lam_max, eps, exclude_zero_adv, out.mutable_data_ptr<float>());
  });
  if (status != kOk) out.zero_();
  return {out, at::full({}, status, h.options().dtype(at::kLong))};
}

// s = 1 - exp(old_logp) (as -expm1 of old_logp clamped to <= 0) and the advantage on valid tokens, 0 elsewhere; a
// serial loop (torch's expm1 forks a thread team from 2048 elements on, which stalls on a busy machine).
std::tuple<at::Tensor, at::Tensor> delta_token_scalars(const at::Tensor& old_logp, const at::Tensor& adv,
                                                       const at::Tensor& valid) {
  const int64_t N = old_logp.numel();
  check_f32(old_logp, N, 1, "delta_token_scalars", "old_logp");
  check_f32(adv, N, 1, "delta_token_scalars", "adv");
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == N && valid.scalar_type() == at::kBool && valid.is_contiguous(),
              "delta_token_scalars: valid must be a contiguous bool [N] tensor");
  auto s = at::empty({N}, old_logp.options());
  auto a = at::empty({N}, old_logp.options());
  const float *lp = old_logp.const_data_ptr<float>(), *ad = adv.const_data_ptr<float>();
  const bool* v = valid.const_data_ptr<bool>();
  float *sp = s.mutable_data_ptr<float>(), *ap = a.mutable_data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    sp[n] = v[n] ? -std::expm1(std::min(lp[n], 0.f)) : 0.f;
    ap[n] = v[n] ? ad[n] : 0.f;
  }
  return {s, a};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlvr_kernels, CPU, m) {
  m.impl("delta_rowdot", &delta_rowdot);
  m.impl("delta_colsum", &delta_colsum);
  m.impl("delta_flat_coefficients", &delta_flat_coefficients);
  m.impl("delta_token_scalars", &delta_token_scalars);
}
