#include "engine/format/payload_cache.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace cairn::payload_cache {
namespace {

// Sizes round up to 64 KiB: a frame of a 4 MiB block and the shorter last
// block of an image then share few classes.
constexpr size_t kClass = 64 * 1024;

size_t ClassOf(size_t n) { return (n + kClass - 1) / kClass * kClass; }

struct Cache {
  std::mutex mu;
  std::map<size_t, std::vector<void*>> free;  // by size class
  size_t bytes = 0;
  bool taken_since_trim = false;
};

Cache& TheCache() {
  static Cache* c = new Cache();  // never destroyed: frames may go at exit
  return *c;
}

}  // namespace

void* Take(size_t n) {
  const size_t size = ClassOf(n);
  Cache& c = TheCache();
  {
    std::lock_guard lock(c.mu);
    c.taken_since_trim = true;
    auto it = c.free.find(size);
    if (it != c.free.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      c.bytes -= size;
      return p;
    }
  }
  void* p = std::malloc(size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void Give(void* p, size_t n) noexcept {
  const size_t size = ClassOf(n);
  Cache& c = TheCache();
  {
    std::lock_guard lock(c.mu);
    if (c.bytes + size <= kMaxBytes) {
      try {
        c.free[size].push_back(p);
        c.bytes += size;
        return;
      } catch (const std::bad_alloc&) {
        // No room for the entry: freed below.
      }
    }
  }
  std::free(p);
}

size_t TrimIdle() noexcept {
  std::map<size_t, std::vector<void*>> gone;
  size_t freed = 0;
  Cache& c = TheCache();
  {
    std::lock_guard lock(c.mu);
    if (std::exchange(c.taken_since_trim, false)) return 0;
    gone.swap(c.free);
    freed = std::exchange(c.bytes, 0);
  }
  for (auto& [size, ps] : gone) {
    for (void* p : ps) std::free(p);
  }
  return freed;
}

size_t CachedBytes() noexcept {
  Cache& c = TheCache();
  std::lock_guard lock(c.mu);
  return c.bytes;
}

}  // namespace cairn::payload_cache
