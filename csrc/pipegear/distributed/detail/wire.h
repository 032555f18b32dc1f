#pragma once
// Internal (never installed): the bytes of a message between two ranks of a
// distributed pipeline. What a Batch becomes on the wire and back, a
// failure notice ("poison"), and the notes (error texts) that the protocol's
// own messages carry. Pure ATen: nothing here knows c10d, a link or what a
// step is for; the transport (transport.h) sends and receives what this
// file lays out. docs/distributed.md, "Protocol", item 3.
//
// A message is one uint8 buffer: a header of int64 words, then, at the next
// 64-byte boundary, the payload (every defined, non-empty tensor,
// contiguous, each at a 64-byte aligned offset):
//
//   w[0] kind: kPacked (payload follows in this buffer), kSpill (payload in
//        a second message of exactly w[3] bytes), kPoison (a peer failed)
//   w[1] step   w[2] header words H   w[3] payload bytes
//   w[4] tensors (+ kOneTuple for a tuple of one tensor), then per tensor:
//        defined [dtype, requires_grad, ndim,
//        sizes..., offset, bytes]
//        (defined: bit 0 set for a tensor; the bits above hold 1 + the id
//        of a skip whose memory it shares, 0 for none: Message::shared)
//   poison: w[3] text bytes (after the header), w[4] origin, w[5] broken

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <pipegear/microbatch.h>

namespace pipegear::detail {

// Message kinds (the first word of a message).
constexpr int64_t kPacked = 1;
constexpr int64_t kSpill = 2;
constexpr int64_t kPoison = -1;
// Added to a message's tensor count for a tuple of one tensor.
constexpr int64_t kOneTuple = int64_t{1} << 32;
// The largest message header; the fixed message size with NCCL.
constexpr int64_t kHeaderBytes = 8192;

inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

// ---- notes ---------------------------------------------------------------
// The longest text of a failure in a header, an arrival or a poison message.
constexpr int64_t kNoteBytes = 4000;
constexpr int64_t kNoteWords = (kNoteBytes + 7) / 8;

/// Writes `text`, cut to kNoteBytes, at `at`; returns the bytes written.
int64_t put_note(int64_t* at, const std::string& text);
/// The note of `bytes` bytes (clamped to kNoteBytes) at `at`.
std::string get_note(const int64_t* at, int64_t bytes);
/// Words to send of a buffer whose note (at word `note_at`) holds `bytes`.
inline int64_t words_with_note(int64_t note_at, int64_t bytes) {
  return note_at + (bytes + 7) / 8;
}

// ---- a batch -------------------------------------------------------------
/// A Batch laid out as a message: its header words and where each tensor's
/// bytes go in the payload. The sender sets the kind (words[0]) once it
/// knows whether the payload fits the link (kPacked) or not (kSpill).
struct Encoded {
  std::vector<int64_t> words;
  std::vector<std::pair<torch::Tensor, int64_t>> parts;  // detached, offset
  int64_t payload = 0;                                   // bytes
  /// Where the payload starts in a packed message.
  int64_t base() const { return align64(8 * static_cast<int64_t>(words.size())); }
  int64_t total() const { return base() + payload; }
};

/// The layout of `tensors` in a message of `step`, with `shared`
/// (Message::shared: per tensor a skip id or -1; empty: none). ValueError
/// when the header would exceed kHeaderBytes (too many tensors).
Encoded encode_batch(const Batch& tensors, int64_t step,
                     const std::vector<int64_t>& shared = {});

/// The first buffer of a message, on the CPU: `bytes` long, the header
/// words at its start and zeros up to `zeroed` bytes (the rest is the
/// payload's, written by write_payload, or unused).
torch::Tensor write_head(const std::vector<int64_t>& words, int64_t bytes,
                         int64_t zeroed);

/// Copies every part of `e` into `buffer` (any device) at `at` + its offset.
void write_payload(const Encoded& e, const torch::Tensor& buffer, int64_t at);

/// A received message that does not say what it should (a truncated
/// header, a tensor outside the message): the transport adds who sent it.
struct BadMessage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The fixed words every message starts with, read from its header.
struct Head {
  int64_t kind = 0;
  int64_t step = 0;
  int64_t words = 0;    // header words H
  int64_t payload = 0;  // payload bytes (poison: its text's)
  int64_t base() const { return align64(8 * words); }
};

/// `head`: the first bytes of a message, on the CPU (at least 48).
Head read_head(const torch::Tensor& head);

/// BadMessage unless `h` is a batch (kPacked or kSpill) whose header fits
/// the `available` header bytes received.
void check_batch_head(const Head& h, int64_t available);

/// The tensors the header `head` describes, over their payload in `data`
/// from `data_offset` on, on `device`: views of the message's memory (no
/// copy), each keeping `data` alive. BadMessage for a header or a tensor
/// that does not fit. `shared`, when given, gets Message::shared.
Batch decode_batch(const torch::Tensor& head, const torch::Tensor& data,
                   int64_t data_offset, c10::Device device,
                   std::vector<int64_t>* shared = nullptr);

// ---- poison ----------------------------------------------------------------
/// What a failure notice says: the rank that failed first, whether its
/// transport is in an unknown state, its error.
struct Poison {
  int64_t step = 0;
  int64_t origin = -1;
  bool broken = false;
  std::string text;
};

/// A failure notice, on the CPU, cut to fit `capacity` bytes; `fixed`:
/// exactly `capacity` bytes long (NCCL), else only as long as it needs.
torch::Tensor encode_poison(const Poison& p, int64_t capacity, bool fixed);

/// The notice in `head` (kind kPoison), on the CPU.
Poison read_poison(const torch::Tensor& head);

} // namespace pipegear::detail
