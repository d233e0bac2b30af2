// The CUDA kernels' tile algorithm (docs/design.md, "CUDA kernels: tiles"), written as phases of
// __host__ __device__ functions of (block, thread index, shared memory). The CUDA kernel runs the
// phases of its block with a barrier between them; the CPU module can emulate a whole block
// (emulate_tiles: for each phase, every thread index in turn), so the tests run the exact CUDA
// indexing (tiles, halos, wraparound) against the reference on a machine without a GPU.
//
// A block owns a th x tw tile (multiples of s) of one (b, c) plane. Phases (TileStep):
//   load   the tile of every input plane, the DCT matrix and the sample's factors F into shared
//          memory; for noise, eps of the tile and eps2 of the tile plus its s - 1 halo rows and
//          columns (wrapping around the image), drawn or read once per cell of that window;
//   hsum   horizontal s-sums of eps2 along each window row;
//   noise  vertical s-sums of those: the relay noise of each pixel (stored for relay_noise;
//          fused with the first transform pass otherwise);
//   A, B   separable transform passes: A mixes the s rows of each patch (x -> t), B the s columns
//          (t -> x); the last B pass combines the terms of the update and stores the output.
//   A2, B2 second-order relay_step: the forward passes again, on xd = x0b - x0, B2 adding E times
//          its coefficients to F U (patch.h second_order_coef).
// Every phase loops over the cells of its array with consecutive threads on consecutive columns,
// so global loads and stores are coalesced where the W stride is 1.
#pragma once
#include <algorithm>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "patch.h"

namespace relayops {

constexpr int kTileThreads = 256;  // threads per block, at most

enum TileStep : int {
  kStepLoad, kStepHSum, kStepNoise, kStepNoiseFwdA, kStepFwdA, kStepFwdB, kStepInvA, kStepInvB, kStepFwdA2, kStepFwdB2
};

// Launch geometry and shared-memory layout, chosen on the host (make_tile_geom) and passed to the
// kernel by value.
struct TileGeom {
  int th, tw;                       // tile height and width: multiples of s, at most H and W
  int64_t tiles_y, tiles_x, blocks; // tiles per plane row and column; blocks = planes * tiles
  int threads;                      // threads per block
  int halo;                         // s - 1 when the block-noise term is computed (has_block), else 0
  int gw;                           // row stride of the eps2 window, tw + halo
  // Shared-memory arrays, offsets in elements of the accumulation type (-1: not needed).
  int off_c, off_f, off_e, off_x, off_xk, off_xd, off_n, off_g, off_hs;
  int smem_elems;
  int nsteps;
  uint32_t steps;  // step k (a TileStep) in bits 4k..4k+3: no indexed parameter array on the device
};

RELAYOPS_HD int tile_step(const TileGeom& g, int k) { return int((g.steps >> (4 * k)) & 15u); }

// Pointers into one block's shared memory.
template <class A>
struct TileSmem {
  A* c;   // [s * s] DCT matrix
  A* f;   // [s * s] the sample's factors F (blur, corrupt, step)
  A* e;   // [s * s] the sample's correction factor E (second-order step)
  A* x;   // [th * tw] transform input (x; x0_hat or Heun's x0_eff for relay_step), then F U
  A* xk;  // [th * tw] x of relay_step
  A* xd;  // [th * tw] x0b - x0 (second-order step)
  A* n;   // [th * tw] eps, then the relay noise
  A* g;   // [(th + halo) * gw] eps2 window; after hsum, t: the A passes' output [th * tw]
  A* hs;  // [(th + halo) * tw] horizontal s-sums of the window rows
};

template <class A>
RELAYOPS_HD TileSmem<A> tile_smem(const TileGeom& g, void* base) {
  A* p = static_cast<A*>(base);
  const auto at = [p](int off) { return off < 0 ? nullptr : p + off; };
  return {at(g.off_c), at(g.off_f), at(g.off_e), at(g.off_x), at(g.off_xk), at(g.off_xd), at(g.off_n), at(g.off_g),
          at(g.off_hs)};
}

// Which tile of which plane block blk handles (planes outermost, so neighbouring blocks share halos).
struct TileBlock {
  int64_t b, c, h0, w0;
  int th, tw;  // this tile's extent: the last tile of a row or column may be cut by the image edge
};

template <class A>
RELAYOPS_HD TileBlock tile_block(const Params<A>& P, const TileGeom& g, int64_t blk) {
  const int64_t per_plane = g.tiles_y * g.tiles_x;
  const int64_t plane = blk / per_plane, t = blk - plane * per_plane;
  const int64_t ty = t / g.tiles_x, tx = t - ty * g.tiles_x;
  TileBlock tb;
  tb.b = plane / P.C;
  tb.c = plane - tb.b * P.C;
  tb.h0 = ty * g.th;
  tb.w0 = tx * g.tw;
  tb.th = int(P.H - tb.h0 < g.th ? P.H - tb.h0 : g.th);
  tb.tw = int(P.W - tb.w0 < g.tw ? P.W - tb.w0 : g.tw);
  return tb;
}

// f(r, q) for every cell of a rows x cols array, cells tid, tid + nt, ... in row-major order:
// consecutive threads take consecutive columns. Row and column advance without a division.
template <class F>
RELAYOPS_HD void for_cells(int rows, int cols, int tid, int nt, F&& f) {
  const int count = rows * cols;
  if (tid >= count) return;
  int r = tid / cols, q = tid - r * cols;
  const int dr = nt / cols, dq = nt - dr * cols;
  for (int e = tid; e < count; e += nt) {
    f(r, q);
    r += dr;
    q += dq;
    if (q >= cols) {
      q -= cols;
      ++r;
    }
  }
}

// for_cells in batches of K cells per thread: K loads (load(r, q) returns the cell's values)
// are issued before the K shared-memory stores (store(r, q, v)), so each thread has K loads in
// flight instead of one.
template <int K, class Load, class Store>
RELAYOPS_HD void for_cells_batched(int rows, int cols, int tid, int nt, Load&& load, Store&& store) {
  using V = decltype(load(0, 0));
  const int count = rows * cols;
  if (tid >= count) return;
  int r = tid / cols, q = tid - r * cols;
  const int dr = nt / cols, dq = nt - dr * cols;
  for (int e = tid; e < count; e += K * nt) {
    V v[K]{};  // cells past the end are neither loaded nor stored
    int rk[K], qk[K];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < K; ++k) {
      rk[k] = r;
      qk[k] = q;
      if (e + k * nt < count) v[k] = load(r, q);
      r += dr;
      q += dq;
      if (q >= cols) {
        q -= cols;
        ++r;
      }
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < K; ++k)
      if (e + k * nt < count) store(rk[k], qk[k], v[k]);
  }
}

// Cells per thread in one load batch: 4, or 2 for float64 (two registers per value: with 4 the
// relay_step loads need more registers than the kernel's launch bounds leave).
template <class A>
constexpr int kLoadBatch = 16 / int(sizeof(A));

// ---- Phases ----

template <int S, class T, class A>
RELAYOPS_HD void tile_load(const Params<A>& P, const TileGeom& g, const TileBlock& tb, int tid,
                           const TileSmem<A>& sm) {
  const int n = S ? S : P.s, nt = g.threads;
  const int64_t b = tb.b, c = tb.c;
  const SampleScalars<A> ss = sample_scalars(P, b);
  if (sm.c)
    for (int e = tid; e < n * n; e += nt) {
      sm.c[e] = P.dct[e];
      if (sm.f) sm.f[e] = coef_factor(P, ss, b, e / n, e % n);
      if (sm.e) sm.e[e] = correction_factor(P, b, e / n, e % n);
    }
  if (P.mode != kNoise) {
    struct In { A x, x0; };  // x0: x0_hat, or Heun's x0_eff (relay_step)
    for_cells_batched<kLoadBatch<A>>(
        tb.th, tb.tw, tid, nt,
        [&](int i, int j) {
          const int64_t h = tb.h0 + i, w = tb.w0 + j;
          In v{load_elem<A>(P.x.template at<const T>(b, c, h, w)), A(0)};
          if (P.mode == kStep) {
            v.x0 = load_elem<A>(P.x0.template at<const T>(b, c, h, w));
            if (P.xp.present())
              v.x0 = heun_x0(v.x, v.x0, load_elem<A>(P.xp.template at<const T>(b, c, h, w)),
                             load_elem<A>(P.x0p.template at<const T>(b, c, h, w)), ss.sigma, ss.sigma_next);
          }
          return v;
        },
        [&](int i, int j, const In& v) {
          const int e = i * g.tw + j;
          if (P.mode == kStep) {
            sm.xk[e] = v.x;
            sm.x[e] = v.x0;
          } else {
            sm.x[e] = v.x;
          }
        });
  }
  if (sm.xd)  // second order: xd = x0b - x0, in a loop of its own (fewer live registers); the same
              // cells as above, so this thread reads the x0 it stored itself
    for_cells_batched<kLoadBatch<A>>(
        tb.th, tb.tw, tid, nt,
        [&](int i, int j) { return load_elem<A>(P.x0b.template at<const T>(b, c, tb.h0 + i, tb.w0 + j)); },
        [&](int i, int j, A v) { sm.xd[i * g.tw + j] = v - sm.x[i * g.tw + j]; });
  if (!needs_noise(P)) return;
  const NoiseStream ns = noise_stream(P, b, c);
  if (P.has_block) {
    // The window of the tile's box sums: the tile and s - 1 rows above it and columns left of it
    // (block_noise sums over x - i: off = s - 1), or below and right (the adjoint, shift = s - 1,
    // sums over x + i: off = 0), wrapped around the image. Window cell (r, q) is image pixel
    // (h0 - off + r, w0 - off + q) mod (H, W), and tile pixel (r - off, q - off) if in the tile.
    const int off = n - 1 - P.shift;
    const auto row = [&](int r) { return wrap_once(tb.h0 - off + r, P.H); };
    const auto col = [&](int q) { return wrap_once(tb.w0 - off + q, P.W); };
    const auto inner = [&](int r, int q) { return r >= off && r - off < tb.th && q >= off && q - off < tb.tw; };
    struct Noise { A e1, e2; };
    const auto store = [&](int r, int q, const Noise& v) {
      sm.g[r * g.gw + q] = v.e2;
      if (inner(r, q)) sm.n[(r - off) * g.tw + (q - off)] = v.e1;
    };
    // Bound by Philox, not by memory: one cell at a time, each drawing its pair of SPEC 4 whole
    // (normal_pair; a window cell's pair partner may lie outside the window or the row).
    if (P.draw) {
      for_cells(tb.th + g.halo, tb.tw + g.halo, tid, nt, [&](int r, int q) {
        Noise v;
        normal_pair<A>(ns.key, ns.base + uint64_t(row(r) * P.W + col(q)), v.e1, v.e2);
        store(r, q, v);
      });
    } else {
      for_cells_batched<kLoadBatch<A>>(
          tb.th + g.halo, tb.tw + g.halo, tid, nt,
          [&](int r, int q) {
            const int64_t h = row(r), w = col(q);
            Noise v{A(0), load_elem<A>(P.eps2.template at<const T>(b, c, h, w))};
            if (P.has_eps && inner(r, q)) v.e1 = load_elem<A>(P.eps.template at<const T>(b, c, h, w));
            return v;
          },
          store);
    }
  } else {
    for_cells(tb.th, tb.tw, tid, nt, [&](int i, int j) {
      const int64_t h = tb.h0 + i, w = tb.w0 + j;
      A e1 = 0, e2 = 0;
      if (P.draw)
        normal_pair<A>(ns.key, ns.base + uint64_t(h * P.W + w), e1, e2);
      else if (P.has_eps)
        e1 = load_elem<A>(P.eps.template at<const T>(b, c, h, w));
      const A v = relay_noise_value(P, e1, A(0));
      if (P.mode == kNoise)
        store_elem<A>(P.out.template at<T>(b, c, h, w), v);
      else
        sm.n[i * g.tw + j] = v;
    });
  }
}

template <int S, class A>
RELAYOPS_HD void tile_hsum(const Params<A>& P, const TileGeom& g, const TileBlock& tb, int tid, const TileSmem<A>& sm) {
  const int n = S ? S : P.s;
  for_cells(tb.th + g.halo, tb.tw, tid, g.threads, [&](int r, int j) {
    const A* src = sm.g + r * g.gw + j;
    A acc = 0;
    for (int k = 0; k < n; ++k) acc += src[k];
    sm.hs[r * g.tw + j] = acc;
  });
}

// Pass A at pixel (i, j): sum_k M[i mod s][k] src[patch row k][j], M = C (forward) or C^T.
template <int S, bool Inverse, class A>
RELAYOPS_HD A pass_a(const TileGeom& g, const A* src, const TileSmem<A>& sm, int n, int i, int j) {
  const int pi = i % n;
  const A* col = src + (i - pi) * g.tw + j;
  A acc = 0;
  for (int k = 0; k < n; ++k) acc += dct_entry<Inverse>(sm.c, n, pi, k) * col[k * g.tw];
  return acc;
}

// Pass B at pixel (i, j): sum_k t[i][patch column k] M[j mod s][k].
template <int S, bool Inverse, class A>
RELAYOPS_HD A pass_b(const TileGeom& g, const TileSmem<A>& sm, int n, int i, int j) {
  const int pj = j % n;
  const A* row = sm.g + i * g.tw + (j - pj);
  A acc = 0;
  for (int k = 0; k < n; ++k) acc += row[k] * dct_entry<Inverse>(sm.c, n, pj, k);
  return acc;
}

// Vertical s-sums of the horizontal sums: the relay noise; with Fused, also pass A (forward).
template <int S, class T, bool Fused, class A>
RELAYOPS_HD void tile_noise(const Params<A>& P, const TileGeom& g, const TileBlock& tb, int tid,
                            const TileSmem<A>& sm) {
  const int n = S ? S : P.s;
  for_cells(tb.th, tb.tw, tid, g.threads, [&](int i, int j) {
    const int e = i * g.tw + j;
    const A* src = sm.hs + e;
    A acc = 0;
    for (int k = 0; k < n; ++k) acc += src[k * g.tw];
    const A v = relay_noise_value(P, sm.n[e], acc);
    if (P.mode == kNoise)
      store_elem<A>(P.out.template at<T>(tb.b, tb.c, tb.h0 + i, tb.w0 + j), v);
    else
      sm.n[e] = v;
    if (Fused) sm.g[e] = pass_a<S, false>(g, sm.x, sm, n, i, j);  // t takes the window's place (read in hsum)
  });
}

// Pass A of sm.x, or of sm.xd (Second: the second-order step's x0b - x0).
template <int S, bool Inverse, bool Second, class A>
RELAYOPS_HD void tile_pass_a(const Params<A>& P, const TileGeom& g, const TileBlock& tb, int tid,
                             const TileSmem<A>& sm) {
  const int n = S ? S : P.s;
  const A* src = Second ? sm.xd : sm.x;
  for_cells(tb.th, tb.tw, tid, g.threads,
            [&](int i, int j) { sm.g[i * g.tw + j] = pass_a<S, Inverse>(g, src, sm, n, i, j); });
}

// Pass B; the last one (Final) adds the other terms of the update and stores the output, the
// forward one of blur, corrupt and step multiplies by F (in place of x, read in pass A); the
// second-order step's second forward one (Second) adds E times the coefficients of x0b - x0 to that.
template <int S, class T, bool Inverse, bool Second, class A>
RELAYOPS_HD void tile_pass_b(const Params<A>& P, const TileGeom& g, const TileBlock& tb, int tid,
                             const TileSmem<A>& sm) {
  const int n = S ? S : P.s;
  const bool final_pass = Inverse || P.mode == kDct;
  const SampleScalars<A> ss = sample_scalars(P, tb.b);
  const bool noisy = needs_noise(P);
  for_cells(tb.th, tb.tw, tid, g.threads, [&](int i, int j) {
    const int e = i * g.tw + j;
    const A v = pass_b<S, Inverse>(g, sm, n, i, j);
    if (!final_pass) {
      const int k = (i % n) * n + j % n;
      // Second: sm.x holds F U from the first pass; F U + E dU is second_order_coef (patch.h) in two phases
      sm.x[e] = Second ? sm.x[e] + sm.e[k] * v : v * sm.f[k];
      return;
    }
    const A x = P.mode == kStep ? sm.xk[e] : A(0), nz = noisy ? sm.n[e] : A(0);
    store_elem<A>(P.out.template at<T>(tb.b, tb.c, tb.h0 + i, tb.w0 + j), finish_update(P, ss, x, v, nz));
  });
}

// Phase `step` of block blk for thread tid; smem: the block's shared memory. The caller puts a
// barrier between phases. The block's tile and array pointers are recomputed here rather than
// kept by the caller: values live across all phases cost registers in every phase.
template <int S, class T, class A>
RELAYOPS_HD void tile_phase(const Params<A>& P, const TileGeom& g, int64_t blk, int step, int tid, void* smem) {
  const TileBlock tb = tile_block(P, g, blk);
  const TileSmem<A> sm = tile_smem<A>(g, smem);
  switch (step) {
    case kStepLoad: return tile_load<S, T, A>(P, g, tb, tid, sm);
    case kStepHSum: return tile_hsum<S, A>(P, g, tb, tid, sm);
    case kStepNoise: return tile_noise<S, T, false, A>(P, g, tb, tid, sm);
    case kStepNoiseFwdA: return tile_noise<S, T, true, A>(P, g, tb, tid, sm);
    case kStepFwdA: return tile_pass_a<S, false, false, A>(P, g, tb, tid, sm);
    case kStepFwdB: return tile_pass_b<S, T, false, false, A>(P, g, tb, tid, sm);
    case kStepInvA: return tile_pass_a<S, true, false, A>(P, g, tb, tid, sm);
    case kStepInvB: return tile_pass_b<S, T, true, false, A>(P, g, tb, tid, sm);
    case kStepFwdA2: return tile_pass_a<S, false, true, A>(P, g, tb, tid, sm);
    case kStepFwdB2: return tile_pass_b<S, T, false, true, A>(P, g, tb, tid, sm);
  }
}

// ---- Host side: geometry, and the CPU emulation ----

// A tile extent near `target` pixels: a multiple of s, at most the image's extent.
inline int tile_extent(int s, int target, int64_t extent) {
  const int t = s * std::max(1, (target + s / 2) / s);
  return int(std::min<int64_t>(t, extent));
}

// Tiles of about 32 x 64 pixels (32 x 32 for float64, whose shared arrays are twice as large):
// wide rows for long coalesced runs, and a halo overhead (th + s - 1)(tw + s - 1) / (th tw) of
// 1.15 at s = 4, 1.35 at s = 8, 1.8 at s = 16 for the noise window.
template <class A>
TileGeom make_tile_geom(const Params<A>& P) {
  TileGeom g{};
  const int s = P.s;
  g.th = tile_extent(s, 32, P.H);
  g.tw = tile_extent(s, sizeof(A) == 8 ? 32 : 64, P.W);
  g.tiles_y = (P.H + g.th - 1) / g.th;
  g.tiles_x = (P.W + g.tw - 1) / g.tw;
  g.blocks = P.B * P.C * g.tiles_y * g.tiles_x;
  const int px = g.th * g.tw;
  g.threads = std::min(kTileThreads, (px + 31) / 32 * 32);
  const bool noisy = needs_noise(P), block = noisy && P.has_block;
  const bool transforms = P.mode != kNoise;
  g.halo = block ? s - 1 : 0;
  g.gw = g.tw + g.halo;
  int off = 0;
  auto take = [&](bool need, int count) {
    if (!need) return -1;
    const int at = off;
    off += count;
    return at;
  };
  g.off_c = take(transforms, s * s);
  g.off_f = take(uses_factor(P), s * s);
  g.off_e = take(second_order(P), s * s);
  g.off_x = take(transforms, px);
  g.off_xk = take(P.mode == kStep, px);
  g.off_xd = take(second_order(P), px);
  g.off_n = take(noisy, px);
  g.off_g = take(transforms || block, std::max(transforms ? px : 0, block ? (g.th + g.halo) * g.gw : 0));
  g.off_hs = take(block, (g.th + g.halo) * g.tw);
  g.smem_elems = off;
  // The program: load, [hsum], then per op the noise and transform passes.
  int k = 0;
  auto add = [&](TileStep st) { g.steps |= uint32_t(st) << (4 * k++); };
  add(kStepLoad);
  if (block) add(kStepHSum);
  switch (P.mode) {
    case kDct: add(kStepFwdA); add(kStepFwdB); break;
    case kIdct: add(kStepInvA); add(kStepInvB); break;
    case kNoise: if (block) add(kStepNoise); break;  // without the block term, load stores
    default:  // blur, corrupt, step: forward, times F, [second order: forward of x0b - x0, times E, added], inverse
      add(block ? kStepNoiseFwdA : kStepFwdA);
      add(kStepFwdB);
      if (second_order(P)) {
        add(kStepFwdA2);
        add(kStepFwdB2);
      }
      add(kStepInvA);
      add(kStepInvB);
  }
  g.nsteps = k;
  return g;
}

template <class F>
void with_tile_size(int s, F&& f) {
  switch (s) {  // compile-time S for the common sizes (unrolled s-loops); 0: run-time s
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// The CUDA kernel on the CPU: each block in turn, each phase for every thread index (the end of
// the thread loop is the barrier). Shared memory starts NaN-filled, so a cell read before any
// phase wrote it reaches the output; odd blocks run their threads in reverse order, so a phase
// reading what another thread writes in the same phase (a race on the GPU) changes the result.
// Writes past the layout's end hit a guard that is checked after every block.
template <int S, class T, class A>
void emulate_tiles(const Params<A>& P) {
  const TileGeom g = make_tile_geom(P);
  constexpr int kGuard = 64;
  const A sentinel = A(-12345.0);
  std::vector<A> smem(size_t(g.smem_elems) + kGuard);
  for (int64_t blk = 0; blk < g.blocks; ++blk) {
    std::fill(smem.begin(), smem.begin() + g.smem_elems, std::numeric_limits<A>::quiet_NaN());
    std::fill(smem.begin() + g.smem_elems, smem.end(), sentinel);
    for (int k = 0; k < g.nsteps; ++k)
      for (int u = 0; u < g.threads; ++u)
        tile_phase<S, T, A>(P, g, blk, tile_step(g, k), blk & 1 ? g.threads - 1 - u : u, smem.data());
    for (int i = 0; i < kGuard; ++i)
      if (!(smem[size_t(g.smem_elems) + i] == sentinel))
        throw std::logic_error("relayops: tile phases wrote past their shared memory");
  }
}

}  // namespace relayops
