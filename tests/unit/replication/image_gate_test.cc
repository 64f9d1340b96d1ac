// ImageGate: a sink's hold of an image and a source's snapshot of it
// never overlap.
#include "engine/replication/image_gate.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <future>

namespace cairn {
namespace {

using ::testing::HasSubstr;

TEST(ImageGate, NoSnapshotBeginsWhileASinkHoldsTheImage) {
  ImageGate gate;
  ImageGate::Token held = gate.Hold("rbd", "img");
  auto refused = gate.BeginSnapshot("rbd", "img");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr("rbd/img is being taken by this site's sink"));
  EXPECT_TRUE(gate.BeginSnapshot("rbd", "other").ok()) << "another image is not held";
  EXPECT_TRUE(gate.BeginSnapshot("rbd2", "img").ok()) << "an image of another pool is not held";

  // Holds nest: the image is free once the last goes.
  ImageGate::Token again = gate.Hold("rbd", "img");
  held.reset();
  EXPECT_FALSE(gate.BeginSnapshot("rbd", "img").ok());
  again.reset();
  EXPECT_TRUE(gate.BeginSnapshot("rbd", "img").ok());
}

TEST(ImageGate, AHoldWaitsForTheSnapshotsBeingTaken) {
  ImageGate gate;
  auto first = gate.BeginSnapshot("rbd", "img");
  auto second = gate.BeginSnapshot("rbd", "img");
  ASSERT_TRUE(first.ok() && second.ok());
  auto hold = std::async(std::launch::async, [&gate] { return gate.Hold("rbd", "img"); });
  // Bounded: a hold that does not wait returns at once.
  EXPECT_EQ(hold.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout)
      << "the hold did not wait for the snapshots being taken";
  first->reset();
  EXPECT_EQ(hold.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout)
      << "the hold did not wait for the second snapshot";
  second->reset();
  ASSERT_EQ(hold.wait_for(std::chrono::seconds(30)), std::future_status::ready)
      << "the hold never came once no snapshot was being taken";
  ImageGate::Token held = hold.get();
  EXPECT_FALSE(gate.BeginSnapshot("rbd", "img").ok());
}

TEST(ImageGate, PassesAndHoldsMayOutliveTheGate) {
  ImageGate::Token pass;
  ImageGate::Token held;
  {
    ImageGate gate;
    pass = gate.BeginSnapshot("rbd", "a").value();
    held = gate.Hold("rbd", "b");
  }
  pass.reset();
  held.reset();  // ASan: no use of the gate's state after it went
}

}  // namespace
}  // namespace cairn
