// ParallelFor for the CPU custom calls (winograd_cpu.cc, group_norm_cpu.cc): runs a loop body over
// XLA's intra-op thread pool (the one the FFI hands each call).
#ifndef DDPM_JAX_PARALLEL_FOR_H_
#define DDPM_JAX_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ddpm {

// Runs body(begin, end) over [0, n) in chunks claimed from an atomic counter by the calling
// thread and by helper tasks on XLA's thread pool. The caller only waits for chunks that a
// helper has already claimed (and is running), never for a task still queued, so a pool whose
// threads are all busy cannot deadlock it.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, Body body) {
  int64_t chunks = (n + grain - 1) / grain;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    body(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, grain, chunks, body]() {
    for (;;) {
      int64_t c = state->next.fetch_add(1);
      if (c >= chunks) return;
      int64_t b = c * grain;
      body(b, std::min(n, b + grain));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) {
    // Chunks still running on helpers (at most one each): give the core to them, as the
    // machine may have fewer cores than busy threads.
    std::this_thread::yield();
  }
}

}  // namespace ddpm

#endif  // DDPM_JAX_PARALLEL_FOR_H_
