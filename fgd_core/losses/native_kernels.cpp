// The full-size work of one FGD level (fgd_core/losses/dense.py has the algebra) as two kernels,
// one forward and one backward, plain loops over float32 features laid out (B, C, N), N = H * W.
//
// Work is cut into items of one image and a run of at most L cells (L <= MAX_RUN). An item keeps
// its per-cell accumulators (a few runs of L floats) in a local buffer and goes twice over the
// channel rows of its run: first for the sums over channels per cell, then, with the per-cell
// weights those give, for the sums over cells per channel (and the gradient). The second sweep
// reads the item's rows again from the caches, so each kernel reads every element of both
// features from memory once. The inner loops go along the contiguous cells, two channel rows at a
// step. Sums over cells are taken per item and written to a partial buffer (B, K, ..., C),
// K = ceil(N / L), with the item's softmax shifts, for the caller to combine. Items are shared
// among `threads` OpenMP threads.
//
// Built by fgd_core/losses/native.py with -O3 -march=native -fopenmp, loaded with ctypes.

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t MAX_RUN = 2048;
// Per-cell runs that an item accumulates into are rows of a local buffer, its stride 64 bytes off
// a multiple of 4 KB so that the rows never sit at equal offsets of 4 KB pages (which x86 cores
// can mistake for a store-to-load dependency).
constexpr int64_t RUN_STRIDE = MAX_RUN + 16;

inline int64_t chunk_count(int64_t n, int64_t len) { return (n + len - 1) / len; }

// Eight floats in GCC/Clang vector extensions (AVX registers where the CPU has them). Sums over a
// run are kept in vector accumulators and added up once per row.
typedef float vf __attribute__((vector_size(32)));
typedef int vi __attribute__((vector_size(32)));
typedef float vf_u __attribute__((vector_size(32), aligned(4)));  // unaligned loads and stores
constexpr int64_t W = 8;

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }
inline vf vabs(vf x) { return reinterpret_cast<vf>(reinterpret_cast<vi>(x) & 0x7fffffff); }
inline vf vsign(vf x) { return __builtin_convertvector((x < 0.f) - (x > 0.f), vf); }
inline vf zero() { return splat(0.f); }
inline float hsum(vf v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float sign_of(float x) { return static_cast<float>(x > 0.f) - static_cast<float>(x < 0.f); }

}  // namespace

// The sweeps over channel rows, R rows at a time: a per-cell run is loaded and stored once for R
// rows, per-cell inputs are loaded once for R rows, and the R rows' sums are independent chains.
// Arguments indexed [r] are per row. Vector steps go up to the largest multiple of W in the run,
// scalar steps do the rest.

// Forward, first sweep: |T|, |S| and the logits into the runs; |T|, |S| summed per row.
template <int R>
inline void sweep_sums(const float* const* sr, const float* const* tr, const float* wt,
                       const float* ws, int64_t len, float* __restrict__ cell_t,
                       float* __restrict__ cell_s, float* __restrict__ logit_t,
                       float* __restrict__ logit_s, float* sum_t, float* sum_s) {
  vf acc_t[R], acc_s[R], wt_v[R], ws_v[R];
  for (int r = 0; r < R; ++r) {
    acc_t[r] = acc_s[r] = zero();
    wt_v[r] = splat(wt[r]);
    ws_v[r] = splat(ws[r]);
  }
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    vf ct = load(cell_t + i), cs = load(cell_s + i), lt = load(logit_t + i),
       ls = load(logit_s + i);
    for (int r = 0; r < R; ++r) {
      const vf x = load(sr[r] + i), y = load(tr[r] + i);
      const vf at = vabs(y), as = vabs(x);
      ct += at;
      cs += as;
      lt += wt_v[r] * y;
      ls += ws_v[r] * x;
      acc_t[r] += at;
      acc_s[r] += as;
    }
    store(cell_t + i, ct);
    store(cell_s + i, cs);
    store(logit_t + i, lt);
    store(logit_s + i, ls);
  }
  for (int r = 0; r < R; ++r) {
    sum_t[r] = hsum(acc_t[r]);
    sum_s[r] = hsum(acc_s[r]);
  }
  for (; i < len; ++i) {
    for (int r = 0; r < R; ++r) {
      const float x = sr[r][i], y = tr[r][i];
      cell_t[i] += std::fabs(y);
      cell_s[i] += std::fabs(x);
      logit_t[i] += wt[r] * y;
      logit_s[i] += ws[r] * x;
      sum_t[r] += std::fabs(y);
      sum_s[r] += std::fabs(x);
    }
  }
}

// Forward, second sweep: per row, sums of w_fg D^2, w_bg D^2, D^2, S e_s, T e_t and D
// (out[r][0..5]).
template <int R>
inline void sweep_focal(const float* const* sr, const float* const* tr, int64_t len,
                        const float* __restrict__ w_fg, const float* __restrict__ w_bg,
                        const float* __restrict__ e_s, const float* __restrict__ e_t,
                        float (*out)[6]) {
  vf f[R], g[R], q[R], cs[R], ct[R], ds[R];
  for (int r = 0; r < R; ++r) f[r] = g[r] = q[r] = cs[r] = ct[r] = ds[r] = zero();
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    const vf wf = load(w_fg + i), wb = load(w_bg + i), es = load(e_s + i), et = load(e_t + i);
    for (int r = 0; r < R; ++r) {
      const vf x = load(sr[r] + i), y = load(tr[r] + i);
      const vf d = x - y;
      const vf d2 = d * d;
      f[r] += wf * d2;
      g[r] += wb * d2;
      q[r] += d2;
      cs[r] += x * es;
      ct[r] += y * et;
      ds[r] += d;
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r][0] = hsum(f[r]);
    out[r][1] = hsum(g[r]);
    out[r][2] = hsum(q[r]);
    out[r][3] = hsum(cs[r]);
    out[r][4] = hsum(ct[r]);
    out[r][5] = hsum(ds[r]);
  }
  for (; i < len; ++i) {
    for (int r = 0; r < R; ++r) {
      const float x = sr[r][i], y = tr[r][i];
      const float d = x - y;
      out[r][0] += w_fg[i] * d * d;
      out[r][1] += w_bg[i] * d * d;
      out[r][2] += d * d;
      out[r][3] += x * e_s[i];
      out[r][4] += y * e_t[i];
      out[r][5] += d;
    }
  }
}

// Backward, first sweep: g_ctx . F into the runs.
template <int R>
inline void sweep_project(const float* const* sr, const float* const* tr, const float* gs,
                          const float* gt, int64_t len, float* __restrict__ u_s,
                          float* __restrict__ u_t) {
  vf gs_v[R], gt_v[R];
  for (int r = 0; r < R; ++r) {
    gs_v[r] = splat(gs[r]);
    gt_v[r] = splat(gt[r]);
  }
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    vf us = load(u_s + i), ut = load(u_t + i);
    for (int r = 0; r < R; ++r) {
      us += gs_v[r] * load(sr[r] + i);
      ut += gt_v[r] * load(tr[r] + i);
    }
    store(u_s + i, us);
    store(u_t + i, ut);
  }
  for (; i < len; ++i) {
    for (int r = 0; r < R; ++r) {
      u_s[i] += gs[r] * sr[r][i];
      u_t[i] += gt[r] * tr[r][i];
    }
  }
}

// Per-channel factors of the student gradient (fgd_backward).
struct GradRow {
  float g_dsum, g_ctx, w, a, g_chan;
};

// Backward, second sweep: the student gradient rows (unless gr is null) and per row the sums of
// S g_logit_s and T g_logit_t (out[r][0..1]).
template <int R>
inline void sweep_grad(const float* const* sr, const float* const* tr, float* const* gr,
                       const GradRow* f, int64_t len, const float* __restrict__ p_s,
                       const float* __restrict__ lg_s, const float* __restrict__ lg_t,
                       const float* __restrict__ g_e, const float* __restrict__ g_q,
                       const float* __restrict__ g_cell, float (*out)[2]) {
  vf acc_s[R], acc_t[R];
  for (int r = 0; r < R; ++r) acc_s[r] = acc_t[r] = zero();
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    const vf p = load(p_s + i), ls = load(lg_s + i), lt = load(lg_t + i);
    const vf ge = load(g_e + i), gq = load(g_q + i), gc = load(g_cell + i);
    for (int r = 0; r < R; ++r) {
      const vf x = load(sr[r] + i), y = load(tr[r] + i);
      if (gr[0] != nullptr) {
        store(gr[r] + i, f[r].g_dsum + f[r].g_ctx * p + f[r].w * ls +
                             2.f * (x - y) * (f[r].a * ge + gq) + vsign(x) * (f[r].g_chan + gc));
      }
      acc_s[r] += x * ls;
      acc_t[r] += y * lt;
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r][0] = hsum(acc_s[r]);
    out[r][1] = hsum(acc_t[r]);
  }
  for (; i < len; ++i) {
    for (int r = 0; r < R; ++r) {
      const float x = sr[r][i], y = tr[r][i];
      if (gr[0] != nullptr) {
        gr[r][i] = f[r].g_dsum + f[r].g_ctx * p_s[i] + f[r].w * lg_s[i] +
                   2.f * (x - y) * (f[r].a * g_e[i] + g_q[i]) +
                   sign_of(x) * (f[r].g_chan + g_cell[i]);
      }
      out[r][0] += x * lg_s[i];
      out[r][1] += y * lg_t[i];
    }
  }
}

// Rows of both features (and of the gradient) for channels c..c+R of image b, from cell n0.
template <int R>
struct Rows {
  const float* s[R];
  const float* t[R];
  float* g[R];
  Rows(const float* s_, const float* t_, float* g_, int64_t b, int64_t c, int64_t C, int64_t N,
       int64_t n0) {
    for (int r = 0; r < R; ++r) {
      const int64_t off = (b * C + c + r) * N + n0;
      s[r] = s_ + off;
      t[r] = t_ + off;
      g[r] = g_ != nullptr ? g_ + off : nullptr;
    }
  }
};

constexpr int ROWS = 2;  // rows per step of a sweep

extern "C" {

// Forward. Per cell: sum over channels of |T| and |S| (cell) and the context logits w . F
// without the bias (logit), each (B, 2, N), the teacher first. Per item: the largest teacher
// spatial logit x = cell_T / (C temp) and the largest logits (item_max, (B, K, 3): x, teacher,
// student). Per item and channel (part, (B, K, 8, C)), with e_x = exp(x - max x) and
// e_t, e_s likewise for the logits:
//   0 sum |T|, 1 sum |S|, 2 sum fg e_x D^2, 3 sum bg e_x D^2, 4 sum D^2,
//   5 sum S e_s, 6 sum T e_t, 7 sum D                     (sums over the item's cells)
void fgd_forward(const float* __restrict__ s, const float* __restrict__ t,
                 const float* __restrict__ s_w, const float* __restrict__ t_w,
                 const float* __restrict__ fg, const float* __restrict__ bg, float inv_ct,
                 int64_t B, int64_t C, int64_t N, int64_t L, int threads,
                 float* __restrict__ cell, float* __restrict__ logit,
                 float* __restrict__ item_max, float* __restrict__ part) {
  const int64_t K = chunk_count(N, L);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < B * K; ++item) {
    const int64_t b = item / K, k = item % K, n0 = k * L, len = std::min(L, N - n0);
    alignas(64) float runs[8 * RUN_STRIDE];
    float* __restrict__ cell_t = runs;
    float* __restrict__ cell_s = runs + RUN_STRIDE;
    float* __restrict__ logit_t = runs + 2 * RUN_STRIDE;
    float* __restrict__ logit_s = runs + 3 * RUN_STRIDE;
    std::fill(runs, runs + 4 * RUN_STRIDE, 0.f);
    float* __restrict__ out = part + item * 8 * C;
    int64_t c = 0;
    for (; c + ROWS <= C; c += ROWS) {
      const Rows<ROWS> rows(s, t, nullptr, b, c, C, N, n0);
      sweep_sums<ROWS>(rows.s, rows.t, t_w + c, s_w + c, len, cell_t, cell_s, logit_t, logit_s,
                       out + c, out + C + c);
    }
    for (; c < C; ++c) {
      const Rows<1> rows(s, t, nullptr, b, c, C, N, n0);
      sweep_sums<1>(rows.s, rows.t, t_w + c, s_w + c, len, cell_t, cell_s, logit_t, logit_s,
                    out + c, out + C + c);
    }
    float max_x = -INFINITY, max_t = -INFINITY, max_s = -INFINITY;
    for (int64_t i = 0; i < len; ++i) {
      max_x = std::max(max_x, cell_t[i] * inv_ct);
      max_t = std::max(max_t, logit_t[i]);
      max_s = std::max(max_s, logit_s[i]);
    }
    item_max[item * 3] = max_x;
    item_max[item * 3 + 1] = max_t;
    item_max[item * 3 + 2] = max_s;
    std::copy(cell_t, cell_t + len, cell + (b * 2) * N + n0);
    std::copy(cell_s, cell_s + len, cell + (b * 2 + 1) * N + n0);
    std::copy(logit_t, logit_t + len, logit + (b * 2) * N + n0);
    std::copy(logit_s, logit_s + len, logit + (b * 2 + 1) * N + n0);
    float* __restrict__ w_fg = runs + 4 * RUN_STRIDE;
    float* __restrict__ w_bg = runs + 5 * RUN_STRIDE;
    float* __restrict__ e_t = runs + 6 * RUN_STRIDE;
    float* __restrict__ e_s = runs + 7 * RUN_STRIDE;
    const float* __restrict__ fg_b = fg + b * N + n0;
    const float* __restrict__ bg_b = bg + b * N + n0;
    for (int64_t i = 0; i < len; ++i) {
      const float e_x = std::exp(cell_t[i] * inv_ct - max_x);
      w_fg[i] = fg_b[i] * e_x;
      w_bg[i] = bg_b[i] * e_x;
      e_t[i] = std::exp(logit_t[i] - max_t);
      e_s[i] = std::exp(logit_s[i] - max_s);
    }
    float sums[ROWS][6];
    for (c = 0; c < C;) {
      const int step = c + ROWS <= C ? ROWS : 1;
      if (step == ROWS) {
        const Rows<ROWS> rows(s, t, nullptr, b, c, C, N, n0);
        sweep_focal<ROWS>(rows.s, rows.t, len, w_fg, w_bg, e_s, e_t, sums);
      } else {
        const Rows<1> rows(s, t, nullptr, b, c, C, N, n0);
        sweep_focal<1>(rows.s, rows.t, len, w_fg, w_bg, e_s, e_t, sums);
      }
      for (int r = 0; r < step; ++r)
        for (int j = 0; j < 6; ++j) out[(2 + j) * C + c + r] = sums[r][j];
      c += step;
    }
  }
}

// Backward. Per cell, the context logit gradients (lg, (B, 2, N), the student first)
//   g_logit = p (g_ctx . F - k),  k = g_ctx . ctx (per image, given),
// then the student gradient (skipped when grad is null)
//   grad = g_dsum[c] + g_ctx_s[c] p_s[n] + w[c] g_logit_s[n] + 2 D (a[c] g_e[n] + g_q[n])
//          + sign(S) (g_chan[c] + g_cell[n])
// and per item and channel (w_part, (B, K, 2, C)) the logit-conv weight gradients
// sum_n S g_logit_s[n] and sum_n T g_logit_t[n].
//   chan: (B, 6, C) g_dsum, g_ctx_s, w, a, g_chan, g_ctx_t; cells: (B, 5, N) p_s, p_t, g_e, g_q,
//   g_cell; k: (B, 2) student, teacher.
void fgd_backward(const float* __restrict__ s, const float* __restrict__ t,
                  const float* __restrict__ chan, const float* __restrict__ cells,
                  const float* __restrict__ k_ctx, int64_t B, int64_t C, int64_t N, int64_t L,
                  int threads, float* __restrict__ lg, float* __restrict__ grad,
                  float* __restrict__ w_part) {
  const int64_t K = chunk_count(N, L);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < B * K; ++item) {
    const int64_t b = item / K, k = item % K, n0 = k * L, len = std::min(L, N - n0);
    const float* __restrict__ cb = chan + b * 6 * C;
    const float* __restrict__ p_s = cells + (b * 5) * N + n0;
    const float* __restrict__ p_t = cells + (b * 5 + 1) * N + n0;
    const float* __restrict__ g_e = cells + (b * 5 + 2) * N + n0;
    const float* __restrict__ g_q = cells + (b * 5 + 3) * N + n0;
    const float* __restrict__ g_cell = cells + (b * 5 + 4) * N + n0;
    alignas(64) float runs[2 * RUN_STRIDE];
    float* __restrict__ lg_s = runs;
    float* __restrict__ lg_t = runs + RUN_STRIDE;
    std::fill(runs, runs + 2 * RUN_STRIDE, 0.f);
    int64_t c = 0;
    for (; c + ROWS <= C; c += ROWS) {
      const Rows<ROWS> rows(s, t, nullptr, b, c, C, N, n0);
      sweep_project<ROWS>(rows.s, rows.t, cb + C + c, cb + 5 * C + c, len, lg_s, lg_t);
    }
    for (; c < C; ++c) {
      const Rows<1> rows(s, t, nullptr, b, c, C, N, n0);
      sweep_project<1>(rows.s, rows.t, cb + C + c, cb + 5 * C + c, len, lg_s, lg_t);
    }
    const float k_s = k_ctx[b * 2], k_t = k_ctx[b * 2 + 1];
    for (int64_t i = 0; i < len; ++i) {
      lg_s[i] = p_s[i] * (lg_s[i] - k_s);
      lg_t[i] = p_t[i] * (lg_t[i] - k_t);
    }
    std::copy(lg_s, lg_s + len, lg + (b * 2) * N + n0);
    std::copy(lg_t, lg_t + len, lg + (b * 2 + 1) * N + n0);
    float* __restrict__ wg = w_part + item * 2 * C;
    float sums[ROWS][2];
    for (c = 0; c < C;) {
      const int step = c + ROWS <= C ? ROWS : 1;
      GradRow f[ROWS];
      for (int r = 0; r < step; ++r)
        f[r] = {cb[c + r], cb[C + c + r], cb[2 * C + c + r], cb[3 * C + c + r], cb[4 * C + c + r]};
      if (step == ROWS) {
        const Rows<ROWS> rows(s, t, grad, b, c, C, N, n0);
        sweep_grad<ROWS>(rows.s, rows.t, rows.g, f, len, p_s, lg_s, lg_t, g_e, g_q, g_cell, sums);
      } else {
        const Rows<1> rows(s, t, grad, b, c, C, N, n0);
        sweep_grad<1>(rows.s, rows.t, rows.g, f, len, p_s, lg_s, lg_t, g_e, g_q, g_cell, sums);
      }
      for (int r = 0; r < step; ++r) {
        wg[c + r] = sums[r][0];
        wg[C + c + r] = sums[r][1];
      }
      c += step;
    }
  }
}

}  // extern "C"
