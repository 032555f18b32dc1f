#include <pipegear/trace.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <limits>
#include <sstream>
#include <utility>

#include <c10/util/Exception.h>

namespace pipegear {
namespace {

// Microseconds with nanosecond resolution, as Chrome's trace format wants.
std::string microseconds(int64_t ns) {
  std::ostringstream out;
  out << (ns < 0 ? "-" : "") << std::llabs(ns) / 1000 << '.' << std::setw(3)
      << std::setfill('0') << std::llabs(ns) % 1000;
  return out.str();
}

} // namespace

Trace::Trace(int64_t stages,
             int64_t micro_batches,
             std::vector<TraceEvent> events)
    : stages_(stages), micro_batches_(micro_batches), events_(std::move(events)) {
  TORCH_CHECK_VALUE(stages >= 1, "a trace needs stages >= 1, got ", stages);
  TORCH_CHECK_VALUE(micro_batches >= 1,
                    "a trace needs micro_batches >= 1, got ", micro_batches);
  for (size_t i = 0; i < events_.size(); ++i) {
    const auto& e = events_[i];
    TORCH_CHECK_INDEX(e.stage >= 0 && e.stage < stages, "event ", i,
                      " has stage ", e.stage, ", out of range for ", stages,
                      " stages");
    TORCH_CHECK_INDEX(e.micro_batch >= 0 && e.micro_batch < micro_batches,
                      "event ", i, " has micro-batch ", e.micro_batch,
                      ", out of range for ", micro_batches, " micro-batches");
    TORCH_CHECK_VALUE(e.end_ns >= e.start_ns, "event ", i, " ends at ",
                      e.end_ns, " ns, before its start at ", e.start_ns, " ns");
    TORCH_CHECK_VALUE(e.chunk >= 0, "event ", i, " has chunk ", e.chunk,
                      ", expected >= 0");
  }
}

double Trace::makespan() const {
  if (events_.empty()) {
    return 0.0;
  }
  int64_t first = std::numeric_limits<int64_t>::max();
  int64_t last = std::numeric_limits<int64_t>::min();
  for (const auto& e : events_) {
    first = std::min(first, e.start_ns);
    last = std::max(last, e.end_ns);
  }
  return static_cast<double>(last - first) * 1e-9;
}

double Trace::bubble_fraction() const {
  const double span = makespan();
  if (span <= 0.0) {
    return 0.0;
  }
  // Busy time per stage is the union of its cells' intervals, so that cells
  // overlapping on one stage (several streams) are not counted twice.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> intervals(stages_);
  for (const auto& e : events_) {
    intervals[e.stage].emplace_back(e.start_ns, e.end_ns);
  }
  int64_t busy = 0;
  for (auto& stage : intervals) {
    std::sort(stage.begin(), stage.end());
    int64_t covered_until = std::numeric_limits<int64_t>::min();
    for (const auto& [start, end] : stage) {
      const int64_t from = std::max(start, covered_until);
      if (end > from) {
        busy += end - from;
      }
      covered_until = std::max(covered_until, end);
    }
  }
  const double busy_s = static_cast<double>(busy) * 1e-9;
  return 1.0 - busy_s / (static_cast<double>(stages_) * span);
}

double Trace::theoretical_bubble_fraction() const {
  if (stages_ < 1 || micro_batches_ < 1) {
    return 0.0;
  }
  return static_cast<double>(stages_ - 1) /
      static_cast<double>(micro_batches_ + stages_ - 1);
}

std::string Trace::to_chrome_trace() const {
  int64_t origin = 0;
  if (!events_.empty()) {
    origin = std::min_element(events_.begin(), events_.end(),
                              [](const auto& a, const auto& b) {
                                return a.start_ns < b.start_ns;
                              })
                 ->start_ns;
  }
  std::ostringstream out;
  out << "{\"displayTimeUnit\":\"ms\",\"otherData\":{\"stages\":" << stages_
      << ",\"micro_batches\":" << micro_batches_ << "},\"traceEvents\":[";
  out << "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":0,\"tid\":0,"
         "\"args\":{\"name\":\"pipegear\"}}";
  for (int64_t s = 0; s < stages_; ++s) {
    out << ",{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":0,\"tid\":" << s
        << ",\"args\":{\"name\":\"stage " << s << "\"}}"
        << ",{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"pid\":0,\"tid\":"
        << s << ",\"args\":{\"sort_index\":" << s << "}}";
  }
  // Interleaved: every name carries its chunk, as render_schedule's do.
  const bool interleaved =
      std::any_of(events_.begin(), events_.end(),
                  [](const auto& e) { return e.chunk > 0; });
  for (const auto& e : events_) {
    const char* phase = phase_name(e.phase);
    out << ",{\"name\":\"" << (e.phase == Phase::kForward        ? 'F'
                                   : e.phase == Phase::kBackwardWeight ? 'W'
                                                                      : 'B')
        << e.micro_batch
        << (interleaved ? "." + std::to_string(e.chunk) : std::string())
        << (e.recompute ? " (recompute)" : "")
        << "\",\"cat\":\"" << phase << "\",\"ph\":\"X\",\"pid\":0,\"tid\":"
        << e.stage << ",\"ts\":" << microseconds(e.start_ns - origin)
        << ",\"dur\":" << microseconds(e.end_ns - e.start_ns)
        << ",\"args\":{\"stage\":" << e.stage
        << (interleaved ? ",\"chunk\":" + std::to_string(e.chunk)
                        : std::string())
        << ",\"micro_batch\":" << e.micro_batch << ",\"phase\":\"" << phase
        << "\",\"recompute\":" << (e.recompute ? "true" : "false") << "}}";
  }
  out << "]}";
  return out.str();
}

void Trace::save_chrome_trace(const std::string& path) const {
  std::ofstream file(path, std::ios::out | std::ios::trunc);
  TORCH_CHECK(file.is_open(), "cannot open '", path, "' to write a trace");
  file << to_chrome_trace() << '\n';
  file.close();
  TORCH_CHECK(!file.fail(), "could not write the trace to '", path, "'");
}

} // namespace pipegear
