// Group points: a consistency group's instant, restorable only whole.
//
// A group point is not a record of its own: it is derived from its
// members' records (groupmember/<group>/<seq>/<volume>, each written in the
// same commit as that member's point). It exists exactly when the members
// of one instant, as many as the instant took and all from one source
// site, have theirs: made by the last member's commit, gone with any
// member's point. So no crash between two writes can leave every member's
// point of an instant without the group point, or the reverse.
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <map>

#include "engine/catalog/catalog.h"
#include "engine/catalog/catalog_internal.h"

namespace cairn {
namespace catalog_internal {

std::string GroupMemberKey(std::string_view group, uint64_t seq, std::string_view volume) {
  return fmt::format("groupmember/{}/{:020}/{}", group, seq, volume);
}

}  // namespace catalog_internal

namespace {

// The group points among the member records `kvs` (one group's, in key
// order: by seq), oldest first.
StatusOr<std::vector<GroupPoint>> WholeInstants(std::string_view group,
                                                const std::map<std::string, std::string>& kvs) {
  std::map<uint64_t, std::vector<RestorePoint>> by_seq;
  for (const auto& [key, value] : kvs) {
    ASSIGN_OR_RETURN(RestorePoint p, DecodeRestorePoint(value, key));
    by_seq[p.epoch.seq].push_back(std::move(p));
  }
  std::vector<GroupPoint> out;
  for (const auto& [seq, members] : by_seq) {
    // Whole: as many members as the instant took, of one instant of one
    // source site (a same-named group of another site is not this one).
    const RestorePoint& first = members.front();
    const bool whole = members.size() == first.epoch.group_members &&
                       std::all_of(members.begin(), members.end(), [&](const RestorePoint& p) {
                         return p.epoch.group_members == first.epoch.group_members &&
                                p.epoch.source_site == first.epoch.source_site;
                       });
    if (!whole) continue;
    GroupPoint g;
    g.group = std::string(group);
    g.seq = seq;
    for (const auto& p : members) {
      g.volumes.push_back(p.epoch.volume);
      g.source_time_ns = std::max(g.source_time_ns, p.epoch.snap_time_ns);
    }
    std::sort(g.volumes.begin(), g.volumes.end());
    out.push_back(std::move(g));
  }
  return out;
}

}  // namespace

StatusOr<std::vector<GroupPoint>> Catalog::GroupPoints(std::string_view group) {
  RETURN_IF_ERROR(ValidateVolumeId(group).Annotate("group name"));
  ASSIGN_OR_RETURN(const auto kvs, kv_.Scan(fmt::format("groupmember/{}/", group)));
  return WholeInstants(group, kvs);
}

StatusOr<GroupPoint> Catalog::GetGroupPoint(std::string_view group, uint64_t seq) {
  RETURN_IF_ERROR(ValidateVolumeId(group).Annotate("group name"));
  ASSIGN_OR_RETURN(const auto kvs, kv_.Scan(fmt::format("groupmember/{}/{:020}/", group, seq)));
  ASSIGN_OR_RETURN(const auto whole, WholeInstants(group, kvs));
  if (whole.empty()) return NotFound(fmt::format("group {} has no restore point {}", group, seq));
  return whole.front();
}

StatusOr<std::vector<std::string>> Catalog::Groups() {
  ASSIGN_OR_RETURN(const auto kvs, kv_.Scan("groupmember/"));
  std::vector<std::string> names;
  for (const auto& [key, value] : kvs) {
    std::string_view rest = std::string_view(key).substr(std::string_view("groupmember/").size());
    std::string name(rest.substr(0, rest.find('/')));
    if (names.empty() || names.back() != name) names.push_back(std::move(name));
  }
  std::vector<std::string> out;
  for (const auto& name : names) {
    ASSIGN_OR_RETURN(const auto points, GroupPoints(name));
    if (!points.empty()) out.push_back(name);
  }
  return out;
}

}  // namespace cairn
