// Pacer and PacedLink (engine/link/paced_link.h) on a ManualClock: a burst
// goes at once, then each frame waits until the bytes before it drained at
// the rate, across every link that shares the pacer; a closed link's Send
// stops waiting.
#include "engine/link/paced_link.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <thread>
#include <vector>

namespace cairn {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t kMiB = 1 << 20;

TEST(PacerTest, ABurstGoesAtOnceThenFramesWaitForTheRate) {
  ManualClock clock;
  Pacer pacer(kMiB, kMiB, clock);  // 1 MiB/s, a burst of 1 MiB
  std::atomic<bool> cancelled{false};
  // Idle: the first MiB (the burst) and the next frame go at once.
  ASSERT_TRUE(pacer.Take(kMiB, cancelled).ok());
  ASSERT_TRUE(pacer.Take(kMiB, cancelled).ok());
  // 2 MiB reserved: the third waits until only a burst of them is left (1 s).
  std::atomic<bool> went{false};
  std::thread third([&] {
    EXPECT_TRUE(pacer.Take(kMiB, cancelled).ok());
    went = true;
  });
  ASSERT_TRUE(clock.AwaitDeadlines(1, 10s)) << "the third frame did not wait for its turn";
  clock.Advance(999ms);
  ASSERT_TRUE(clock.AwaitDeadlines(1, 10s)) << "the third frame went 1 ms early";
  EXPECT_FALSE(went);
  clock.Advance(1ms);
  third.join();
  EXPECT_TRUE(went);
}

TEST(PacerTest, LinksSharingAPacerShareItsRate) {
  ManualClock clock;
  auto pacer = std::make_shared<Pacer>(kMiB, 0, clock);  // no burst
  auto [a1, b1] = MakeMemoryLinkPair(8 * kMiB);
  auto [a2, b2] = MakeMemoryLinkPair(8 * kMiB);
  PacedLink one(std::move(a1), pacer), two(std::move(a2), pacer);
  const std::vector<char> half(kMiB / 2 - kFrameHeaderSize - 1, 'x');  // 512 KiB a frame
  ASSERT_TRUE(one.Send(FrameType::kRecord, "b", half).ok());           // at once: nothing before it
  auto second =
      std::async(std::launch::async, [&] { return two.Send(FrameType::kRecord, "b", half).ok(); });
  ASSERT_TRUE(clock.AwaitDeadlines(1, 10s)) << "the other link's frame did not wait";
  clock.Advance(499ms);
  ASSERT_TRUE(clock.AwaitDeadlines(1, 10s)) << "the other link's frame went early";
  EXPECT_EQ(second.wait_for(0s), std::future_status::timeout);
  clock.Advance(1ms);
  EXPECT_TRUE(second.get());
  EXPECT_TRUE(b1->Receive(1s).ok());
  EXPECT_TRUE(b2->Receive(1s).ok());
}

TEST(PacerTest, CloseEndsASendWaitingForItsTurn) {
  ManualClock clock;
  auto pacer = std::make_shared<Pacer>(64 * 1024, 0, clock);
  auto [a, b] = MakeMemoryLinkPair(8 * kMiB);
  PacedLink link(std::move(a), pacer);
  const std::vector<char> big(kMiB, 'y');
  ASSERT_TRUE(link.Send(FrameType::kRecord, "b", big).ok());  // 16 s of the rate reserved
  auto waiting =
      std::async(std::launch::async, [&] { return link.Send(FrameType::kRecord, "b", big); });
  ASSERT_TRUE(clock.AwaitDeadlines(1, 10s));
  link.Close();
  const Status st = waiting.get();
  EXPECT_EQ(st.code(), Code::kAborted) << st.ToString();
  EXPECT_NE(st.message().find("max_send_rate"), std::string::npos) << st.ToString();
}

}  // namespace
}  // namespace cairn
