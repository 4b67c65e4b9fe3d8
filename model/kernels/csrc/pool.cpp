// nanogpt::parallel_for's workers (pool.h says why they exist).
//
// One caller at a time holds the pool: it publishes a job (the function, the range, the chunk
// size), bumps `generation`, runs chunk 0 itself and spins until every worker has counted
// itself done. An idle worker spins on `generation` for `budget_` (the next call of a
// decode step comes within microseconds; the next step within a millisecond or so), yielding
// its CPU now and then, then sleeps on a condition variable until the next job.
#include "pool.h"

#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace nanogpt {
namespace {

using Clock = std::chrono::steady_clock;

// How long an idle worker spins before it sleeps: NANOGPT_CPU_SPIN_US, default 2 ms (libgomp's
// own default, where it is not throttled, is about 3 ms).
std::chrono::microseconds spin_budget() {
  const char* env = std::getenv("NANOGPT_CPU_SPIN_US");
  const long us = env != nullptr ? std::strtol(env, nullptr, 10) : 2000;
  return std::chrono::microseconds(std::max(0L, us));
}

// NANOGPT_CPU_POOL=0: every call goes to at::parallel_for (for comparisons).
const bool pool_on = [] {
  const char* env = std::getenv("NANOGPT_CPU_POOL");
  return env == nullptr || std::string(env) != "0";
}();

thread_local bool in_chunk = false;  // set on workers, and on a caller while it runs its chunk
thread_local int64_t serial_aten_threads = 0;  // inside a SerialATen: the thread count there was; else 0

class Pool {
 public:
  // Runs the chunks of [begin, end) on the caller (chunk 0) and workers - 1 workers (chunk i
  // on worker i; a worker past the last chunk only counts itself done); false, doing nothing,
  // where another caller holds the pool.
  bool run(int workers, int64_t begin, int64_t end, int64_t chunk, void (*call)(void*, int64_t, int64_t),
           void* f) {
    std::unique_lock<std::mutex> held(busy_, std::try_to_lock);
    if (!held.owns_lock()) return false;
    resize(static_cast<size_t>(workers - 1));
    call_ = call, f_ = f, begin_ = begin, end_ = end, chunk_ = chunk, error_ = nullptr;
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {  // see wait_for_job for why this cannot miss one
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    chunk_of(0);
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      _mm_pause();
      if ((spins & 1023) == 1023) std::this_thread::yield();  // a worker was preempted: let it run
    }
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  void chunk_of(int64_t i) {
    const int64_t b = begin_ + i * chunk_;
    if (b >= end_) return;
    const bool outer = in_chunk;
    in_chunk = true;
    try {
      call_(f_, b, std::min(end_, b + chunk_));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_lock_);
      if (!error_) error_ = std::current_exception();
    }
    in_chunk = outer;
  }

  // Workers 1..n (the caller is chunk 0). A change of thread count replaces them all, between jobs.
  void resize(size_t n) {
    if (workers_.size() == n) return;
    stop_.store(true);
    {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    for (auto& w : workers_) w.join();
    workers_.clear();
    stop_.store(false);
    const uint64_t now = generation_.load();
    for (size_t i = 1; i <= n; ++i) workers_.emplace_back([this, i, now] { work(static_cast<int64_t>(i), now); });
  }

  void work(int64_t index, uint64_t seen) {
    in_chunk = true;  // a parallel_for inside a chunk runs inline
    while (true) {
      const uint64_t g = wait_for_job(seen);
      if (stop_.load()) return;
      seen = g;
      chunk_of(index);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  // Spins, then sleeps, until `generation` moves past `seen` (or the pool stops). A sleeper
  // counts itself under `sleep_` before it tests `generation`; run() bumps `generation` before
  // it reads the count (both seq_cst): so either run() sees the sleeper and notifies under the
  // lock, or the sleeper's test sees the new generation. No wake-up is lost.
  uint64_t wait_for_job(uint64_t seen) {
    const auto deadline = Clock::now() + budget_;
    for (int spins = 1;; ++spins) {
      const uint64_t g = generation_.load(std::memory_order_acquire);
      if (g != seen || stop_.load(std::memory_order_relaxed)) return g;
      _mm_pause();
      if ((spins & 255) == 0) {
        if (Clock::now() >= deadline) break;
        std::this_thread::yield();  // an oversubscribed host: whatever else is runnable goes first
      }
    }
    std::unique_lock<std::mutex> lock(sleep_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen || stop_.load(); });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return generation_.load(std::memory_order_acquire);
  }

  std::mutex busy_;  // held by the caller whose job runs
  std::vector<std::thread> workers_;
  const std::chrono::microseconds budget_ = spin_budget();
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};  // workers not yet done with this generation's job
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex sleep_;
  std::condition_variable wake_;
  std::mutex error_lock_;
  std::exception_ptr error_;
  void (*call_)(void*, int64_t, int64_t) = nullptr;
  void* f_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 1;
};

// Never destroyed (its workers die with the process; joining them at exit could wait on a
// job of a thread Python has abandoned). A forked child gets a fresh one: its parent's
// workers do not exist there.
Pool* pool = new Pool();
[[maybe_unused]] const int at_fork = pthread_atfork(nullptr, nullptr, [] { pool = new Pool(); });

}  // namespace

void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, void (*call)(void*, int64_t, int64_t), void* f) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  // at::parallel_for's split: as many threads as have a chunk of at least `grain`, equal chunks.
  const int64_t workers = in_chunk || at::in_parallel_region() ? 1
                          : serial_aten_threads > 0 ? serial_aten_threads : at::get_num_threads();
  const int64_t threads = std::min<int64_t>(workers, (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (threads <= 1) {
    call(f, begin, end);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  if (!pool_on || !pool->run(static_cast<int>(workers), begin, end, chunk, call, f)) {  // held by another thread
    at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { call(f, b, e); });
  }
}

SerialATen::SerialATen() : threads_(at::get_num_threads()), outer_(serial_aten_threads) {  // (ATen's lazy init first)
  if (outer_ == 0) serial_aten_threads = threads_;
  omp_set_num_threads(1);  // this thread's OpenMP setting only, which ATen and oneDNN read
}

SerialATen::~SerialATen() {
  omp_set_num_threads(threads_);
  serial_aten_threads = outer_;
}

}  // namespace nanogpt

namespace {

// For the tests (tests/kernels/test_cpu_pool.py): parallel_for over [0, n) with `grain`; row i of
// the (n, 2) result holds the start of the chunk that ran index i and how often it ran. A chunk
// that starts at `fail_at` throws instead.
at::Tensor pool_cover(int64_t n, int64_t grain, int64_t fail_at) {
  at::Tensor out = at::zeros({n, 2}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  nanogpt::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    TORCH_CHECK(b != fail_at, "pool_cover: the chunk at ", b, " fails, as asked");
    for (int64_t i = b; i < e; ++i) o[2 * i] = b, o[2 * i + 1] += 1;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("pool_cover(int n, int grain, int fail_at) -> Tensor");
  m.impl("pool_cover", c10::DispatchKey::CatchAll, TORCH_FN(pool_cover));
}
