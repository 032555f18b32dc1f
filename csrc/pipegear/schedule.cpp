#include <pipegear/schedule.h>

#include <algorithm>
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

const char* phase_name(Phase phase) {
  return phase == Phase::kForward ? "forward" : "backward";
}

} // namespace

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

bool is_fill_drain(const Schedule& schedule) {
  for (const auto& cells : schedule) {
    bool seen_backward = false;
    for (const auto& cell : cells) {
      if (cell.phase == Phase::kBackward) {
        seen_backward = true;
      } else if (seen_backward) {
        return false;
      }
    }
  }
  return true;
}

std::vector<std::vector<int64_t>> schedule_clocks(const Schedule& schedule,
                                                  int64_t micro_batches) {
  const auto stages = static_cast<int64_t>(schedule.size());
  check_shape(stages, micro_batches);
  // done[phase][s][j]: the clock at which the cell ends, -1 if not yet run.
  std::vector<std::vector<int64_t>> seen(2 * stages,
                                         std::vector<int64_t>(micro_batches, 0));
  for (int64_t s = 0; s < stages; ++s) {
    for (size_t i = 0; i < schedule[s].size(); ++i) {
      const auto& cell = schedule[s][i];
      TORCH_CHECK_VALUE(cell.micro_batch >= 0 && cell.micro_batch < micro_batches,
                        "schedule: stage ", s, " cell ", i, " names micro-batch ",
                        cell.micro_batch, ", expected 0..", micro_batches - 1);
      auto& count = seen[2 * s + (cell.phase == Phase::kBackward)][cell.micro_batch];
      TORCH_CHECK_VALUE(count == 0, "schedule: stage ", s, " runs the ",
                        phase_name(cell.phase), " of micro-batch ",
                        cell.micro_batch, " twice");
      TORCH_CHECK_VALUE(cell.phase == Phase::kForward ||
                            seen[2 * s][cell.micro_batch] == 1,
                        "schedule: stage ", s, " runs the backward of micro-batch ",
                        cell.micro_batch, " before its forward");
      ++count;
    }
    for (int64_t j = 0; j < micro_batches; ++j) {
      for (int p = 0; p < 2; ++p) {
        TORCH_CHECK_VALUE(seen[2 * s + p][j] == 1, "schedule: stage ", s,
                          " never runs the ", phase_name(static_cast<Phase>(p)),
                          " of micro-batch ", j);
      }
    }
  }

  std::vector<std::vector<int64_t>> end(2 * stages,
                                        std::vector<int64_t>(micro_batches, -1));
  std::vector<std::vector<int64_t>> clocks(stages);
  std::vector<size_t> next(stages, 0);
  size_t remaining = 0;
  for (const auto& cells : schedule) {
    remaining += cells.size();
  }
  auto ready = [&](int64_t s, const Cell& c, int64_t t) {
    auto done = [&](int64_t stage, Phase p) {
      const int64_t e = end[2 * stage + (p == Phase::kBackward)][c.micro_batch];
      return e >= 0 && e <= t;
    };
    if (c.phase == Phase::kForward) {
      return s == 0 || done(s - 1, Phase::kForward);
    }
    return s == stages - 1 ? done(s, Phase::kForward)
                           : done(s + 1, Phase::kBackward);
  };
  for (int64_t t = 0; remaining > 0; ++t) {
    std::vector<int64_t> started;
    for (int64_t s = 0; s < stages; ++s) {
      if (next[s] < schedule[s].size() && ready(s, schedule[s][next[s]], t)) {
        started.push_back(s);
      }
    }
    if (started.empty()) {
      for (int64_t s = 0; s < stages; ++s) {
        if (next[s] < schedule[s].size()) {
          const auto& c = schedule[s][next[s]];
          TORCH_CHECK_VALUE(false, "schedule deadlocks: stage ", s,
                            " waits forever at the ", phase_name(c.phase),
                            " of micro-batch ", c.micro_batch);
        }
      }
    }
    for (int64_t s : started) {
      const auto& c = schedule[s][next[s]++];
      end[2 * s + (c.phase == Phase::kBackward)][c.micro_batch] = t + 1;
      clocks[s].push_back(t);
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
  const size_t width = std::to_string(micro_batches - 1).size() + 2;
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
      row[clocks[s][i]] =
          pad((c.phase == Phase::kForward ? "F" : "B") +
              std::to_string(c.micro_batch));
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

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "gpipe") {
    return ScheduleKind::kGPipe;
  }
  TORCH_CHECK_VALUE(name == "1f1b", "schedule must be 'gpipe' or '1f1b', got '",
                    name, "'");
  return ScheduleKind::k1F1B;
}

Schedule make_schedule(ScheduleKind kind, int64_t stages,
                       int64_t micro_batches) {
  return kind == ScheduleKind::kGPipe
      ? gpipe_schedule(stages, micro_batches)
      : one_f_one_b_schedule(stages, micro_batches);
}

} // namespace pipegear
