// libFuzzer target: the spool reader over an arbitrary file.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "engine/spool/spool.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path =
      (std::filesystem::temp_directory_path() / ("cairn-spool-fuzz-" + std::to_string(getpid())))
          .string();
  // libFuzzer ends a timed run with exit(): the scratch file goes with it
  // (registered once `path` is made, so it runs before `path` is destroyed).
  static const bool removed_at_exit = std::atexit([] { std::remove(path.c_str()); }) == 0;
  (void)removed_at_exit;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  auto reader = cairn::SpoolReader::Open(path, cairn::SpoolIdentity{});
  if (reader.ok()) {
    for (int i = 0; i < 64; ++i) {
      if (!(*reader)->Next().ok()) break;
    }
  }
  return 0;
}
