// What the catalog's translation units share (catalog.cc, catalog_group.cc):
// the stored form of records and the key of a group member's point.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "engine/base/status.h"

namespace google::protobuf {
class MessageLite;
}

namespace cairn::catalog_internal {

// A record's stored form: [u8 version][protobuf][u64 XXH3-64 of the bytes
// before it]. Unseal: kDataLoss (naming `key`) if truncated, damaged or
// unparsable.
std::string Seal(const google::protobuf::MessageLite& m);
Status Unseal(std::string_view bytes, std::string_view key, google::protobuf::MessageLite* m);

// groupmember/<group>/<seq, 20 digits>/<volume> -> the member's point
std::string GroupMemberKey(std::string_view group, uint64_t seq, std::string_view volume);

}  // namespace cairn::catalog_internal
