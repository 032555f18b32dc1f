#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pipegear {

/// The two kinds of work a stage does for a micro-batch.
enum class Phase : uint8_t { kForward, kBackward };

/// One unit of work of a stage: the forward or the backward of a micro-batch.
struct Cell {
  int64_t micro_batch;
  Phase phase;
  // Written out: a defaulted operator== is C++20, and the public headers
  // compile as C++17 (what the exported target requires of a consumer).
  bool operator==(const Cell& other) const {
    return micro_batch == other.micro_batch && phase == other.phase;
  }
  bool operator!=(const Cell& other) const { return !(*this == other); }
};

/// A schedule is data: for each stage, the cells it runs, in order. The
/// engine only executes it. A valid schedule for K stages and M micro-batches
/// holds every (stage, micro-batch, phase) exactly once, each stage runs a
/// micro-batch's forward before its backward, and running every stage's list
/// in order cannot deadlock given the data dependencies
///   F(s, j) <- F(s-1, j)        B(s, j) <- B(s+1, j), F(K-1, j) for s = K-1.
using Schedule = std::vector<std::vector<Cell>>;

/// GPipe (arXiv 1811.06965, figure 2): every stage runs all forwards in
/// micro-batch order (fill), then all backwards in reverse order (drain).
/// K=3, M=4 (F = forward, B = backward, digits = micro-batch):
///
///    clock  0  1  2  3  4  5  6  7  8  9 10 11
///   stage0 F0 F1 F2 F3             B3 B2 B1 B0
///   stage1    F0 F1 F2 F3       B3 B2 B1 B0
///   stage2       F0 F1 F2 F3 B3 B2 B1 B0
///
/// (render_schedule draws the exact table). Throws ValueError for
/// stages < 1 or micro_batches < 1.
Schedule gpipe_schedule(int64_t stages, int64_t micro_batches);

/// 1F1B (PipeDream-flush): after a warm-up of K-1-s forwards, stage s
/// alternates one forward and one backward; at most K-s activations are
/// alive per stage instead of M. Step style only (module style needs every
/// forward before any backward).
Schedule one_f_one_b_schedule(int64_t stages, int64_t micro_batches);

/// The schedule generators a pipeline can run.
enum class ScheduleKind : uint8_t { kGPipe, k1F1B };

/// "gpipe" or "1f1b"; ValueError otherwise.
ScheduleKind parse_schedule_kind(const std::string& name);

/// The schedule of `kind` for `stages` stages and `micro_batches`.
Schedule make_schedule(ScheduleKind kind, int64_t stages,
                       int64_t micro_batches);

/// True when every stage runs all its forwards before its first backward,
/// so the schedule splits into a fill pass and a drain pass (module style).
bool is_fill_drain(const Schedule& schedule);

/// The clock of every cell when each takes one unit of time and starts as
/// soon as its stage is free and its inputs are ready; same shape as the
/// schedule. Throws ValueError, naming the first offending cell, if the
/// schedule is invalid for `micro_batches` (missing or repeated cell,
/// backward before forward, deadlock).
std::vector<std::vector<int64_t>> schedule_clocks(const Schedule& schedule,
                                                  int64_t micro_batches);

/// Checks `schedule` for K = schedule.size() stages and `micro_batches`;
/// throws ValueError as schedule_clocks does.
void validate_schedule(const Schedule& schedule, int64_t micro_batches);

/// The ASCII clock table shown above, one row per stage.
std::string render_schedule(const Schedule& schedule, int64_t micro_batches);

} // namespace pipegear
