#include "engine/base/memory_budget.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace cairn {
namespace {

const auto kNever = [] { return false; };

TEST(MemoryBudget, LendsWhatIsFreeDownToTheMinimumAndTakesItBack) {
  MemoryBudget b(100);
  auto a = b.Acquire(60, 10, kNever);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->bytes(), 60u);
  auto c = b.Acquire(60, 10, kNever);  // only 40 left: less than wanted
  ASSERT_TRUE(c);
  EXPECT_EQ(c->bytes(), 40u);
  EXPECT_EQ(b.in_use(), 100u);
  a.reset();
  EXPECT_EQ(b.in_use(), 40u);
  c.reset();
  EXPECT_EQ(b.in_use(), 0u);
  EXPECT_EQ(b.peak(), 100u);
  // A minimum larger than the whole budget waits for all of it.
  auto all = b.Acquire(500, 500, kNever);
  ASSERT_TRUE(all);
  EXPECT_EQ(all->bytes(), 100u);
}

TEST(MemoryBudget, AWaiterGetsMemoryWhenItIsReturnedOrGivesUpWhenCancelled) {
  MemoryBudget b(100);
  std::atomic<bool> got{false};
  std::thread waiter;
  {
    auto held = b.Acquire(100, 100, kNever);
    ASSERT_TRUE(held);
    waiter = std::thread([&] {
      auto l = b.Acquire(50, 50, kNever);
      got = l.has_value() && l->bytes() == 50;
    });
  }  // returned: the waiter may have blocked or not yet; it gets 50 either way
  waiter.join();
  EXPECT_TRUE(got);

  auto all = b.Acquire(100, 100, kNever);
  ASSERT_TRUE(all);
  std::atomic<bool> cancel{false};
  std::atomic<bool> gave_up{false};
  std::thread stopping([&] { gave_up = !b.Acquire(10, 10, [&] { return cancel.load(); }); });
  cancel = true;
  b.Wake();
  stopping.join();
  EXPECT_TRUE(gave_up);
  EXPECT_EQ(b.in_use(), 100u);
}

TEST(MemoryBudget, ManyBorrowersNeverExceedIt) {
  MemoryBudget b(64);
  std::vector<std::thread> ts;
  std::atomic<uint64_t> worst{0};
  for (int i = 0; i < 16; ++i) {
    ts.emplace_back([&] {
      for (int k = 0; k < 200; ++k) {
        auto l = b.Acquire(16, 4, kNever);
        const uint64_t now = b.in_use();
        uint64_t w = worst.load();
        while (now > w && !worst.compare_exchange_weak(w, now)) {
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_LE(worst.load(), 64u);
  EXPECT_EQ(b.in_use(), 0u);
}

}  // namespace
}  // namespace cairn
