// The Clock seam: the manual clock wakes a waiter when, and only when, its
// deadline comes, and never loses a wakeup to a waiter about to block.
#include "engine/base/clock.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace cairn {
namespace {

using std::chrono::seconds;
constexpr std::chrono::milliseconds kRealDeadline(10'000);

TEST(ManualClockTest, TimeMovesOnlyByAdvance) {
  ManualClock clock(1'000);
  const auto t0 = clock.Now();
  EXPECT_EQ(clock.Now(), t0);
  EXPECT_EQ(clock.UnixNs(), 1'000);
  clock.Advance(seconds(3));
  EXPECT_EQ(clock.Now() - t0, seconds(3));
  EXPECT_EQ(clock.UnixNs(), 1'000 + 3'000'000'000);
  EXPECT_DOUBLE_EQ(clock.SecondsSince(t0), 3.0);
}

TEST(ManualClockTest, AWaiterWakesWhenItsDeadlineComesNotBefore) {
  ManualClock clock;
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int> outcome{-1};  // -1: still waiting; 0: deadline passed
  const auto deadline = clock.Now() + seconds(10);
  std::thread waiter([&] {
    std::unique_lock lock(mu);
    outcome = clock.WaitUntil(lock, cv, deadline, [] { return false; }) ? 1 : 0;
  });
  ASSERT_TRUE(clock.AwaitDeadlines(1, kRealDeadline)) << "the waiter never blocked on the clock";
  clock.Advance(seconds(9));
  // Not due: it is still blocked on the clock (woken spuriously at most,
  // and then back).
  ASSERT_TRUE(clock.AwaitDeadlines(1, kRealDeadline)) << "the waiter left before its deadline";
  EXPECT_EQ(outcome.load(), -1);
  clock.Advance(seconds(1));
  waiter.join();
  EXPECT_EQ(outcome.load(), 0) << "the deadline passed but the wait did not say so";
}

TEST(ManualClockTest, ANotifiedWaiterReturnsWithItsConditionTrue) {
  ManualClock clock;
  std::mutex mu;
  std::condition_variable cv;
  bool ready = false;
  bool met = false;
  std::thread waiter([&] {
    std::unique_lock lock(mu);
    met = clock.WaitUntil(lock, cv, clock.Now() + seconds(60), [&] { return ready; });
  });
  ASSERT_TRUE(clock.AwaitDeadlines(1, kRealDeadline));
  {
    std::lock_guard lock(mu);
    ready = true;
  }
  cv.notify_all();
  waiter.join();
  EXPECT_TRUE(met);
  EXPECT_FALSE(clock.AwaitDeadlines(1, std::chrono::milliseconds(0)))
      << "a waiter that left is still counted";
}

TEST(ManualClockTest, ADeadlineAlreadyPastReturnsAtOnce) {
  ManualClock clock;
  std::mutex mu;
  std::condition_variable cv;
  std::unique_lock lock(mu);
  EXPECT_FALSE(clock.WaitUntil(lock, cv, clock.Now()));
}

TEST(ManualClockTest, ManyAdvancesRacingManyWaitsLoseNoWakeup) {
  // Each round a thread waits for a deadline one second ahead while the
  // test advances by a second as soon as it blocks: every wait must end.
  ManualClock clock;
  std::mutex mu;
  std::condition_variable cv;
  constexpr int kRounds = 500;
  std::atomic<int> ended{0};
  std::thread waiter([&] {
    for (int i = 0; i < kRounds; ++i) {
      std::unique_lock lock(mu);
      clock.WaitUntil(lock, cv, clock.Now() + seconds(1), [] { return false; });
      ++ended;
    }
  });
  for (int i = 0; i < kRounds; ++i) {
    ASSERT_TRUE(clock.AwaitDeadlines(1, kRealDeadline)) << "round " << i << " never blocked";
    clock.Advance(seconds(1));
  }
  waiter.join();
  EXPECT_EQ(ended.load(), kRounds);
}

TEST(RealClockTest, WaitsUntilTheDeadlineOnTheMachinesClock) {
  Clock& clock = RealClock();
  std::mutex mu;
  std::condition_variable cv;
  std::unique_lock lock(mu);
  const auto start = clock.Now();
  EXPECT_FALSE(
      clock.WaitUntil(lock, cv, start + std::chrono::milliseconds(20), [] { return false; }));
  EXPECT_GE(clock.Now() - start, std::chrono::milliseconds(20));
  EXPECT_GT(clock.UnixNs(), int64_t{1'700'000'000} * 1'000'000'000);
}

}  // namespace
}  // namespace cairn
