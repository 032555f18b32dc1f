#include <pipegear/detail/workers.h>

namespace pipegear::detail {

WorkerPool::WorkerPool(size_t n, const std::function<void(size_t)>& init) {
  workers_.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    workers_.push_back(std::make_unique<Worker>());
  }
  pending_ = n;
  for (size_t i = 0; i < n; ++i) {
    workers_[i]->thread = std::thread([this, i, &init] { main(i, init); });
  }
  // `init` is the caller's: every thread is done with it before we return.
  std::unique_lock<std::mutex> lock(done_mutex_);
  done_cv_.wait(lock, [&] { return pending_ == 0; });
}

WorkerPool::~WorkerPool() {
  for (auto& w : workers_) {
    {
      std::lock_guard<std::mutex> lock(w->mutex);
      w->shutdown = true;
    }
    w->cv.notify_all();
  }
  for (auto& w : workers_) {
    if (w->thread.joinable()) {
      w->thread.join();
    }
  }
}

void WorkerPool::start(const Job& job, const std::vector<bool>& skip) {
  {
    std::lock_guard<std::mutex> lock(done_mutex_);
    pending_ = 0;
    for (size_t i = 0; i < workers_.size(); ++i) {
      pending_ += skip.empty() || !skip[i];
    }
  }
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (!skip.empty() && skip[i]) {
      continue;
    }
    auto& w = *workers_[i];
    {
      std::lock_guard<std::mutex> lock(w.mutex);
      w.job = job;
    }
    w.cv.notify_all();
  }
}

void WorkerPool::wait(const std::function<void()>& tick,
                      std::chrono::milliseconds period) {
  std::unique_lock<std::mutex> lock(done_mutex_);
  while (!done_cv_.wait_for(lock, period, [&] { return pending_ == 0; })) {
    if (tick) {
      lock.unlock();
      tick();
      lock.lock();
    }
  }
}

void WorkerPool::main(size_t i, const std::function<void(size_t)>& init) {
  auto& w = *workers_[i];
  init(i);
  {
    std::lock_guard<std::mutex> lock(done_mutex_);
    --pending_;
  }
  done_cv_.notify_all();
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(w.mutex);
      w.cv.wait(lock, [&] { return w.shutdown || w.job.has_value(); });
      if (w.shutdown) {
        return;
      }
      job = std::move(*w.job);
      w.job.reset();
    }
    job(i);  // must not throw
    job = nullptr;  // what it holds is released before the round ends
    {
      std::lock_guard<std::mutex> lock(done_mutex_);
      --pending_;
    }
    done_cv_.notify_all();
  }
}

} // namespace pipegear::detail
