// A persistent thread pool for the native kernels' parallel loops, used instead of at::parallel_for (OpenMP).
//
// Why: libgomp keeps one team of worker threads per calling thread, and once the process has more of those
// threads than CPUs (the engine thread runs the model, the main thread loaded it: two teams on a 2-core
// machine) it throttles the workers' spin to ~100 iterations, so between two parallel regions they fall
// asleep and every region pays a futex wake-up, which in a VM costs tens of microseconds. A decode step
// runs ~120 such regions (one per matmul), separated by a little Python: measured on a 2-core Zen 4 VM, the
// q4_K matmuls of one Llama-1B token took 20 ms from the thread that had loaded the model and 31 ms from a
// second thread. This pool is one per process, whichever thread calls it (its state is the static of an inline
// function, a GNU-unique symbol that the dynamic linker binds to one copy across all our extension libraries): its
// workers spin for a while (spin_micros()) after each job, so the next one starts without a wake-up, then
// sleep; the caller works too, and items are claimed one at a time, so a worker that is slow to wake only
// takes fewer items instead of holding up the caller.
//
// What runs where never changes a result: every item computes its own outputs exactly as it would alone.
// Jobs from several calling threads run one after the other (a mutex); a job started from inside a job runs
// inline on that thread.
#pragma once

#include <ATen/Parallel.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace mistralrs_pool {
inline namespace v1 {  // bump when Pool/State change: the state is shared process-wide (see above)

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long a worker keeps spinning for the next job before it sleeps (MISTRALRS_POOL_SPIN_US overrides):
// longer than the gaps between the ops of a decode step, short enough not to matter to an idle process.
inline int64_t spin_micros() {
  static const int64_t us = [] {
    const char* env = std::getenv("MISTRALRS_POOL_SPIN_US");
    return env ? std::max<int64_t>(0, std::atoll(env)) : int64_t(2000);
  }();
  return us;
}

struct Job {
  void (*call)(void* ctx, int64_t item) = nullptr;
  void* ctx = nullptr;
  int64_t items = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
};

class Pool {
 public:
  explicit Pool(int workers) : workers_(workers) {
    for (int i = 0; i < workers; ++i) std::thread([this] { loop(); }).detach();
  }

  int threads() const { return workers_ + 1; }

  // Runs job.call(ctx, i) for every i in [0, job.items) on this thread and the workers; returns when all are done.
  void run(Job& job) {
    current_.store(&job);
    gen_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    work(job);
    while (job.done.load(std::memory_order_acquire) < job.items) cpu_relax();
    // No worker may still be looking at the job (it lives on the caller's stack).
    current_.store(nullptr);
    while (active_.load() != 0) cpu_relax();
  }

  // Stop the workers (they exit at their next wake-up); the pool object is then leaked on purpose.
  void retire() {
    stop_.store(true);
    gen_.fetch_add(1);
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }

 private:
  static void work(Job& job) {
    for (int64_t i; (i = job.next.fetch_add(1, std::memory_order_relaxed)) < job.items;) {
      if (!job.failed.load(std::memory_order_relaxed)) {
        try {
          job.call(job.ctx, i);
        } catch (...) {
          if (!job.failed.exchange(true)) job.error = std::current_exception();
        }
      }
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = gen_.load();
    for (;;) {
      wait_for(seen);
      if (stop_.load()) return;
      seen = gen_.load();
      active_.fetch_add(1);
      if (Job* job = current_.load()) work(*job);
      active_.fetch_sub(1);
    }
  }

  void wait_for(uint64_t seen) {
    using clock = std::chrono::steady_clock;
    const auto deadline = clock::now() + std::chrono::microseconds(spin_micros());
    for (uint32_t i = 1;; ++i) {
      if (gen_.load(std::memory_order_acquire) != seen) return;
      cpu_relax();
      if ((i & 1023) == 0) {
        if (clock::now() > deadline) break;
        sched_yield();  // let another runnable thread on this CPU (torch's own workers) go first
      }
    }
    std::unique_lock<std::mutex> lk(mu_);
    sleeping_.fetch_add(1);
    cv_.wait(lk, [&] { return gen_.load() != seen; });
    sleeping_.fetch_sub(1);
  }

  const int workers_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<Job*> current_{nullptr};
  std::atomic<int> active_{0}, sleeping_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

struct State {
  std::mutex mu;  // one job at a time
  Pool* pool = nullptr;
};

inline State& state() {
  static State* s = [] {
    auto* st = new State();  // never destroyed: workers may outlive static destruction at exit
    // A forked child has none of the workers: start afresh there (the parent's pool is leaked in the child).
    pthread_atfork(nullptr, nullptr, [] {
      new (&state().mu) std::mutex();
      state().pool = nullptr;
    });
    return st;
  }();
  return *s;
}

inline thread_local bool in_job = false;

// Calls f(b, e) over [begin, end) in chunks of `grain` (the last may be shorter), spread over torch's thread
// count; like at::parallel_for, but the chunks are claimed one at a time by whichever thread is free.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end <= begin) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t items = (end - begin + grain - 1) / grain;
  const int threads = std::max(1, at::get_num_threads());
  if (threads == 1 || items == 1 || in_job) {
    f(begin, end);
    return;
  }
  State& st = state();
  std::lock_guard<std::mutex> lk(st.mu);
  if (st.pool == nullptr || st.pool->threads() != threads) {
    if (st.pool) st.pool->retire();
    st.pool = new Pool(threads - 1);
  }
  struct Ctx {
    const F* f;
    int64_t begin, end, grain;
  } ctx{&f, begin, end, grain};
  Job job;
  job.items = items;
  job.ctx = &ctx;
  job.call = [](void* p, int64_t i) {
    const Ctx& c = *static_cast<const Ctx*>(p);
    const int64_t b = c.begin + i * c.grain;
    struct Flag {
      Flag() { in_job = true; }
      ~Flag() { in_job = false; }
    } flag;
    (*c.f)(b, std::min(c.end, b + c.grain));
  };
  st.pool->run(job);
  if (job.failed.load()) std::rethrow_exception(job.error);
}

}  // namespace v1
}  // namespace mistralrs_pool
