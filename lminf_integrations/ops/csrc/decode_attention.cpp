// One query per sequence over a whole key/value buffer: the attention of a decoding step.
//
// PyTorch's CPU flash kernel spends most of a single-query call on per-block overhead (a one-row GEMM per key
// block) and reads each key/value head once per query head. This kernel reads every key and value row once for all
// query heads of its group, keeps logits and weights in float32, and splits the keys into chunks so that both
// threads stream memory: partial softmaxes per chunk are merged by their maxima and sums (exact).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // keys per work unit: 32 KB of bf16 keys and values at head size 64
// The logit of a masked key. Built with -ffast-math, which assumes finite values, the kernel never holds -inf: a
// chunk whose keys are all masked gets a maximum near this, so its weight in the merge, exp(its max - the overall
// max), is 0 as long as any key is visible.
constexpr float kMasked = -1e30f;

// Sixteen floats: GCC/Clang vector extensions, lowered to AVX-512, AVX2 or SSE as the CPU has them.
typedef float Vec __attribute__((vector_size(64)));
typedef uint16_t Half16 __attribute__((vector_size(32)));
typedef uint32_t Word16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the high half of a float32
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec load(const c10::BFloat16* p) {
  Half16 h;
  std::memcpy(&h, p, sizeof(h));
  Word16 w = __builtin_convertvector(h, Word16) << 16;
  Vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset);
}

// Halving shuffles keep the lanes in registers (reading them one by one goes through memory, and slowly).
inline float sum(Vec v) {
  typedef float Vec8 __attribute__((vector_size(32)));
  typedef float Vec4 __attribute__((vector_size(16)));
  Vec8 half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  Vec4 quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
  quarter += __builtin_shufflevector(quarter, quarter, 2, 3, 0, 1);
  quarter += __builtin_shufflevector(quarter, quarter, 1, 0, 3, 2);
  return quarter[0];
}

// Lane j of the result: the sum of the lanes of d[j]. A tree of halving shuffles over 16 vectors at once costs
// about a fifth of sixteen separate sums; its last shuffle undoes the tree's bit-reversed lane order.
inline Vec sum16(const Vec* d) {
  Vec e[8], f[4], g[2];
  for (int i = 0; i < 8; ++i) {
    e[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    f[i] = __builtin_shufflevector(e[2 * i], e[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(e[2 * i], e[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    g[i] = __builtin_shufflevector(f[2 * i], f[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(f[2 * i], f[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  Vec h = __builtin_shufflevector(g[0], g[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
          __builtin_shufflevector(g[0], g[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return __builtin_shufflevector(h, h, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// kDim: the head size, a multiple of 16 known at compile time, so that a key or value row is kDim / 16 vectors.
template <typename T, int64_t kDim>
void decode_attention_kernel(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const c10::optional<at::Tensor>& mask, double scale, at::Tensor& out) {
  constexpr int64_t kVecs = kDim / kLanes;
  const int64_t batch = query.size(0), n_heads = query.size(1);
  const int64_t n_kv = key.size(1), n_keys = key.size(2);
  const int64_t group = n_heads / n_kv;
  const int64_t n_chunks = (n_keys + kChunk - 1) / kChunk;
  const int64_t n_units = batch * n_kv * n_chunks;

  const T* q = query.const_data_ptr<T>();
  const T* k = key.const_data_ptr<T>();
  const T* v = value.const_data_ptr<T>();
  const T* m = mask.has_value() ? mask->const_data_ptr<T>() : nullptr;
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1), vs2 = value.stride(2);
  const int64_t ms0 = m ? (mask->size(0) == 1 ? 0 : mask->stride(0)) : 0;
  const int64_t ms3 = m ? mask->stride(3) : 0;

  // Per unit and query head of the group: the chunk's maximum logit, its sum of weights, and its weighted values.
  std::vector<float> part_max(n_units * group), part_sum(n_units * group);
  std::vector<Vec> part_acc(n_units * group * kVecs);

  at::parallel_for(0, n_units, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> qv(group * kVecs);
    std::vector<float> logits(group * kChunk);
    std::vector<Vec> dots(group * kLanes);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t chunk = unit % n_chunks, h = (unit / n_chunks) % n_kv, b = unit / (n_chunks * n_kv);
      const int64_t first = chunk * kChunk, count = std::min(kChunk, n_keys - first);
      for (int64_t g = 0; g < group; ++g) {
        const T* qg = q + b * qs0 + (h * group + g) * qs1;
        for (int64_t c = 0; c < kVecs; ++c) qv[g * kVecs + c] = load(qg + c * kLanes) * static_cast<float>(scale);
      }
      // Logits: each key row is read once for all query heads of the group; 16 keys at a time, so that their
      // dot products are summed together (sum16).
      int64_t j = 0;
      for (; j + kLanes <= count; j += kLanes) {
        for (int64_t i = 0; i < kLanes; ++i) {
          const T* kr = k + b * ks0 + h * ks1 + (first + j + i) * ks2;
          // Ask for the next tile's keys and this row's values early: the buffers stream from memory.
          prefetch_row(kr + kLanes * ks2, kDim);
          prefetch_row(v + b * vs0 + h * vs1 + (first + j + i) * vs2, kDim);
          Vec row[kVecs];
          for (int64_t c = 0; c < kVecs; ++c) row[c] = load(kr + c * kLanes);
          for (int64_t g = 0; g < group; ++g) {
            Vec dot = qv[g * kVecs] * row[0];
            for (int64_t c = 1; c < kVecs; ++c) dot += qv[g * kVecs + c] * row[c];
            dots[g * kLanes + i] = dot;
          }
        }
        Vec bias{};
        if (m) {
          for (int64_t i = 0; i < kLanes; ++i) {
            bias[i] = std::max(to_float(m[b * ms0 + (first + j + i) * ms3]), kMasked);
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          const Vec sums = sum16(dots.data() + g * kLanes) + bias;
          std::memcpy(logits.data() + g * kChunk + j, &sums, sizeof(sums));
        }
      }
      for (; j < count; ++j) {  // the last keys of a buffer whose length is not a multiple of 16
        const T* kr = k + b * ks0 + h * ks1 + (first + j) * ks2;
        Vec row[kVecs];
        for (int64_t c = 0; c < kVecs; ++c) row[c] = load(kr + c * kLanes);
        const float bias = m ? std::max(to_float(m[b * ms0 + (first + j) * ms3]), kMasked) : 0.0f;
        for (int64_t g = 0; g < group; ++g) {
          Vec dot = qv[g * kVecs] * row[0];
          for (int64_t c = 1; c < kVecs; ++c) dot += qv[g * kVecs + c] * row[c];
          logits[g * kChunk + j] = sum(dot) + bias;
        }
      }
      // Softmax numerators against the chunk's own maximum.
      float* maxima = part_max.data() + unit * group;
      float* sums = part_sum.data() + unit * group;
      for (int64_t g = 0; g < group; ++g) {
        float* lg = logits.data() + g * kChunk;
        float top = std::numeric_limits<float>::lowest();
        for (int64_t j = 0; j < count; ++j) top = std::max(top, lg[j]);
        float total = 0.0f;
        for (int64_t j = 0; j < count; ++j) {
          lg[j] = std::exp(lg[j] - top);
          total += lg[j];
        }
        maxima[g] = top;
        sums[g] = total;
      }
      // Weighted values: each value row is read once for all query heads of the group.
      Vec* acc = part_acc.data() + unit * group * kVecs;
      for (int64_t i = 0; i < group * kVecs; ++i) acc[i] = Vec{};
      for (int64_t j = 0; j < count; ++j) {
        const T* vr = v + b * vs0 + h * vs1 + (first + j) * vs2;
        Vec row[kVecs];
        for (int64_t c = 0; c < kVecs; ++c) row[c] = load(vr + c * kLanes);
        for (int64_t g = 0; g < group; ++g) {
          const float w = logits[g * kChunk + j];
          for (int64_t c = 0; c < kVecs; ++c) acc[g * kVecs + c] += w * row[c];
        }
      }
    }
  });

  // Merge the chunks of every (sequence, query head): one softmax over all keys.
  T* o = out.data_ptr<T>();  // (B, 1, H, D), contiguous
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t head = 0; head < n_heads; ++head) {
      const int64_t h = head / group, g = head % group;
      const int64_t unit0 = (b * n_kv + h) * n_chunks;
      float top = std::numeric_limits<float>::lowest();
      for (int64_t c = 0; c < n_chunks; ++c) top = std::max(top, part_max[(unit0 + c) * group + g]);
      Vec merged[kVecs] = {};
      float total = 0.0f;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t at = (unit0 + c) * group + g;
        const float factor = std::exp(part_max[at] - top);
        total += factor * part_sum[at];
        for (int64_t i = 0; i < kVecs; ++i) merged[i] += factor * part_acc[at * kVecs + i];
      }
      T* dst = o + (b * n_heads + head) * kDim;
      for (int64_t i = 0; i < kVecs; ++i) {
        for (int64_t l = 0; l < kLanes; ++l) dst[i * kLanes + l] = static_cast<T>(merged[i][l] / total);
      }
    }
  }
}

template <typename T>
void dispatch_head_size(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const c10::optional<at::Tensor>& mask, double scale, at::Tensor& out) {
  switch (query.size(3)) {  // the head sizes of common models (and 16, of tiny test models)
    case 16: return decode_attention_kernel<T, 16>(query, key, value, mask, scale, out);
    case 32: return decode_attention_kernel<T, 32>(query, key, value, mask, scale, out);
    case 64: return decode_attention_kernel<T, 64>(query, key, value, mask, scale, out);
    case 80: return decode_attention_kernel<T, 80>(query, key, value, mask, scale, out);
    case 96: return decode_attention_kernel<T, 96>(query, key, value, mask, scale, out);
    case 128: return decode_attention_kernel<T, 128>(query, key, value, mask, scale, out);
    case 256: return decode_attention_kernel<T, 256>(query, key, value, mask, scale, out);
    default: TORCH_CHECK(false, "decode_attention: unsupported head size ", query.size(3));
  }
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "expected (B, H, L, D) tensors");
  TORCH_CHECK(query.size(2) == 1, "decode_attention takes one query per sequence, got ", query.size(2));
  TORCH_CHECK(key.sizes() == value.sizes(), "keys and values differ in shape");
  TORCH_CHECK(query.size(0) == key.size(0) && query.size(3) == key.size(3), "query and keys do not match");
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type(),
              "query, keys and values must share a dtype");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1, "head dimension must be dense");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 4 && (mask->size(0) == 1 || mask->size(0) == query.size(0)) && mask->size(1) == 1 &&
                    mask->size(2) == 1 && mask->size(3) == key.size(2),
                "mask must be (B or 1, 1, 1, n_keys)");
    TORCH_CHECK(mask->scalar_type() == query.scalar_type(), "mask must have the query's dtype");
  }
  at::Tensor out = at::empty({query.size(0), 1, query.size(1), query.size(3)}, query.options());
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kFloat,
              "decode_attention supports bfloat16 and float32");
  if (query.scalar_type() == at::kBFloat16) {
    dispatch_head_size<c10::BFloat16>(query, key, value, mask, scale, out);
  } else {
    dispatch_head_size<float>(query, key, value, mask, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lminf, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lminf, CPU, m) { m.impl("decode_attention", &decode_attention); }
