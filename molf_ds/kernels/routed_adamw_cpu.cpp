// The two passes of the routed AdamW step over fp32 segments, for the CPU.
//
// Each pass reads and writes every element exactly once, in SIMD loops spread over OpenMP threads,
// so the step runs at memory speed instead of chaining tensor ops that each stream the data again:
//   pass 1 (all segments):     m, v <- AdamW moments;  partial[s] = sum of the score term;
//                              unrouted segments also take their update (it waits for no routing)
//   pass 2 (winning segments): p <- p * (1 - lr*wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
// Both passes take the same per-segment arrays (built once per step); pass 2 a mask of winners.
// A third function copies spans of one buffer into another (ZeRO-Offload's copy-back).
// The work is cut into fixed-size chunks and the per-chunk sums are added in chunk order, so the
// result does not depend on the number of threads.
//
// Plain C ABI, loaded with ctypes by molf_ds/cpu_kernel.py: no torch headers, builds in ~1 s.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 14;

struct Chunk {
  int64_t segment;
  int64_t begin;
  int64_t end;
};

// The chunks of every segment, or of those whose ``selected`` entry is non-zero.
std::vector<Chunk> make_chunks(int64_t n_segments, const int64_t* numels,
                               const uint8_t* selected = nullptr) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < n_segments; ++s) {
    if (selected != nullptr && selected[s] == 0) continue;
    for (int64_t begin = 0; begin < numels[s]; begin += kChunk) {
      int64_t end = begin + kChunk < numels[s] ? begin + kChunk : numels[s];
      chunks.push_back({s, begin, end});
    }
  }
  return chunks;
}

enum ScoreKind : int32_t { kNone = -1, kEpd = 0, kPfn = 1 };

// w1 = 1 - beta1 and w2 = 1 - beta2 come in computed in double: in float, 1 - 0.999f loses
// five digits to cancellation.
struct Update {
  float decay;      // 1 - lr * wd
  float step_size;  // lr / (1 - beta1^t)
  float bc2_sqrt;   // sqrt(1 - beta2^t)
};

// The decoupled AdamW update of one element, the same expression in both passes.
inline float updated(float p, float m, float v, const Update& u, float eps) {
  const float denom = std::sqrt(v) / u.bc2_sqrt + eps;
  return p * u.decay - u.step_size * (m / denom);
}

// g_factor multiplies each gradient as it is read (a ZeRO wrapper's unscale-and-clip factor,
// 1 otherwise): the same rounded product a separate pass over the gradients would store.
double moments_chunk(float* __restrict p, const float* __restrict g, float* __restrict m,
                     float* __restrict v, int64_t n, int32_t kind, const Update& update,
                     float beta1, float beta2, float w1, float w2, float eps, float g_factor) {
  double acc = 0.0;
  if (kind == kNone) {  // unrouted: the whole AdamW step in one pass over the memory
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * g_factor;
      const float mi = beta1 * m[i] + w1 * gi;
      const float vi = beta2 * v[i] + w2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] = updated(p[i], mi, vi, update, eps);
    }
  } else if (kind == kEpd) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * g_factor;
      const float mi = beta1 * m[i] + w1 * gi;
      const float vi = beta2 * v[i] + w2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      acc += static_cast<double>(mi * mi / (std::sqrt(vi) + eps));
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * g_factor;
      const float mi = beta1 * m[i] + w1 * gi;
      const float vi = beta2 * v[i] + w2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      const float u = mi / (std::sqrt(vi) + eps);
      acc += static_cast<double>(u * u);
    }
  }
  return acc;
}

}  // namespace

extern "C" {

// Pass 1. score_kinds[s]: -1 = unrouted (moments and update, with decays/step_sizes/bc2s[s]),
// 0 = EPD, 1 = PFN. partials[s] receives the segment's unweighted score sum. Every gradient is
// read multiplied by grad_factor.
void molf_moments_and_partials(int64_t n_segments, float* const* params, float* const* grads,
                               float* const* exp_avgs, float* const* exp_avg_sqs,
                               const int64_t* numels, const int32_t* score_kinds,
                               const float* decays, const float* step_sizes,
                               const float* bias_correction2_sqrts, float beta1, float beta2,
                               float one_minus_beta1, float one_minus_beta2, float eps,
                               float grad_factor, double* partials, int32_t n_threads) {
  const std::vector<Chunk> chunks = make_chunks(n_segments, numels);
  std::vector<double> chunk_sums(chunks.size(), 0.0);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const int64_t s = ch.segment;
    const Update update{decays[s], step_sizes[s], bias_correction2_sqrts[s]};
    chunk_sums[c] = moments_chunk(params[s] + ch.begin, grads[s] + ch.begin,
                                  exp_avgs[s] + ch.begin, exp_avg_sqs[s] + ch.begin,
                                  ch.end - ch.begin, score_kinds[s], update, beta1, beta2,
                                  one_minus_beta1, one_minus_beta2, eps, grad_factor);
  }
  for (int64_t s = 0; s < n_segments; ++s) partials[s] = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) partials[chunks[c].segment] += chunk_sums[c];
}

// Pass 2: the decoupled AdamW update of the segments whose ``selected`` entry is non-zero (the
// winners), with the same arrays as pass 1.
void molf_apply_update(int64_t n_segments, float* const* params, float* const* exp_avgs,
                       float* const* exp_avg_sqs, const int64_t* numels, const uint8_t* selected,
                       const float* decays, const float* step_sizes,
                       const float* bias_correction2_sqrts, float eps, int32_t n_threads) {
  const std::vector<Chunk> chunks = make_chunks(n_segments, numels, selected);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const int64_t s = ch.segment;
    float* __restrict p = params[s] + ch.begin;
    const float* __restrict m = exp_avgs[s] + ch.begin;
    const float* __restrict v = exp_avg_sqs[s] + ch.begin;
    const Update update{decays[s], step_sizes[s], bias_correction2_sqrts[s]};
    const int64_t n = ch.end - ch.begin;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = updated(p[i], m[i], v[i], update, eps);
  }
}

// Copy the spans (starts[k], numels[k]) of src into dst, in one parallel region: ZeRO-Offload's
// copy of a step's changed slices into the model's partition. One call per span would pay a
// thread fork and join each (tens of microseconds on a loaded machine), more than the copy of
// a small span takes.
void molf_copy_spans(float* dst, const float* src, const int64_t* starts, const int64_t* numels,
                     int64_t n_spans, int32_t n_threads) {
  const std::vector<Chunk> chunks = make_chunks(n_spans, numels);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const int64_t at = starts[ch.segment] + ch.begin;
    std::memcpy(dst + at, src + at, sizeof(float) * (ch.end - ch.begin));
  }
}

}  // extern "C"
