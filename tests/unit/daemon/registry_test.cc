// The registry's records: what older versions wrote still decodes, and a
// group survives the round trip.
#include "engine/daemon/registry.h"

#include <gtest/gtest.h>

namespace cairn {
namespace {

TEST(Registry, ARegistrationRoundTripsWithAndWithoutAGroup) {
  Registration r{"vol-1", "volumes", "volume-1", "standby", "volume-1.b", ""};
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
      r, Registration{"vol-1", "volumes", "volume-1", "standby", "volume-1.b", ""}));
  EXPECT_FALSE(SameRegistration(
      r, Registration{"vol-1", "volumes", "volume-1", "standby", "volume-2.b", "db1"}));
}

TEST(Registry, AMalformedRecordIsDataLossNamingIt) {
  auto r = DecodeRegistration("volume/vol-1", "pool=volumes\ngarbage\n");
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  EXPECT_NE(r.status().message().find("volume/vol-1"), std::string::npos) << r.status().ToString();
}

}  // namespace
}  // namespace cairn
