#pragma once

#include <string>

namespace pipegear {

/// The library version, "major.minor.patch".
inline constexpr const char* kVersion = "0.1.0";

} // namespace pipegear
