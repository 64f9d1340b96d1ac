#include "engine/base/thread_stack.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <thread>
#include <vector>

namespace cairn {
namespace {

constexpr size_t kDeep = 256 * 1024;

// Touches kDeep bytes of stack and returns where they lay.
[[gnu::noinline]] uintptr_t RunDeep() {
  volatile char buf[kDeep];
  for (size_t i = 0; i < kDeep; i += 512) buf[i] = 1;
  return reinterpret_cast<uintptr_t>(&buf[0]);
}

// How many of the pages of [addr, addr + len) are resident.
size_t ResidentPages(uintptr_t addr, size_t len) {
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t low = (addr + page - 1) / page * page;
  const uintptr_t high = (addr + len) / page * page;
  std::vector<unsigned char> vec((high - low) / page);
  EXPECT_EQ(mincore(reinterpret_cast<void*>(low), high - low, vec.data()), 0);
  size_t n = 0;
  for (unsigned char v : vec) n += v & 1;
  return n;
}

TEST(ThreadStackTest, PagesBelowTheCallerGoBackToTheKernel) {
  size_t before = 0;
  size_t after = 0;
  std::thread([&] {
    const uintptr_t deep = RunDeep();
    // The deep frame's pages, less the top 32 KiB (the margin kept for this
    // frame lies within them).
    before = ResidentPages(deep, kDeep - 32 * 1024);
    ReleaseStackBelowHere();
    after = ResidentPages(deep, kDeep - 32 * 1024);
  }).join();
  EXPECT_GT(before, 40u) << "the deep call did not leave its pages resident";
  EXPECT_EQ(after, 0u) << "pages below the caller stayed resident";
}

TEST(ThreadStackTest, TheMainThreadIsLeftAlone) {
  // glibc cannot bound the main thread's stack without /proc: no release.
  const uintptr_t deep = RunDeep();
  const size_t before = ResidentPages(deep, kDeep - 32 * 1024);
  ReleaseStackBelowHere();
  EXPECT_GT(before, 40u) << "the deep call did not leave its pages resident";
  EXPECT_EQ(ResidentPages(deep, kDeep - 32 * 1024), before);
}

}  // namespace
}  // namespace cairn
