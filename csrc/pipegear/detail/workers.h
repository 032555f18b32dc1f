#pragma once
// Internal (never installed): the in-process engine's persistent worker
// threads, one per stage, created with the engine and joined by its
// destructor. A worker knows nothing of cells: it runs the jobs it is
// handed, one at a time.

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace pipegear::detail {

class WorkerPool {
 public:
  using Job = std::function<void(size_t worker)>;

  /// `n` threads; thread i runs `init(i)` first. Returns once every
  /// thread has run its init.
  WorkerPool(size_t n, const std::function<void(size_t)>& init);
  /// Wakes every thread and joins it (each finishes its current job).
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  size_t size() const { return workers_.size(); }

  /// Hands `job` to every worker i where `skip` is empty or false, and
  /// returns at once. One round at a time: call wait() before the next.
  void start(const Job& job, const std::vector<bool>& skip = {});

  /// Blocks until every worker of the round has finished its job. Every
  /// `period` while it waits, `tick` (which must not throw) runs on the
  /// calling thread, outside any lock.
  void wait(const std::function<void()>& tick,
            std::chrono::milliseconds period = std::chrono::milliseconds(50));

 private:
  struct Worker {
    std::thread thread;
    std::mutex mutex;
    std::condition_variable cv;
    std::optional<Job> job;
    bool shutdown = false;
  };

  void main(size_t i, const std::function<void(size_t)>& init);

  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex done_mutex_;
  std::condition_variable done_cv_;
  size_t pending_ = 0;  // jobs of the round not finished; inits at start
};

} // namespace pipegear::detail
