// The two passes of the routed AdamW step over fp32 segments, for the CPU.
//
// Each pass reads and writes every element exactly once, in SIMD loops spread over OpenMP threads,
// so the step runs at memory speed instead of chaining tensor ops that each stream the data again:
//   pass 1 (all segments):     m, v <- AdamW moments;  partial[s] = sum of the score term
//   pass 2 (winning segments): p <- p * (1 - lr*wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
// The work is cut into fixed-size chunks and the per-chunk sums are added in chunk order, so the
// result does not depend on the number of threads.
//
// Plain C ABI, loaded with ctypes by molf_ds/cpu_kernel.py: no torch headers, builds in ~1 s.
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 14;

struct Chunk {
  int64_t segment;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(int64_t n_segments, const int64_t* numels) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < n_segments; ++s) {
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
double moments_chunk(const float* __restrict g, float* __restrict m, float* __restrict v,
                     int64_t n, int32_t kind, float beta1, float beta2, float w1, float w2,
                     float eps) {
  double acc = 0.0;
  if (kind == kNone) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
      m[i] = beta1 * m[i] + w1 * gi;
      v[i] = beta2 * v[i] + w2 * gi * gi;
    }
  } else if (kind == kEpd) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
      const float mi = beta1 * m[i] + w1 * gi;
      const float vi = beta2 * v[i] + w2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      acc += static_cast<double>(mi * mi / (std::sqrt(vi) + eps));
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
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

// Pass 1. score_kinds[s]: -1 = moments only (unrouted parameter), 0 = EPD, 1 = PFN.
// partials[s] receives the segment's unweighted score sum.
void molf_moments_and_partials(int64_t n_segments, float* const* grads, float* const* exp_avgs,
                               float* const* exp_avg_sqs, const int64_t* numels,
                               const int32_t* score_kinds, float beta1, float beta2,
                               float one_minus_beta1, float one_minus_beta2, float eps,
                               double* partials, int32_t n_threads) {
  const std::vector<Chunk> chunks = make_chunks(n_segments, numels);
  std::vector<double> chunk_sums(chunks.size(), 0.0);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const int64_t s = ch.segment;
    chunk_sums[c] = moments_chunk(grads[s] + ch.begin, exp_avgs[s] + ch.begin,
                                  exp_avg_sqs[s] + ch.begin, ch.end - ch.begin, score_kinds[s],
                                  beta1, beta2, one_minus_beta1, one_minus_beta2, eps);
  }
  for (int64_t s = 0; s < n_segments; ++s) partials[s] = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) partials[chunks[c].segment] += chunk_sums[c];
}

// Pass 2: the decoupled AdamW update of the given (winning) segments.
void molf_apply_update(int64_t n_segments, float* const* params, float* const* exp_avgs,
                       float* const* exp_avg_sqs, const int64_t* numels, const float* decays,
                       const float* step_sizes, const float* bias_correction2_sqrts, float eps,
                       int32_t n_threads) {
  const std::vector<Chunk> chunks = make_chunks(n_segments, numels);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const int64_t s = ch.segment;
    float* __restrict p = params[s] + ch.begin;
    const float* __restrict m = exp_avgs[s] + ch.begin;
    const float* __restrict v = exp_avg_sqs[s] + ch.begin;
    const float decay = decays[s];
    const float step_size = step_sizes[s];
    const float bc2_sqrt = bias_correction2_sqrts[s];
    const int64_t n = ch.end - ch.begin;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
      p[i] = p[i] * decay - step_size * (m[i] / denom);
    }
  }
}

}  // extern "C"
