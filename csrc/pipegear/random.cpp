// How a cell gets random streams of its own (random.h).
//
// ATen's default generator is process-wide: a random operator called
// without a generator draws from the device's one generator, whichever
// thread calls it. Rewinding that generator for a recomputation (what
// torch.utils.checkpoint does) is only exact when no other thread draws
// meanwhile, which is never guaranteed when stages run on threads of their
// own. Instead, while a cell runs, its thread has a dispatch key of ours
// (kKey below) in its thread-local *included* set; it sits above autograd.
// Every operator with a `Generator?` argument
// gets a kernel for it here that, when the generator is None, puts the
// cell's own generator for the tensor's device in its place and redispatches
// below the key. Every other operator falls through the key: the
// dispatcher drops fallthrough keys when it computes the key set, so
// operators that draw nothing pay nothing.
//
// Operators that draw from the default generator without a generator
// argument (fused dropout and attention kernels on accelerators) run with the
// cell's generator state swapped into the device's default generator, under
// a per-device lock. On the CPU their implementations dispatch their draws
// (bernoulli_), which the kernels above catch.
#include <pipegear/detail/random.h>

#include <array>
#include <mutex>
#include <unordered_set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

namespace pipegear {
namespace detail {

struct CellRandomness::Streams {
  uint64_t seed = 0;
  int64_t first_layer = 0;
  int64_t micro_batch = 0;
  int64_t layer = 0;  // within the stage; set_random_layer

  struct Entry {
    int64_t key;
    c10::Device device;
    at::Generator generator;
  };
  std::vector<Entry> generators;  // few: one per (layer that draws, device)

  at::Generator& get(c10::Device device);
};

namespace {

thread_local CellRandomness::Streams* tls_streams = nullptr;

uint64_t mix(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t stream_seed(uint64_t step_seed, int64_t key, int64_t micro_batch,
                     c10::Device device) {
  uint64_t h = mix(step_seed);
  h = mix(h ^ static_cast<uint64_t>(key));
  h = mix(h ^ static_cast<uint64_t>(micro_batch));
  const uint64_t dev = (static_cast<uint64_t>(device.type()) << 8) |
      static_cast<uint8_t>(device.index());
  h = mix(h ^ dev);
  // mt19937 (the CPU generator) takes 32 bits of its seed: fold the rest in.
  return h ^ (h >> 32);
}

at::Generator new_generator(c10::Device device, uint64_t seed) {
  if (device.is_cpu()) {
    return at::make_generator<at::CPUGeneratorImpl>(seed);
  }
  // Device-generic: a copy of the device's default generator, reseeded
  // (Philox: the seed set, the offset back to 0).
  auto proto = at::globalContext().defaultGenerator(device);
  at::Generator gen;
  {
    std::lock_guard<std::mutex> lock(proto.mutex());
    gen = proto.clone();
  }
  gen.set_current_seed(seed);
  return gen;
}

} // namespace

at::Generator& CellRandomness::Streams::get(c10::Device device) {
  const int64_t key = first_layer + layer;
  for (auto& e : generators) {
    if (e.key == key && e.device == device) {
      return e.generator;
    }
  }
  generators.push_back(
      {key, device,
       new_generator(device, stream_seed(seed, key, micro_batch, device))});
  return generators.back().generator;
}

namespace {

// The key of the cells' random streams (see the top of this file and
// docs/design.md, decision 13): a mode key above autograd that no alias key
// (CompositeImplicitAutograd, ...) fills and that torch registers nothing
// for outside its own C++ tests.
constexpr auto kKey = c10::DispatchKey::TESTING_ONLY_GenericMode;

c10::DispatchKeySet below_key(c10::DispatchKeySet ks) {
  return ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey);
}

bool is_generator(const c10::Argument& a) {
  const auto& type = a.type();
  if (type->kind() == c10::TypeKind::GeneratorType) {
    return true;
  }
  if (type->kind() == c10::TypeKind::OptionalType) {
    return type->expectRef<c10::OptionalType>().getElementType()->kind() ==
        c10::TypeKind::GeneratorType;
  }
  return false;
}

// The device of the first tensor among the operator's arguments.
std::optional<c10::Device> first_device(c10::ArrayRef<c10::IValue> args) {
  for (const auto& v : args) {
    if (v.isTensor()) {
      const auto& t = v.toTensor();
      if (t.defined()) {
        return t.device();
      }
    } else if (v.isTensorList()) {
      for (const auto& t : v.toTensorList()) {
        const at::Tensor& tensor = t;
        if (tensor.defined()) {
          return tensor.device();
        }
      }
    }
  }
  return std::nullopt;
}

// Operators with a Generator argument: the cell's generator where the
// caller passed none.
void with_cell_generator(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                         torch::jit::Stack* stack) {
  if (tls_streams != nullptr) {
    const auto& args = op.schema().arguments();
    const size_t n = args.size();
    auto first = stack->end() - static_cast<std::ptrdiff_t>(n);
    for (size_t i = 0; i < n; ++i) {
      if (is_generator(args[i]) && first[static_cast<std::ptrdiff_t>(i)].isNone()) {
        if (auto device = first_device(c10::ArrayRef<c10::IValue>(&*first, n))) {
          first[static_cast<std::ptrdiff_t>(i)] =
              c10::IValue(tls_streams->get(*device));
        }
        break;
      }
    }
  }
  op.redispatchBoxed(below_key(ks), stack);
}

std::mutex& device_mutex(c10::Device device) {
  static std::array<std::mutex, 32> mutexes;
  return mutexes[(static_cast<size_t>(device.type()) * 8 +
                  static_cast<size_t>(device.index() + 1)) % mutexes.size()];
}

// Operators that draw from the device's default generator without a
// generator argument: on an accelerator, the cell's generator state is
// swapped in for the call and taken back after it.
void with_cell_state(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                     torch::jit::Stack* stack) {
  std::optional<c10::Device> device;
  if (tls_streams != nullptr) {
    const size_t n = op.schema().arguments().size();
    device = first_device(
        c10::ArrayRef<c10::IValue>(&*(stack->end() - static_cast<std::ptrdiff_t>(n)), n));
  }
  if (!device || device->is_cpu()) {
    op.redispatchBoxed(below_key(ks), stack);
    return;
  }
  at::Generator& mine = tls_streams->get(*device);
  auto global = at::globalContext().defaultGenerator(*device);
  std::lock_guard<std::mutex> lock(device_mutex(*device));
  at::Tensor saved;
  {
    std::lock_guard<std::mutex> g(global.mutex());
    saved = global.get_state();
    global.set_state(mine.get_state());
  }
  auto give_back = [&] {
    std::lock_guard<std::mutex> g(global.mutex());
    mine.set_state(global.get_state());
    global.set_state(saved);
  };
  try {
    op.redispatchBoxed(below_key(ks), stack);
  } catch (...) {
    give_back();
    throw;
  }
  give_back();
}

// Generator-less operators known to draw from the default generator.
constexpr std::array<const char*, 8> kStatefulRandom = {
    "aten::native_dropout",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
    "aten::_cudnn_attention_forward",
};

bool is_stateful_random(const c10::OperatorName& name) {
  for (const char* s : kStatefulRandom) {
    if (name.name == s) {
      return true;
    }
  }
  return false;
}

} // namespace

void register_random_kernels() {
  static std::mutex mutex;
  static std::unordered_set<c10::OperatorName> done;
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  std::lock_guard<std::mutex> lock(mutex);
  auto& dispatcher = c10::Dispatcher::singleton();
  if (!dispatcher.hasBackendFallbackForDispatchKey(kKey)) {
    libraries.push_back(std::make_unique<torch::Library>(
        torch::Library::IMPL, "_", kKey, __FILE__, __LINE__));
    libraries.back()->fallback(torch::CppFunction::makeFallthrough());
  }
  // One library per operator namespace (an impl must name its own).
  std::vector<std::pair<std::string, torch::Library*>> by_namespace;
  auto library_of = [&](const std::string& ns) -> torch::Library& {
    for (auto& [name, lib] : by_namespace) {
      if (name == ns) {
        return *lib;
      }
    }
    libraries.push_back(std::make_unique<torch::Library>(
        torch::Library::IMPL, ns, kKey, __FILE__, __LINE__));
    by_namespace.emplace_back(ns, libraries.back().get());
    return *libraries.back();
  };
  for (const auto& name : dispatcher.getAllOpNames()) {
    if (done.count(name) != 0) {
      continue;
    }
    auto op = dispatcher.findSchema(name);
    if (!op) {
      continue;  // no schema (yet)
    }
    done.insert(name);
    const auto full = name.overload_name.empty()
        ? name.name
        : name.name + "." + name.overload_name;
    const auto ns = name.getNamespace();
    if (!ns) {
      continue;
    }
    bool draws = false;
    for (const auto& a : op->schema().arguments()) {
      draws = draws || is_generator(a);
    }
    // A library only for a namespace that gets an impl: most have none.
    if (draws) {
      library_of(std::string(*ns)).impl(
          full.c_str(),
          torch::CppFunction::makeFromBoxedFunction<&with_cell_generator>());
    } else if (is_stateful_random(name)) {
      library_of(std::string(*ns)).impl(
          full.c_str(),
          torch::CppFunction::makeFromBoxedFunction<&with_cell_state>());
    }
  }
}

uint64_t draw_step_seed(bool advance) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  if (!advance) {
    auto copy = gen.clone();
    return at::check_generator<at::CPUGeneratorImpl>(copy)->random64();
  }
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
}

int64_t stream_key_of_stage(int64_t index) {
  return (index + 1) << 44;
}

CellRandomness::CellRandomness(uint64_t step_seed, int64_t first_layer,
                               int64_t micro_batch)
    : streams_(std::make_unique<Streams>()), previous_(tls_streams) {
  streams_->seed = step_seed;
  streams_->first_layer = first_layer;
  streams_->micro_batch = micro_batch;
  tls_streams = streams_.get();
  include_.emplace(kKey);
}

CellRandomness::~CellRandomness() {
  include_.reset();
  tls_streams = previous_;
}

} // namespace detail

void set_random_layer(int64_t layer) {
  if (detail::tls_streams != nullptr) {
    detail::tls_streams->layer = layer;
  }
}

} // namespace pipegear
