// Native CPU kernels of the token ops' per-row scans and selections, on the padded layout ([R, M] rows plus a bool
// valid mask): rank percentiles (trajectory_percentile with values), the top-k selection of forking tokens and D^3S,
// the order statistics of CPPO's dynamic budget, and CPPO's exclusive prefix-budget scan. Registered for the CPU
// dispatch key of the ops that rlvr_kernels/cpu/token_rows.py defines (schemas, fake implementations and the
// plain-torch reference, which is the fallback and the oracle, live there).
//
// Exactness: every result equals the reference's bit for bit. Selections work on the (value, index) order, which is
// the reference's stable sort: values compared in their own dtype with -0.0 == +0.0 (as torch.sort does), ties to the
// lower index. Only valid entries are read, so NaN/inf at masked positions never matter. The CPPO scan rounds as the
// reference's separate torch ops do: fp32 products and differences (no FMA contraction, see the pragma below) and
// torch.cumsum's double accumulator rounded to fp32 at each position.
//
// Rows are split over threads with a grain of about 16K elements per task, so small inputs stay on one thread (no
// fork/join cost, no collapse when the cores are busy).

// The reference rounds `db * w` before subtracting `Z`; a fused multiply-add would not, so contraction stays off.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kGrainElems = int64_t{1} << 14;

// Rows per parallel task: at least kGrainElems elements each.
int64_t row_grain(int64_t M) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(M, 1)); }

// Order-preserving unsigned keys: a < b (as numbers, -0.0 == +0.0) iff key(a) < key(b). NaN never reaches them
// (valid entries are checked finite or +-inf by the public ops).
inline uint32_t sort_key(float v) {
  if (v == 0.0f) v = 0.0f;  // -0.0 and +0.0 tie, as in torch.sort
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline uint64_t sort_key(double v) {
  if (v == 0.0) v = 0.0;
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & (uint64_t{1} << 63)) ? ~u : (u | (uint64_t{1} << 63));
}

inline uint64_t sort_key(int64_t v) { return static_cast<uint64_t>(v) ^ (uint64_t{1} << 63); }

// One row's valid entries as (key, index) items in index order. A 32-bit key and a 32-bit index share one uint64
// (lexicographic order = integer order, the fastest to sort); wider keys use a pair.
inline uint64_t make_item(uint32_t key, int64_t i) { return (uint64_t{key} << 32) | static_cast<uint64_t>(i); }
inline std::pair<uint64_t, int64_t> make_item(uint64_t key, int64_t i) { return {key, i}; }
inline int64_t item_index(uint64_t it) { return static_cast<int64_t>(it & 0xffffffffu); }
inline int64_t item_index(const std::pair<uint64_t, int64_t>& it) { return it.second; }

template <typename T, typename Item>
void gather_items(const T* x, const bool* ok, int64_t M, std::vector<Item>& items) {
  items.clear();
  for (int64_t i = 0; i < M; ++i)
    if (ok[i]) items.push_back(make_item(sort_key(x[i]), i));
}

inline uint64_t item_key(uint64_t it) { return it >> 32; }
inline uint64_t item_key(const std::pair<uint64_t, int64_t>& it) { return it.first; }
template <typename Item>
constexpr int key_digits() { return std::is_same_v<Item, uint64_t> ? 4 : 8; }

// Stable LSD radix sort on the key's bytes (least significant first): items that enter in index order leave in
// (key, index) order, in O(n) where std::sort is O(n log n). Short rows use std::sort (the histograms would dominate).
template <typename Item>
void sort_items(std::vector<Item>& a, std::vector<Item>& tmp) {
  const size_t n = a.size();
  if (n < 256) {
    std::sort(a.begin(), a.end());  // keys tie only with the index: the same order
    return;
  }
  tmp.resize(n);
  for (int d = 0; d < key_digits<Item>(); ++d) {
    const int shift = 8 * d;
    size_t count[256] = {0};
    for (const Item& it : a) ++count[(item_key(it) >> shift) & 0xff];
    if (count[(item_key(a[0]) >> shift) & 0xff] == n) continue;  // one bucket: this pass would move nothing
    size_t pos = 0;
    for (size_t& c : count) {
      const size_t here = c;
      c = pos;
      pos += here;
    }
    for (const Item& it : a) tmp[count[(item_key(it) >> shift) & 0xff]++] = it;
    a.swap(tmp);
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& valid, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), what, ": the values must be a contiguous [R, M] tensor");
  TORCH_CHECK(valid.sizes() == x.sizes() && valid.scalar_type() == at::kBool && valid.is_contiguous(), what,
              ": valid must be a contiguous bool tensor of the values' shape");
  TORCH_CHECK(x.size(1) < (int64_t{1} << 32), what, ": rows of 2**32 entries or more take the torch path");
}

void check_per_row(const at::Tensor& t, int64_t R, at::ScalarType dtype, const char* what, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == R && t.scalar_type() == dtype && t.is_contiguous(), what, ": ", name,
              " must be a contiguous [R] tensor of dtype ", dtype);
}

// ---------------------------------------------------------------------------------------------------------------------
// rank percentile: rank / n, rank the 0-based ascending (value, index) position among the row's n valid entries
// ---------------------------------------------------------------------------------------------------------------------
template <typename T, typename Key>
void rank_rows(const T* x, const bool* valid, int64_t R, int64_t M, float* out) {
  using Item = decltype(make_item(Key{}, 0));
  at::parallel_for(0, R, row_grain(M), [&](int64_t r0, int64_t r1) {
    std::vector<Item> items, tmp;
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * M;
      float* o = out + r * M;
      std::fill(o, o + M, 0.0f);
      gather_items(row, valid + r * M, M, items);
      sort_items(items, tmp);
      const float n = static_cast<float>(items.size());
      for (size_t p = 0; p < items.size(); ++p) o[item_index(items[p])] = static_cast<float>(p) / n;
    }
  });
}

at::Tensor row_rank_percentile(const at::Tensor& values, const at::Tensor& valid) {
  check_rows(values, valid, "row_rank_percentile");
  const int64_t R = values.size(0), M = values.size(1);
  auto out = at::empty({R, M}, values.options().dtype(at::kFloat));
  const bool* ok = valid.const_data_ptr<bool>();
  float* o = out.mutable_data_ptr<float>();
  switch (values.scalar_type()) {
    case at::kFloat:
      rank_rows<float, uint32_t>(values.const_data_ptr<float>(), ok, R, M, o);
      break;
    case at::kDouble:
      rank_rows<double, uint64_t>(values.const_data_ptr<double>(), ok, R, M, o);
      break;
    case at::kLong:
      rank_rows<int64_t, uint64_t>(values.const_data_ptr<int64_t>(), ok, R, M, o);
      break;
    default:
      TORCH_CHECK(false, "row_rank_percentile: values must be float32, float64 or int64, got ", values.scalar_type());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------------
// top-k mask: the k[r] valid entries of largest score, ties to the lower index (a linear-time selection, no sort)
// ---------------------------------------------------------------------------------------------------------------------
at::Tensor row_topk_mask(const at::Tensor& scores, const at::Tensor& valid, const at::Tensor& k) {
  check_rows(scores, valid, "row_topk_mask");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "row_topk_mask: scores must be float32");
  const int64_t R = scores.size(0), M = scores.size(1);
  check_per_row(k, R, at::kLong, "row_topk_mask", "k");
  auto out = at::zeros({R, M}, scores.options().dtype(at::kBool));
  const float* s = scores.const_data_ptr<float>();
  const bool* ok = valid.const_data_ptr<bool>();
  const int64_t* kk = k.const_data_ptr<int64_t>();
  bool* o = out.mutable_data_ptr<bool>();
  at::parallel_for(0, R, row_grain(M), [&](int64_t r0, int64_t r1) {
    std::vector<uint64_t> items;
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = s + r * M;
      const bool* vr = ok + r * M;
      bool* orow = o + r * M;
      items.clear();
      // descending score = ascending complemented key; the index in the low half breaks ties to the lower one
      for (int64_t i = 0; i < M; ++i)
        if (vr[i]) items.push_back(make_item(~sort_key(row[i]), i));
      const int64_t n = static_cast<int64_t>(items.size());
      const int64_t kr = std::min(std::max<int64_t>(kk[r], 0), n);
      if (kr == 0) continue;
      if (kr < n) std::nth_element(items.begin(), items.begin() + (kr - 1), items.end());
      for (int64_t p = 0; p < kr; ++p) orow[item_index(items[p])] = true;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------------
// order statistics: the lo[r]-th and hi[r]-th (0-based) entries of the row's valid values in stable ascending order
// (+inf for a row without valid entries, as the reference's sort of +inf-filled rows gives)
// ---------------------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> row_order_stats(const at::Tensor& values, const at::Tensor& valid,
                                                   const at::Tensor& lo, const at::Tensor& hi) {
  check_rows(values, valid, "row_order_stats");
  TORCH_CHECK(values.scalar_type() == at::kFloat, "row_order_stats: values must be float32");
  const int64_t R = values.size(0), M = values.size(1);
  check_per_row(lo, R, at::kLong, "row_order_stats", "lo");
  check_per_row(hi, R, at::kLong, "row_order_stats", "hi");
  TORCH_CHECK(M > 0 || R == 0, "row_order_stats: rows must not be empty");
  auto v_lo = at::empty({R}, values.options());
  auto v_hi = at::empty({R}, values.options());
  const float* x = values.const_data_ptr<float>();
  const bool* ok = valid.const_data_ptr<bool>();
  const int64_t *plo = lo.const_data_ptr<int64_t>(), *phi = hi.const_data_ptr<int64_t>();
  float *olo = v_lo.mutable_data_ptr<float>(), *ohi = v_hi.mutable_data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)  // checked before the parallel region, which should not throw
    TORCH_CHECK(plo[r] >= 0 && plo[r] < M && phi[r] >= 0 && phi[r] < M, "row_order_stats: positions of row ", r,
                " out of range [0, ", M, ")");
  at::parallel_for(0, R, row_grain(M), [&](int64_t r0, int64_t r1) {
    std::vector<uint64_t> items;
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = x + r * M;
      gather_items(row, ok + r * M, M, items);
      const int64_t n = static_cast<int64_t>(items.size());
      // the reference sorts the valid values first and +inf after them: a position past the valid ones reads +inf
      auto pick = [&](int64_t p) -> float {
        if (p >= n) return std::numeric_limits<float>::infinity();
        std::nth_element(items.begin(), items.begin() + p, items.end());
        return row[item_index(items[p])];  // the entry itself: its sign of zero is the reference's
      };
      olo[r] = pick(plo[r]);
      ohi[r] = pick(phi[r]);
    }
  });
  return {v_lo, v_hi};
}

// ---------------------------------------------------------------------------------------------------------------------
// CPPO's prefix budget: inside_t = Z_t <= min(delta, delta + R_t), R_t = sum_{j<t} (db w_j - Z_j)
// ---------------------------------------------------------------------------------------------------------------------
at::Tensor cppo_prefix_inside(const at::Tensor& Z, const at::Tensor& w, const at::Tensor& db, double delta) {
  TORCH_CHECK(Z.dim() == 2 && Z.is_contiguous() && Z.scalar_type() == at::kFloat,
              "cppo_prefix_inside: Z must be a contiguous float32 [R, M] tensor");
  TORCH_CHECK(w.sizes() == Z.sizes() && w.is_contiguous() && w.scalar_type() == at::kFloat,
              "cppo_prefix_inside: w must be a contiguous float32 tensor of Z's shape");
  const int64_t R = Z.size(0), M = Z.size(1);
  check_per_row(db, R, at::kFloat, "cppo_prefix_inside", "db");
  auto out = at::empty({R, M}, Z.options().dtype(at::kBool));
  const float *pz = Z.const_data_ptr<float>(), *pw = w.const_data_ptr<float>(), *pdb = db.const_data_ptr<float>();
  bool* o = out.mutable_data_ptr<bool>();
  const float d = static_cast<float>(delta);  // the reference's `delta + R` and clamp take delta as an fp32 scalar
  at::parallel_for(0, R, row_grain(M), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *zr = pz + r * M, *wr = pw + r * M;
      const float b = pdb[r];
      bool* orow = o + r * M;
      double acc = 0.0;  // torch.cumsum's CPU accumulator for fp32 is double, rounded to fp32 at every position
      float prefix = 0.0f;
      for (int64_t t = 0; t < M; ++t) {
        const float z = zr[t];
        const float c = std::min(d + prefix, d);
        orow[t] = z <= c;
        const float bw = b * wr[t];
        acc += static_cast<double>(bw - z);
        prefix = static_cast<float>(acc);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlvr_kernels, CPU, m) {
  m.impl("row_rank_percentile", &row_rank_percentile);
  m.impl("row_topk_mask", &row_topk_mask);
  m.impl("row_order_stats", &row_order_stats);
  m.impl("cppo_prefix_inside", &cppo_prefix_inside);
}
