// The registry's records: what older versions wrote still decodes, and a
// group survives the round trip.
#include "engine/daemon/registry.h"

#include <gtest/gtest.h>

#include <optional>
#include <string>

namespace cairn {
namespace {

TEST(Registry, ARegistrationRoundTripsWithAndWithoutAGroup) {
  Registration r{"vol-1", "volumes", "volume-1", "standby", "volume-1.b", "", std::nullopt, {}};
  auto back = DecodeRegistration("volume/vol-1", EncodeRegistration(r));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->volume, "vol-1");
  EXPECT_EQ(back->target_image, "volume-1.b");
  EXPECT_EQ(back->group, "");
  EXPECT_EQ(EncodeRegistration(r).find("group"), std::string::npos)
      << "a registration without a group reads as an older version wrote it";
  r.group = "db1";
  back = DecodeRegistration("volume/vol-1", EncodeRegistration(r));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->group, "db1");
  // Another group is the same image to the same target: a move.
  EXPECT_TRUE(SameRegistration(
      r,
      Registration{"vol-1", "volumes", "volume-1", "standby", "volume-1.b", "", std::nullopt, {}}));
  EXPECT_FALSE(SameRegistration(
      r, Registration{
             "vol-1", "volumes", "volume-1", "standby", "volume-2.b", "db1", std::nullopt, {}}));
}

TEST(Registry, ItsOwnRetentionRulesRoundTripAndBadOnesAreDataLoss) {
  Registration r{"vol-1", "volumes", "volume-1", "standby", "volume-1.b", "db1", std::nullopt, {}};
  EXPECT_EQ(EncodeRegistration(r).find("keep_points"), std::string::npos)
      << "a registration without rules of its own reads as an older version wrote it";
  r.retention = RetentionRules{3, *ParseRetentionTiers("10m*6 60m*24 7d*4 1mo*12")};
  const std::string text = EncodeRegistration(r);
  EXPECT_NE(text.find("retention=10m*6 1h*24 1w*4 1mo*12\n"), std::string::npos) << text;
  auto back = DecodeRegistration("volume/vol-1", text);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->retention, r.retention);
  r.snapshot_tiers = *ParseRetentionTiers("1d*7");
  back = DecodeRegistration("volume/vol-1", EncodeRegistration(r));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->snapshot_tiers, r.snapshot_tiers);
  r.retention = RetentionRules{0, {}};  // keep every point
  back = DecodeRegistration("volume/vol-1", EncodeRegistration(r));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->retention, r.retention);
  for (const char* bad :
       {"keep_points=x\n", "keep_points=-1\n", "retention=1h\n", "snapshot_retention=1h\n"}) {
    auto broken = DecodeRegistration("volume/vol-1", "pool=p\nimage=i\n" + std::string(bad));
    EXPECT_EQ(broken.status().code(), Code::kDataLoss) << bad;
    EXPECT_NE(broken.status().message().find("volume/vol-1"), std::string::npos)
        << broken.status().ToString();
  }
}

TEST(Registry, AMalformedRecordIsDataLossNamingIt) {
  auto r = DecodeRegistration("volume/vol-1", "pool=volumes\ngarbage\n");
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  EXPECT_NE(r.status().message().find("volume/vol-1"), std::string::npos) << r.status().ToString();
}

}  // namespace
}  // namespace cairn
