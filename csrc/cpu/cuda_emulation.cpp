// The CUDA module's launches run on the CPU (for tests; docs/design.md "Testing without a GPU"):
// choose_cuda_path picks the kernel as csrc/cuda/kernels.cu does, then the specialised kernels'
// per-thread bodies (relayops/patch_kernels.h) run for every thread of the same grid, warp by warp
// (block noise and the noise ops: all 32 lanes of a warp in lockstep, so their shuffles read what the neighbouring
// lanes hold), and the tile kernel runs through emulate_tiles (relayops/tile.h). Every global
// access can be recorded with its warp and instruction, so the tests can count the 32-byte
// sectors each warp instruction touches.
#include "cuda_emulation.h"

#include <cstring>
#include <stdexcept>

#include "relayops/patch_kernels.h"
#include "relayops/tile.h"

namespace relayops {
namespace cpu {
namespace {

// One lane's memory interface: plain loads and stores, each checked for the alignment the GPU's
// vector instructions need and, when recording, noted as access k of this lane in the warp's
// current step (one instruction of the warp: all lanes run the same accesses in a step).
struct LaneMemory {
  std::vector<Access>* rec;
  int64_t warp, step;
  int lane;
  int* count;

  void note(const void* p, size_t bytes, int store) const {
    if (reinterpret_cast<uintptr_t>(p) % bytes)
      throw std::logic_error("relayops: emulated CUDA thread made a misaligned vector access");
    if (rec) rec->push_back({warp, step, (*count)++, lane, int64_t(reinterpret_cast<uintptr_t>(p)), int64_t(bytes), store});
  }
  template <class V>
  V load(const V* p) const {
    note(p, sizeof(V), 0);
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  template <class V>
  void store(V* p, const V& v) const {
    note(p, sizeof(V), 1);
    std::memcpy(p, &v, sizeof(V));
  }
};

// A warp of block_noise_warp: its 32 lanes side by side; sync() starts the next instruction.
struct EmulatedWarp {
  static constexpr int kLanes = 32;
  int q0, band_, plane_;
  int64_t id;
  std::vector<Access>* rec;
  int64_t step = 0;
  int count[32] = {};

  int strip(int l) const { return q0 + l; }
  int lane(int l) const { return l; }
  int band() const { return band_; }
  int plane() const { return plane_; }
  void sync() {
    ++step;
    std::memset(count, 0, sizeof count);
  }
  LaneMemory mem(int l) { return {rec, id, step, l, &count[l]}; }
  // __shfl_up_sync / __shfl_down_sync: a lane whose source is outside the warp keeps its value
  template <class A>
  A shfl_up(const A (&v)[32], int l, int d) const { return l >= d ? v[l - d] : v[l]; }
  template <class A>
  A shfl_down(const A (&v)[32], int l, int d) const { return l + d < 32 ? v[l + d] : v[l]; }
};

// f(warp id, block index, thread index (x of the warp's lane 0, y)) for every warp of the launch.
template <class F>
void for_each_warp(const LaunchShape& ls, F&& f) {
  int64_t id = 0;
  for (int z = 0; z < ls.grid.z; ++z)
    for (int by = 0; by < ls.grid.y; ++by)
      for (int bx = 0; bx < ls.grid.x; ++bx)
        for (int ty = 0; ty < ls.block.y; ++ty)
          for (int tx = 0; tx < ls.block.x; tx += 32) f(id++, Dim3{bx, by, z}, tx, ty);
}

template <PatchOp Op, int S, class T, class A>
void emulate_patch(const Params<A>& P, std::vector<Access>* rec) {
  const PatchArgs<T, A> a = make_patch_args<T>(P);
  const LaunchShape ls = patch_launch_shape(a.npc, a.npr, P.B * P.C);
  for_each_warp(ls, [&](int64_t id, Dim3 blk, int tx, int ty) {
    for (int lane = 0; lane < 32; ++lane) {
      int count = 0;
      const LaneMemory mem{rec, id, 0, lane, &count};
      patch_thread<Op, S>(mem, a, blk.x * ls.block.x + tx + lane, blk.y * ls.block.y + ty, blk.z);
    }
  });
}

template <int S, bool Adjoint, class T, class A>
void emulate_box(const Params<A>& P, std::vector<Access>* rec) {
  const BoxArgs<T, A> a = make_box_args<T>(P);
  const LaunchShape ls = box_launch_shape(a, P.B * P.C);
  for_each_warp(ls, [&](int64_t id, Dim3 blk, int tx, int ty) {
    EmulatedWarp w{blk.x * ls.block.x + tx, blk.y * ls.block.y + ty, blk.z, id, rec};
    block_noise_warp<S, Adjoint>(a, w);
  });
}

template <RelayOp Op, int S, class T, class A>
void emulate_relay(const Params<A>& P, std::vector<Access>* rec) {
  if constexpr (relay_kernel_exists<A>(Op, S)) {  // else choose_cuda_path never picks it
    const RelayArgs<T, A> a = make_relay_args<T>(P);
    const LaunchShape ls = relay_launch_shape(a, P.B * P.C);
    for_each_warp(ls, [&](int64_t id, Dim3 blk, int tx, int ty) {
      EmulatedWarp w{blk.x * ls.block.x + tx, blk.y * ls.block.y + ty, blk.z, id, rec};
      relay_warp<Op, S>(a, w);
    });
  }
}

template <class T, class A>
int emulate(const Params<A>& P, std::vector<Access>* rec) {
  const CudaPath path = choose_cuda_path<T>(P);
  switch (path) {
    case kPathPatch:
      with_fast_size(P.s, [&](auto S) {
        constexpr int s = decltype(S)::value;
        if (P.mode == kDct) emulate_patch<PatchOp::kDct, s, T>(P, rec);
        else if (P.mode == kIdct) emulate_patch<PatchOp::kIdct, s, T>(P, rec);
        else emulate_patch<PatchOp::kBlur, s, T>(P, rec);
      });
      break;
    case kPathBox:
      with_fast_size(P.s, [&](auto S) {
        constexpr int s = decltype(S)::value;
        if constexpr (box_kernel_exists<A>(s)) {
          if (P.shift) emulate_box<s, true, T>(P, rec);
          else emulate_box<s, false, T>(P, rec);
        }
      });
      break;
    case kPathRelay:
      with_fast_size(P.s, [&](auto S) {
        constexpr int s = decltype(S)::value;
        switch (relay_op(P)) {
          case RelayOp::kNoise: return emulate_relay<RelayOp::kNoise, s, T>(P, rec);
          case RelayOp::kCorrupt: return emulate_relay<RelayOp::kCorrupt, s, T>(P, rec);
          case RelayOp::kEuler: return emulate_relay<RelayOp::kEuler, s, T>(P, rec);
          case RelayOp::kHeun: return emulate_relay<RelayOp::kHeun, s, T>(P, rec);
          case RelayOp::kSecond: return emulate_relay<RelayOp::kSecond, s, T>(P, rec);
        }
      });
      break;
    default:
      with_tile_size(P.s, [&](auto S) { emulate_tiles<decltype(S)::value, T, A>(P); });
  }
  return path;
}

}  // namespace

int emulate_cuda(const CallArgs& a, std::vector<Access>* accesses) {
  switch (a.dtype) {
    case kFloat32: return emulate<float>(make_params<float>(a), accesses);
    case kFloat64: return emulate<double>(make_params<double>(a), accesses);
    case kFloat16: return emulate<half_t>(make_params<float>(a), accesses);
    case kBFloat16: return emulate<bfloat16_t>(make_params<float>(a), accesses);
    default: throw std::invalid_argument("relayops: unknown dtype code");
  }
}

}  // namespace cpu
}  // namespace relayops
