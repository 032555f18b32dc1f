#pragma once
// Internal (never installed): how the in-process engine's stages hand each
// other messages: one mailbox per (stage, micro-batch) and direction, in the
// step's state; a cell blocks only on its own input. The first failure of
// the step is kept here too, and wakes every waiting cell.

#include <condition_variable>
#include <exception>
#include <mutex>
#include <optional>
#include <vector>

#include <pipegear/detail/cells.h>

namespace pipegear::detail {

/// A step of the in-process engine: the shared StepRun plus the mailboxes
/// between the worker threads and the first failure.
struct LocalRun : StepRun {
  using Box = std::vector<std::vector<std::optional<Message>>>;

  // Guarded by `mutex`: forward input of (s, j), backward input (gradient
  // of the outputs) of (s, j).
  std::mutex mutex;
  std::condition_variable cv;
  Box forward_box;
  Box backward_box;
  // Skip connections, by (skip id, micro-batch): the stashed tensor, and
  // its gradient.
  Box skip_box;
  Box skip_grad_box;
  bool aborted = false;
  std::exception_ptr error;

  void size_boxes(int64_t skips = 0) {
    forward_box.assign(stages, std::vector<std::optional<Message>>(micro_batches));
    backward_box.assign(stages, std::vector<std::optional<Message>>(micro_batches));
    skip_box.assign(skips, std::vector<std::optional<Message>>(micro_batches));
    skip_grad_box.assign(skips, std::vector<std::optional<Message>>(micro_batches));
  }

  void post(Box& box, int64_t s, int64_t j, Message m) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      box[s][j] = std::move(m);
    }
    cv.notify_all();
  }

  /// The message of (s, j); throws Aborted once the step failed.
  Message take(Box& box, int64_t s, int64_t j) {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return aborted || box[s][j].has_value(); });
    if (aborted) {
      throw Aborted{};
    }
    Message m = std::move(*box[s][j]);
    box[s][j].reset();
    return m;
  }

  /// Records the step's first failure and wakes every waiting cell.
  void fail(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) {
        error = std::move(e);
      }
      aborted = true;
    }
    cv.notify_all();
  }
};

/// Hands messages between the workers of one process through the run's
/// mailboxes.
struct MailboxTransport final : Transport {
  explicit MailboxTransport(LocalRun& run) : run(run) {}
  Message recv_forward(int64_t s, int64_t j) override {
    return run.take(run.forward_box, s, j);
  }
  void send_forward(int64_t s, int64_t j, Message m) override {
    run.post(run.forward_box, s + 1, j, std::move(m));
  }
  Message recv_backward(int64_t s, int64_t j) override {
    return run.take(run.backward_box, s, j);
  }
  void send_backward(int64_t s, int64_t j, Message m) override {
    run.post(run.backward_box, s - 1, j, std::move(m));
  }
  Message recv_skip(int64_t id, int64_t j) override {
    return run.take(run.skip_box, id, j);
  }
  void send_skip(int64_t id, int64_t j, Message m) override {
    run.post(run.skip_box, id, j, std::move(m));
  }
  Message recv_skip_grad(int64_t id, int64_t j) override {
    return run.take(run.skip_grad_box, id, j);
  }
  void send_skip_grad(int64_t id, int64_t j, Message m) override {
    run.post(run.skip_grad_box, id, j, std::move(m));
  }
  LocalRun& run;
};

} // namespace pipegear::detail
