#include <pipegear/schedule.h>

#include <algorithm>
#include <deque>
#include <sstream>

#include <c10/util/Exception.h>

namespace pipegear {
namespace {

void check_shape(int64_t stages, int64_t micro_batches) {
  TORCH_CHECK_VALUE(stages >= 1, "a schedule needs at least 1 stage, got ",
                    stages);
  TORCH_CHECK_VALUE(micro_batches >= 1,
                    "a schedule needs at least 1 micro-batch, got ",
                    micro_batches);
}

// The phases, and the row of each in the validator's tables.
constexpr int kPhases = 4;
int slot(Phase phase) {
  return static_cast<int>(phase);
}

// The zero-bubble family: after `warmup(s)` forwards, stage s runs for
// each micro-batch i its B, the W of micro-batch i - s once i >= s (W
// cells of the first micro-batches wait to fill the drain), and the next
// forward; the remaining W cells close the stage's list.
template <typename Warmup>
Schedule zero_bubble(int64_t stages, int64_t micro_batches, Warmup warmup) {
  check_shape(stages, micro_batches);
  Schedule schedule(stages);
  for (int64_t s = 0; s < stages; ++s) {
    auto& cells = schedule[s];
    cells.reserve(3 * micro_batches);
    int64_t next_forward = 0;
    int64_t next_weight = 0;
    for (; next_forward < std::min(warmup(s), micro_batches); ++next_forward) {
      cells.push_back({next_forward, Phase::kForward});
    }
    for (int64_t i = 0; i < micro_batches; ++i) {
      cells.push_back({i, Phase::kBackwardInput});
      if (i >= s) {
        cells.push_back({next_weight++, Phase::kBackwardWeight});
      }
      if (next_forward < micro_batches) {
        cells.push_back({next_forward++, Phase::kForward});
      }
    }
    while (next_weight < micro_batches) {
      cells.push_back({next_weight++, Phase::kBackwardWeight});
    }
  }
  return schedule;
}

// When the cells of a schedule end, in unit clocks, for the checks of
// what a cell waits for (the dependencies in schedule.h); shared by the
// validator's replay and by the generators that simulate their order.
class CellEnds {
 public:
  CellEnds(int64_t stages, int64_t micro_batches)
      : stages_(stages),
        micro_batches_(micro_batches),
        end_(kPhases * stages * micro_batches, -1) {}

  // Whether stage s may start `c` at clock t.
  bool ready(int64_t s, const Cell& c, int64_t t) const {
    auto done = [&](int64_t stage, Phase p) {
      const int64_t e = at(stage, p, c.micro_batch);
      return e >= 0 && e <= t;
    };
    // The input gradient of (stage, j): from a whole backward or a B.
    auto gradient_done = [&](int64_t stage) {
      return done(stage, Phase::kBackward) ||
          done(stage, Phase::kBackwardInput);
    };
    switch (c.phase) {
      case Phase::kForward:
        return s == 0 || done(s - 1, Phase::kForward);
      case Phase::kBackwardWeight:
        return done(s, Phase::kBackwardInput);
      default:
        return s == stages_ - 1 ? done(s, Phase::kForward)
                                : gradient_done(s + 1);
    }
  }

  void finish(int64_t s, const Cell& c, int64_t t) {
    end_[index(s, c.phase, c.micro_batch)] = t;
  }

 private:
  size_t index(int64_t s, Phase p, int64_t j) const {
    return static_cast<size_t>((kPhases * s + slot(p)) * micro_batches_ + j);
  }
  int64_t at(int64_t s, Phase p, int64_t j) const {
    return end_[index(s, p, j)];
  }

  int64_t stages_;
  int64_t micro_batches_;
  std::vector<int64_t> end_;
};

} // namespace

const char* phase_name(Phase phase) {
  switch (phase) {
    case Phase::kForward:
      return "forward";
    case Phase::kBackward:
      return "backward";
    case Phase::kBackwardInput:
      return "backward_input";
    case Phase::kBackwardWeight:
      return "backward_weight";
  }
  return "?";
}

Schedule gpipe_schedule(int64_t stages, int64_t micro_batches) {
  check_shape(stages, micro_batches);
  Schedule schedule(stages);
  for (auto& cells : schedule) {
    cells.reserve(2 * micro_batches);
    for (int64_t j = 0; j < micro_batches; ++j) {
      cells.push_back({j, Phase::kForward});
    }
    for (int64_t j = micro_batches - 1; j >= 0; --j) {
      cells.push_back({j, Phase::kBackward});
    }
  }
  return schedule;
}

Schedule one_f_one_b_schedule(int64_t stages, int64_t micro_batches) {
  check_shape(stages, micro_batches);
  Schedule schedule(stages);
  for (int64_t s = 0; s < stages; ++s) {
    auto& cells = schedule[s];
    const int64_t warmup = std::min(stages - 1 - s, micro_batches);
    int64_t next_forward = 0;
    int64_t next_backward = 0;
    for (; next_forward < warmup; ++next_forward) {
      cells.push_back({next_forward, Phase::kForward});
    }
    while (next_forward < micro_batches) {
      cells.push_back({next_forward++, Phase::kForward});
      cells.push_back({next_backward++, Phase::kBackward});
    }
    while (next_backward < micro_batches) {
      cells.push_back({next_backward++, Phase::kBackward});
    }
  }
  return schedule;
}

Schedule zb_h1_schedule(int64_t stages, int64_t micro_batches) {
  return zero_bubble(stages, micro_batches,
                     [&](int64_t s) { return stages - s; });
}

Schedule zb_h2_schedule(int64_t stages, int64_t micro_batches) {
  return zero_bubble(stages, micro_batches,
                     [&](int64_t s) { return 2 * (stages - s) - 1; });
}

Schedule interleaved_schedule(int64_t workers, int64_t virtual_stages,
                              int64_t micro_batches) {
  check_shape(workers, micro_batches);
  TORCH_CHECK_VALUE(virtual_stages >= 1,
                    "virtual_stages must be at least 1, got ", virtual_stages);
  if (virtual_stages == 1) {
    return one_f_one_b_schedule(workers, micro_batches);
  }
  const int64_t k = workers;
  const int64_t v = virtual_stages;
  const int64_t m = micro_batches;
  // Worker d's forwards in order: micro-batches in groups of K, each group
  // through chunk 0, then chunk 1, ...; its backwards in the same order with
  // the chunks reversed.
  std::vector<Cell> forwards, backwards;
  for (int64_t g = 0; g * k < m; ++g) {
    for (int64_t c = 0; c < v; ++c) {
      for (int64_t j = g * k; j < std::min(m, (g + 1) * k); ++j) {
        forwards.push_back({j, Phase::kForward, c});
        backwards.push_back({j, Phase::kBackward, v - 1 - c});
      }
    }
  }
  const auto total = static_cast<int64_t>(forwards.size());
  auto row = [&](int64_t warmup) {
    std::vector<Cell> cells(forwards.begin(), forwards.begin() + warmup);
    cells.reserve(2 * total);
    for (int64_t i = warmup; i < total; ++i) {
      cells.push_back(forwards[i]);
      cells.push_back(backwards[i - warmup]);
    }
    cells.insert(cells.end(), backwards.begin() + (total - warmup),
                 backwards.end());
    return cells;
  };
  std::vector<int64_t> warmup(k);
  Schedule schedule(k);
  for (int64_t d = 0; d < k; ++d) {
    warmup[d] = std::min(2 * (k - d - 1) + (v - 1) * k, total);
    schedule[d] = row(warmup[d]);
  }
  // When the order deadlocks (M not a multiple of K), every worker warms up
  // one forward longer, until it does not; all forwards first is a valid
  // order, so this ends.
  for (;;) {
    try {
      schedule_clocks(schedule, m);
      return schedule;
    } catch (const c10::ValueError&) {
    }
    bool grown = false;
    for (int64_t d = 0; d < k; ++d) {
      if (warmup[d] < total) {
        schedule[d] = row(++warmup[d]);
        grown = true;
      }
    }
    TORCH_CHECK(grown, "interleaved_schedule: no valid order for K=", k,
                ", v=", v, ", M=", m);
  }
}

Schedule interleaved_zb_schedule(int64_t workers, int64_t virtual_stages,
                                 int64_t micro_batches) {
  // Interleaved 1F1B's order is valid for every K, v, M, and a W waits on
  // nothing but its own B: Ws placed anywhere after their B keep it valid.
  Schedule order =
      interleaved_schedule(workers, virtual_stages, micro_batches);
  const auto peaks = peak_activations(order);
  // The largest peak, not each worker's own: with their own (lower) caps
  // the later workers run their Ws at once and the drain stays unfilled
  // (design.md, decision 21).
  const int64_t cap = *std::max_element(peaks.begin(), peaks.end());
  for (auto& cells : order) {
    for (auto& c : cells) {
      if (c.phase == Phase::kBackward) {
        c.phase = Phase::kBackwardInput;
      }
    }
  }
  // The replay (schedule.h). It cannot stall: before each forward of
  // interleaved 1F1B's order a worker holds at most its peak - 1
  // micro-batches between F and B, so at the cap it owes a W to run.
  const int64_t k = workers;
  CellEnds ends(k * virtual_stages, micro_batches);
  Schedule schedule(k);
  std::vector<size_t> next(k, 0);
  std::vector<std::deque<Cell>> owed(k);
  std::vector<int64_t> held(k, 0);
  for (int64_t t = 0;; ++t) {
    bool left = false;
    bool started = false;
    for (int64_t d = 0; d < k; ++d) {
      const Cell* due =
          next[d] < order[d].size() ? &order[d][next[d]] : nullptr;
      left = left || due != nullptr || !owed[d].empty();
      Cell c{};
      if (due != nullptr && ends.ready(due->chunk * k + d, *due, t) &&
          (due->phase != Phase::kForward || held[d] < cap)) {
        c = *due;
        ++next[d];
      } else if (!owed[d].empty()) {
        c = owed[d].front();
        owed[d].pop_front();
      } else {
        continue;
      }
      ends.finish(c.chunk * k + d, c, t + 1);
      schedule[d].push_back(c);
      started = true;
      if (c.phase == Phase::kForward) {
        ++held[d];
      } else if (c.phase == Phase::kBackwardInput) {
        owed[d].push_back({c.micro_batch, Phase::kBackwardWeight, c.chunk});
      } else {
        --held[d];
      }
    }
    if (!left) {
      return schedule;
    }
    TORCH_CHECK(started, "interleaved_zb_schedule: no cell can run at clock ",
                t, " for K=", k, ", v=", virtual_stages, ", M=",
                micro_batches);
  }
}

bool is_fill_drain(const Schedule& schedule) {
  for (const auto& cells : schedule) {
    bool seen_backward = false;
    for (const auto& cell : cells) {
      if (cell.phase != Phase::kForward) {
        seen_backward = true;
      } else if (seen_backward) {
        return false;
      }
    }
  }
  return true;
}

int64_t virtual_stages_of(const Schedule& schedule) {
  int64_t v = 1;
  for (const auto& cells : schedule) {
    for (const auto& c : cells) {
      v = std::max(v, c.chunk + 1);
    }
  }
  return v;
}

std::vector<std::vector<int64_t>> schedule_clocks(const Schedule& schedule,
                                                  int64_t micro_batches) {
  const auto workers = static_cast<int64_t>(schedule.size());
  check_shape(workers, micro_batches);
  const int64_t v = virtual_stages_of(schedule);
  const int64_t stages = workers * v;
  // Stage of row r's cell c.
  auto stage_of = [&](int64_t r, const Cell& c) { return c.chunk * workers + r; };
  // seen[kPhases * stage + phase][j]: how often that cell runs so far.
  std::vector<std::vector<int64_t>> seen(kPhases * stages,
                                         std::vector<int64_t>(micro_batches, 0));
  for (int64_t r = 0; r < workers; ++r) {
    for (size_t i = 0; i < schedule[r].size(); ++i) {
      const auto& cell = schedule[r][i];
      const int64_t j = cell.micro_batch;
      TORCH_CHECK_VALUE(cell.chunk >= 0, "schedule: row ", r, " cell ", i,
                        " names chunk ", cell.chunk, ", expected >= 0");
      const int64_t s = stage_of(r, cell);
      auto count = [&](Phase p) -> int64_t& {
        return seen[kPhases * s + slot(p)][j];
      };
      TORCH_CHECK_VALUE(j >= 0 && j < micro_batches,
                        "schedule: stage ", s, " cell ", i, " names micro-batch ",
                        j, ", expected 0..", micro_batches - 1);
      TORCH_CHECK_VALUE(slot(cell.phase) >= 0 && slot(cell.phase) < kPhases,
                        "schedule: stage ", s, " cell ", i,
                        " has an unknown phase ", slot(cell.phase));
      TORCH_CHECK_VALUE(count(cell.phase) == 0, "schedule: stage ", s,
                        " runs the ", phase_name(cell.phase), " of micro-batch ",
                        j, " twice");
      TORCH_CHECK_VALUE(cell.phase == Phase::kForward ||
                            count(Phase::kForward) == 1,
                        "schedule: stage ", s, " runs the ",
                        phase_name(cell.phase), " of micro-batch ", j,
                        " before its forward");
      TORCH_CHECK_VALUE(cell.phase != Phase::kBackwardWeight ||
                            count(Phase::kBackwardInput) == 1,
                        "schedule: stage ", s,
                        " runs the backward_weight of micro-batch ", j,
                        " before its backward_input");
      ++count(cell.phase);
      const bool whole = count(Phase::kBackward) > 0;
      const bool split = count(Phase::kBackwardInput) > 0 ||
          count(Phase::kBackwardWeight) > 0;
      TORCH_CHECK_VALUE(!(whole && split), "schedule: stage ", s,
                        " runs both a whole backward and a split one "
                        "(backward_input / backward_weight) of micro-batch ",
                        j);
    }
  }
  for (int64_t s = 0; s < stages; ++s) {
    auto count = [&](Phase p, int64_t j) -> int64_t {
      return seen[kPhases * s + slot(p)][j];
    };
    for (int64_t j = 0; j < micro_batches; ++j) {
      TORCH_CHECK_VALUE(count(Phase::kForward, j) == 1, "schedule: stage ", s,
                        " never runs the forward of micro-batch ", j);
      const bool input = count(Phase::kBackwardInput, j) == 1;
      const bool weight = count(Phase::kBackwardWeight, j) == 1;
      TORCH_CHECK_VALUE(count(Phase::kBackward, j) == 1 || input || weight,
                        "schedule: stage ", s,
                        " never runs the backward of micro-batch ", j);
      TORCH_CHECK_VALUE(input || !weight, "schedule: stage ", s,
                        " never runs the backward_input of micro-batch ", j);
      TORCH_CHECK_VALUE(weight || !input, "schedule: stage ", s,
                        " runs the backward_input of micro-batch ", j,
                        " but never its backward_weight");
    }
  }

  CellEnds ends(stages, micro_batches);
  std::vector<std::vector<int64_t>> clocks(workers);
  std::vector<size_t> next(workers, 0);
  size_t remaining = 0;
  for (const auto& cells : schedule) {
    remaining += cells.size();
  }
  for (int64_t t = 0; remaining > 0; ++t) {
    std::vector<int64_t> started;
    for (int64_t r = 0; r < workers; ++r) {
      if (next[r] < schedule[r].size() &&
          ends.ready(stage_of(r, schedule[r][next[r]]), schedule[r][next[r]],
                     t)) {
        started.push_back(r);
      }
    }
    if (started.empty()) {
      for (int64_t r = 0; r < workers; ++r) {
        if (next[r] < schedule[r].size()) {
          const auto& c = schedule[r][next[r]];
          TORCH_CHECK_VALUE(false, "schedule deadlocks: stage ",
                            stage_of(r, c), " waits forever at the ",
                            phase_name(c.phase), " of micro-batch ",
                            c.micro_batch);
        }
      }
    }
    for (int64_t r : started) {
      const auto& c = schedule[r][next[r]++];
      ends.finish(stage_of(r, c), c, t + 1);
      clocks[r].push_back(t);
      --remaining;
    }
  }
  return clocks;
}

void validate_schedule(const Schedule& schedule, int64_t micro_batches) {
  schedule_clocks(schedule, micro_batches);
}

std::string render_schedule(const Schedule& schedule, int64_t micro_batches) {
  const auto clocks = schedule_clocks(schedule, micro_batches);
  int64_t span = 0;
  for (const auto& row : clocks) {
    for (auto t : row) {
      span = std::max(span, t + 1);
    }
  }
  const int64_t v = virtual_stages_of(schedule);
  const size_t width = std::to_string(micro_batches - 1).size() + 2 +
      (v > 1 ? std::to_string(v - 1).size() + 1 : 0);
  auto pad = [&](std::string s) {
    return std::string(width > s.size() ? width - s.size() : 0, ' ') + s;
  };
  std::ostringstream out;
  const std::string head = "stage" + std::to_string(schedule.size() - 1);
  out << std::string(head.size() > 5 ? head.size() - 5 : 0, ' ') << "clock";
  for (int64_t t = 0; t < span; ++t) {
    out << pad(std::to_string(t));
  }
  out << '\n';
  for (size_t s = 0; s < schedule.size(); ++s) {
    std::vector<std::string> row(span, std::string(width, ' '));
    for (size_t i = 0; i < schedule[s].size(); ++i) {
      const auto& c = schedule[s][i];
      const char* letter = c.phase == Phase::kForward ? "F"
          : c.phase == Phase::kBackwardWeight       ? "W"
                                                    : "B";
      row[clocks[s][i]] = pad(
          letter + std::to_string(c.micro_batch) +
          (v > 1 ? "." + std::to_string(c.chunk) : std::string()));
    }
    std::string name = "stage" + std::to_string(s);
    out << std::string(head.size() - name.size(), ' ') << name;
    std::string line;
    for (const auto& r : row) {
      line += r;
    }
    line.erase(line.find_last_not_of(' ') + 1);
    out << line << '\n';
  }
  return out.str();
}

std::vector<int64_t> peak_activations(const Schedule& schedule) {
  std::vector<int64_t> peaks;
  peaks.reserve(schedule.size());
  for (const auto& cells : schedule) {
    int64_t alive = 0;
    int64_t peak = 0;
    for (const auto& c : cells) {
      if (c.phase == Phase::kForward) {
        peak = std::max(peak, ++alive);
      } else if (c.phase != Phase::kBackwardInput) {
        --alive;
      }
    }
    peaks.push_back(peak);
  }
  return peaks;
}

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "gpipe") {
    return ScheduleKind::kGPipe;
  }
  if (name == "zb-h1") {
    return ScheduleKind::kZBH1;
  }
  if (name == "zb-h2") {
    return ScheduleKind::kZBH2;
  }
  if (name == "interleaved") {
    return ScheduleKind::kInterleaved;
  }
  if (name == "interleaved-zb") {
    return ScheduleKind::kInterleavedZB;
  }
  TORCH_CHECK_VALUE(name == "1f1b",
                    "schedule must be 'gpipe', '1f1b', 'zb-h1', 'zb-h2', "
                    "'interleaved' or 'interleaved-zb', got '", name, "'");
  return ScheduleKind::k1F1B;
}

Schedule make_schedule(ScheduleKind kind, int64_t stages,
                       int64_t micro_batches, int64_t virtual_stages) {
  TORCH_CHECK_VALUE(virtual_stages >= 1,
                    "virtual_stages must be at least 1, got ", virtual_stages);
  TORCH_CHECK_VALUE(virtual_stages == 1 || takes_virtual_stages(kind),
                    "virtual_stages = ", virtual_stages,
                    " needs the 'interleaved' or 'interleaved-zb' schedule");
  switch (kind) {
    case ScheduleKind::kInterleaved:
      return interleaved_schedule(stages, virtual_stages, micro_batches);
    case ScheduleKind::kInterleavedZB:
      return interleaved_zb_schedule(stages, virtual_stages, micro_batches);
    case ScheduleKind::kGPipe:
      return gpipe_schedule(stages, micro_batches);
    case ScheduleKind::k1F1B:
      return one_f_one_b_schedule(stages, micro_batches);
    case ScheduleKind::kZBH1:
      return zb_h1_schedule(stages, micro_batches);
    case ScheduleKind::kZBH2:
      return zb_h2_schedule(stages, micro_batches);
  }
  TORCH_CHECK_VALUE(false, "unknown schedule kind ", static_cast<int>(kind));
}

} // namespace pipegear
