#pragma once
// Include this instead of catch.hpp: c10's logging defines CHECK too, so
// torch goes first and Catch2's macros win.
#include <torch/torch.h>

#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#include <catch2/catch.hpp>
