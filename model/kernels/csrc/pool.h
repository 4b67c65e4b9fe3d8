// The kernels' own worker threads: nanogpt::parallel_for splits a range as at::parallel_for
// does (the same chunks for the same thread count), on workers that this library keeps.
//
// Why not at::parallel_for: torch's OpenMP runtime (libgomp) keeps one team of workers per
// thread that has entered a parallel region, and once a process holds more such workers than
// it has CPUs (the thread that loaded the model, the one that set the engine up, the engine's
// own: two teams already exceed two CPUs) every worker stops spinning between regions and
// sleeps at once (libgomp's "throttled" spin count, 100 spins, whatever GOMP_SPINCOUNT says).
// A batch-1 decode step is some 60 short regions, each then paying a futex wake-up per worker:
// on a 2-CPU host the same step took 2-4x as long in the engine's thread as in the thread that
// loaded the model (docs/engine.md). These workers spin for a while after each call whoever
// calls, then sleep; a call made while another thread holds them goes to at::parallel_for.
#pragma once

#include <cstdint>

namespace nanogpt {

// f(begin_i, end_i) over chunks of [begin, end) on at most at::get_num_threads() threads, each
// chunk at least `grain` long (as at::parallel_for). Runs on the caller alone where the range
// is one chunk, or where it is called from inside a chunk.
void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, void (*call)(void*, int64_t, int64_t),
                       void* f);

// Within its scope ATen's own parallel loops on this thread (and oneDNN's, which torch's GELU
// calls for bfloat16 on some CPUs) run inline on the caller, each an OpenMP region no more,
// while parallel_for still uses the thread count there was. For fused ops (block.cpp) whose
// ATen calls are small: each region would wake torch's OpenMP workers, which then spin
// beside these for milliseconds, or, throttled, cost a futex wake-up each.
class SerialATen {
 public:
  SerialATen();
  ~SerialATen();
  SerialATen(const SerialATen&) = delete;
  SerialATen& operator=(const SerialATen&) = delete;

 private:
  int threads_;
  int64_t outer_;
};

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for_impl(begin, end, grain,
                    [](void* p, int64_t b, int64_t e) { (*static_cast<const F*>(p))(b, e); },
                    const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace nanogpt
