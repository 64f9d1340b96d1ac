// Group points: a consistency group's instant, restorable only whole.
#include <fmt/format.h>

#include <algorithm>
#include <charconv>

#include "engine/catalog/catalog.h"
#include "engine/catalog/catalog_internal.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace catalog_internal {

std::string GroupMemberKey(std::string_view group, uint64_t seq, std::string_view volume) {
  return fmt::format("groupmember/{}/{:020}/{}", group, seq, volume);
}

std::string GroupPointKey(std::string_view group, uint64_t seq) {
  return fmt::format("grouppoint/{}/{:020}", group, seq);
}

}  // namespace catalog_internal

namespace {

using catalog_internal::GroupPointKey;

std::string EncodeGroupPoint(const GroupPoint& g) {
  pb::GroupPoint m;
  m.set_group(g.group);
  m.set_seq(g.seq);
  m.set_source_time_ns(g.source_time_ns);
  for (const auto& v : g.volumes) m.add_volumes(v);
  return catalog_internal::Seal(m);
}

StatusOr<GroupPoint> DecodeGroupPoint(std::string_view bytes, std::string_view key) {
  pb::GroupPoint m;
  RETURN_IF_ERROR(catalog_internal::Unseal(bytes, key, &m));
  return GroupPoint{.group = m.group(),
                    .seq = m.seq(),
                    .source_time_ns = m.source_time_ns(),
                    .volumes = {m.volumes().begin(), m.volumes().end()}};
}

}  // namespace

Status Catalog::CompleteGroupPoint(std::string_view group, uint64_t seq, uint32_t members) {
  const std::string prefix = fmt::format("groupmember/{}/{:020}/", group, seq);
  ASSIGN_OR_RETURN(const auto kvs, kv_.Scan(prefix));
  if (kvs.size() < members) return OkStatus();  // not whole yet
  // Each member that completes it writes the same record: two members
  // applied at once both find it whole, and neither's write is wrong.
  GroupPoint g;
  g.group = std::string(group);
  g.seq = seq;
  for (const auto& [key, value] : kvs) {
    ASSIGN_OR_RETURN(const RestorePoint p, DecodeRestorePoint(value, key));
    g.volumes.push_back(p.epoch.volume);
    g.source_time_ns = std::max(g.source_time_ns, p.epoch.snap_time_ns);
  }
  std::sort(g.volumes.begin(), g.volumes.end());
  return kv_.Commit({{GroupPointKey(group, seq), EncodeGroupPoint(g)}}, {});
}

StatusOr<std::vector<GroupPoint>> Catalog::GroupPoints(std::string_view group) {
  RETURN_IF_ERROR(ValidateVolumeId(group).Annotate("group name"));
  ASSIGN_OR_RETURN(const auto kvs, kv_.Scan(fmt::format("grouppoint/{}/", group)));
  std::vector<GroupPoint> out;
  for (const auto& [key, value] : kvs) {
    ASSIGN_OR_RETURN(GroupPoint g, DecodeGroupPoint(value, key));
    out.push_back(std::move(g));
  }
  return out;  // keys sort by seq (20 digits)
}

StatusOr<GroupPoint> Catalog::GetGroupPoint(std::string_view group, uint64_t seq) {
  RETURN_IF_ERROR(ValidateVolumeId(group).Annotate("group name"));
  const std::string key = GroupPointKey(group, seq);
  auto v = kv_.Get(key);
  if (!v.ok() && v.status().code() == Code::kNotFound) {
    return NotFound(fmt::format("group {} has no restore point {}", group, seq));
  }
  RETURN_IF_ERROR(v.status());
  return DecodeGroupPoint(*v, key);
}

StatusOr<std::vector<std::string>> Catalog::Groups() {
  ASSIGN_OR_RETURN(const auto kvs, kv_.Scan("grouppoint/"));
  std::vector<std::string> out;
  for (const auto& [key, value] : kvs) {
    std::string_view rest = std::string_view(key).substr(std::string_view("grouppoint/").size());
    std::string name(rest.substr(0, rest.find('/')));
    if (out.empty() || out.back() != name) out.push_back(std::move(name));
  }
  return out;
}

}  // namespace cairn
