#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <pipegear/schedule.h>

namespace pipegear {

/// One executed cell: which stage ran which micro-batch in which phase, and
/// when (steady-clock nanoseconds), waiting excluded. A checkpointed cell's
/// recomputation is an event of its own (phase kBackward, `recompute` true)
/// just before the backward event it serves.
struct TraceEvent {
  int64_t stage = 0;
  int64_t micro_batch = 0;
  Phase phase = Phase::kForward;
  bool recompute = false;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  /// Interleaved schedules: which of the worker's stages ran the cell
  /// (Cell::chunk; `stage` is then the worker's row). 0 elsewhere.
  int64_t chunk = 0;
};

/// The timeline of one training step (or one forward pass). Pure data.
class Trace {
 public:
  Trace() = default;
  Trace(int64_t stages, int64_t micro_batches, std::vector<TraceEvent> events);

  int64_t stages() const { return stages_; }
  int64_t micro_batches() const { return micro_batches_; }
  const std::vector<TraceEvent>& events() const { return events_; }
  bool empty() const { return events_.empty(); }

  /// Wall time from the first start to the last end, in seconds.
  double makespan() const;
  /// Fraction of stage-time idle within the makespan:
  /// 1 - sum(busy time) / (stages * makespan).
  double bubble_fraction() const;
  /// GPipe's (K-1)/(M+K-1).
  double theoretical_bubble_fraction() const;
  /// Chrome trace JSON ("traceEvents", one thread per stage, microseconds);
  /// opens in Perfetto and chrome://tracing. Cells are named as in the
  /// clock table (render_schedule): F3, B3, W3, or F3.1 when interleaved.
  std::string to_chrome_trace() const;
  /// Writes to_chrome_trace() to `path`; throws on I/O errors.
  void save_chrome_trace(const std::string& path) const;

 private:
  int64_t stages_ = 0;
  int64_t micro_batches_ = 0;
  std::vector<TraceEvent> events_;
};

} // namespace pipegear
