// Turn a runtime flag into a compile-time constant (the flash-attention / causal-conv1d idiom):
//   BOOL_SWITCH(hw_flat, kHwFlat, [&] { launch<kHwFlat>(...); });
// Each branch instantiates the lambda body with its own constexpr value, so a kernel template
// parameter can depend on it and the untaken index arithmetic disappears from the kernel.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
