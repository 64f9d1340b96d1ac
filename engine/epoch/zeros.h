// Zero detection shared by the source (runs of zeros travel as zero
// records) and the standby (RevertToPoint writes zeros as zeros, so the
// image stays sparse). Internal to engine/epoch/.
//
// Thread-safety: pure function.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>

namespace cairn {

// True if every byte of `b` is zero. Cost: one pass over `b`, 8 bytes at a
// time.
inline bool IsAllZero(std::span<const char> b) {
  size_t i = 0;
  for (; i + 8 <= b.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, b.data() + i, 8);
    if (w != 0) return false;
  }
  for (; i < b.size(); ++i) {
    if (b[i] != 0) return false;
  }
  return true;
}

}  // namespace cairn
