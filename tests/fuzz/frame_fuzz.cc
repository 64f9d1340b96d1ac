// libFuzzer target: the frame parser and the epoch verifier. Any byte
// string must give frames or a clean error, never a crash, a hang or
// unbounded memory.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "engine/epoch/epoch.h"
#include "engine/format/frame.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cairn::StringSource src(std::string_view(reinterpret_cast<const char*>(data), size));
  cairn::EpochVerifier verifier("v", 0, cairn::ChainDigest());
  for (int i = 0; i < 64; ++i) {
    auto f = cairn::ReadFrame(src);
    if (!f.ok()) break;
    if (!verifier.Check(*f).ok()) break;
  }
  return 0;
}
