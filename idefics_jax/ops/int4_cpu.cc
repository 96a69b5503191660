// x (R, C) fp32 @ w (C, O) int4 -> y (R, O) fp32, for decode steps on the CPU: reads the packed nibbles once
// and unpacks them in registers. XLA has no packed-int4 matmul: there each step unpacks every weight to a byte
// array in memory first, which costs more than the matmul.
//
// Layout (idefics_jax/quantize.py): values uint8 (k, g/2, O), scales fp32 (k, O), k groups of g contraction
// rows; in group i, row j < g/2 is the low nibble of byte (i, j) and row g/2 + j its high nibble, each stored as
// code + 8.
//
// Built by idefics_jax/_int4_cpu.py with the host's vector width (-march=native); the code below is plain C++
// with GCC vector types, which the compiler maps to AVX-512, AVX2 or NEON.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // output columns per vector
constexpr int kRows = 8;    // rows of x per pass over a column tile (registers: 2 * kRows accumulators)
constexpr int kTile = 64;   // output columns per task (4 vectors)

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint8_t vb __attribute__((vector_size(kLanes)));

// 16 packed bytes -> their low and high codes (nibble - 8) as floats. With AVX-512, one table lookup per half
// (vpermps reads the low 4 bits of each lane: no mask, no subtraction, no conversion). GCC scalarizes the byte
// widening written with vector types, hence the intrinsics.
inline void codes(const uint8_t* p, vf& lo, vf& hi) {
#if defined(__AVX512F__)
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = (vf)_mm512_permutexvar_ps(b, table);
  hi = (vf)_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
#else
  vb bytes;
  std::memcpy(&bytes, p, sizeof(bytes));
  const vi b = __builtin_convertvector(bytes, vi);
  lo = __builtin_convertvector((b & 15) - 8, vf);
  hi = __builtin_convertvector((b >> 4) - 8, vf);
#endif
}

inline vf load_scale(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Columns [o0, o0 + kLanes) of y for rows [r0, r0 + nr).
template <int NR>
void tile(const float* x, const uint8_t* w, const float* s, float* y, int64_t C, int64_t O, int64_t k, int64_t h,
          int64_t r0, int64_t o0) {
  vf acc[NR] = {};
  const int64_t g = 2 * h;
  for (int64_t i = 0; i < k; ++i) {
    vf part[NR] = {};
    const uint8_t* wi = w + i * h * O + o0;
    for (int64_t j = 0; j < h; ++j) {
      vf lo, hi;
      codes(wi + j * O, lo, hi);
      for (int r = 0; r < NR; ++r) {
        const float* xr = x + (r0 + r) * C + i * g;
        part[r] += xr[j] * lo;  // two separate updates: two fused multiply-adds
        part[r] += xr[h + j] * hi;
      }
    }
    vf si = load_scale(s + i * O + o0);
    for (int r = 0; r < NR; ++r) acc[r] += part[r] * si;
  }
  for (int r = 0; r < NR; ++r) std::memcpy(y + (r0 + r) * O + o0, &acc[r], sizeof(vf));
}

// Columns [o0, o0 + n) of y, all rows; n <= kLanes (a short last tile goes through a padded copy).
void columns(const float* x, const uint8_t* w, const float* s, float* y, int64_t R, int64_t C, int64_t O, int64_t k,
             int64_t h, int64_t o0) {
  for (int64_t r0 = 0; r0 < R; r0 += kRows) {
    switch (std::min<int64_t>(kRows, R - r0)) {
      case 8: tile<8>(x, w, s, y, C, O, k, h, r0, o0); break;
      case 7: tile<7>(x, w, s, y, C, O, k, h, r0, o0); break;
      case 6: tile<6>(x, w, s, y, C, O, k, h, r0, o0); break;
      case 5: tile<5>(x, w, s, y, C, O, k, h, r0, o0); break;
      case 4: tile<4>(x, w, s, y, C, O, k, h, r0, o0); break;
      case 3: tile<3>(x, w, s, y, C, O, k, h, r0, o0); break;
      case 2: tile<2>(x, w, s, y, C, O, k, h, r0, o0); break;
      default: tile<1>(x, w, s, y, C, O, k, h, r0, o0); break;
    }
  }
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

ffi::Error Int4Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> s,
                      ffi::ResultBuffer<ffi::F32> y, ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3) return ffi::Error::InvalidArgument("int4 matmul: x (R, C), w (k, h, O)");
  const int64_t R = xd[0], C = xd[1], k = wd[0], h = wd[1], O = wd[2];
  if (C != 2 * k * h || s.element_count() != k * O) return ffi::Error::InvalidArgument("int4 matmul: shapes");
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  const float* sp = s.typed_data();
  float* yp = y->typed_data();
  const int64_t full = O / kLanes;  // whole vectors of columns; the rest (O % 16) below
  const int64_t per = kTile / kLanes;
  const int64_t tasks = (full + per - 1) / per;

  auto shared = std::make_shared<Shared>();
  auto work = [=]() {
    int64_t t;
    while ((t = shared->next.fetch_add(1)) < tasks) {
      for (int64_t v = t * per; v < std::min(full, (t + 1) * per); ++v)
        columns(xp, wp, sp, yp, R, C, O, k, h, v * kLanes);
      if (shared->done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  // The pool's other threads take tiles as they come free; this thread takes tiles too, so the call finishes
  // even when no other thread does (then the scheduled ones find no tile left and return).
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  {
    std::unique_lock<std::mutex> lock(shared->mu);
    shared->cv.wait(lock, [&] { return shared->done.load() >= tasks; });
  }

  // The last O % 16 columns: through a zero-padded copy of their bytes and scales.
  const int64_t rest = O - full * kLanes;
  if (rest > 0) {
    const int64_t o0 = full * kLanes;
    auto wt = std::make_unique<uint8_t[]>(k * h * kLanes);
    auto st = std::make_unique<float[]>(k * kLanes);
    auto yt = std::make_unique<float[]>(R * kLanes);
    std::fill(wt.get(), wt.get() + k * h * kLanes, uint8_t{8});
    std::fill(st.get(), st.get() + k * kLanes, 0.0f);
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < h; ++j) std::memcpy(&wt[(i * h + j) * kLanes], wp + (i * h + j) * O + o0, rest);
      std::memcpy(&st[i * kLanes], sp + i * O + o0, rest * sizeof(float));
    }
    columns(xp, wt.get(), st.get(), yt.get(), R, C, kLanes, k, h, 0);
    for (int64_t r = 0; r < R; ++r) std::memcpy(yp + r * O + o0, &yt[r * kLanes], rest * sizeof(float));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IdeficsInt4Matmul, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
