// Daemon: a consistency group failed over here comes home at one instant.
// Its promoted images replicate back as one group (ReplicateGroupBack: an
// RBD group of them at this site, each registered as its member), so the
// home site's points of them are group points; FailbackGroup then checks
// every member, stops the group and hands each back at one group point.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <set>

#include "engine/daemon/daemon.h"

namespace cairn {

namespace {

void LeaveAll(Pool& pool, const std::string& group, const std::vector<std::string>& images) {
  for (const auto& image : images) {
    if (Status left = pool.LeaveGroup(group, image); !left.ok()) {
      spdlog::error("group {}: {}/{} stays in the RBD group here: {}", group, pool.name(), image,
                    left.ToString());
    }
  }
}

}  // namespace

StatusOr<std::vector<std::string>> Daemon::JoinBackGroup(const std::string& group,
                                                         const std::vector<Registration>& rs) {
  ASSIGN_OR_RETURN(auto pool, OpenPool(rs.front().pool));
  std::vector<std::string> joined;
  const auto undo = [&](Status st) {
    LeaveAll(*pool, group, joined);
    return st;
  };
  std::set<std::string> images;
  for (const auto& r : rs) {
    images.insert(r.image);
    Status st = pool->JoinGroup(group, r.image);
    if (st.ok()) {
      joined.push_back(r.image);
    } else if (st.code() != Code::kAlreadyExists) {
      return undo(
          st.Annotate(fmt::format("group {}: {} joining the RBD group here", group, r.volume)));
    }
  }
  ASSIGN_OR_RETURN(const std::vector<std::string> now, pool->GroupImages(group));
  std::vector<std::string> others;
  for (const auto& image : now) {
    if (!images.count(image)) others.push_back(image);
  }
  if (!others.empty()) {
    return undo(FailedPrecondition(fmt::format(
        "RBD group {}/{} at this site holds other images too ({}): a group replicates back "
        "only into a group of its promoted images; remove them (`rbd group image remove`) or "
        "fail the volumes over again under another group name",
        pool->name(), group, fmt::join(others, ", "))));
  }
  return joined;
}

StatusOr<std::vector<VolumeStatusInfo>> Daemon::ReplicateGroupBack(
    const std::string& group, const std::vector<Registration>& back) {
  if (!sink_) {
    return FailedPrecondition(
        "this cairnd is not a sink: a group replicates back from the "
        "standby it failed over to");
  }
  RETURN_IF_ERROR(TakesRegistrations());
  if (back.empty()) return InvalidArgument("replicate_back names none of the group's volumes");
  RETURN_IF_ERROR(ValidateVolumeId(group).Annotate("replicate_back: the group's name"));
  std::vector<Registration> rs;
  for (const auto& b : back) {
    RETURN_IF_ERROR(ValidateVolumeId(b.volume));
    if (b.target_image.empty()) {
      return InvalidArgument(fmt::format(
          "replicate_back: volume '{}' names no image at home to replicate into", b.volume));
    }
    ASSIGN_OR_RETURN(const auto found, FindPromotion(b.volume));
    Registration r = b;
    r.pool = found.first.pool;
    r.image = found.first.image;
    r.group = group;
    if (!rs.empty() && r.pool != rs.front().pool) {
      return InvalidArgument(fmt::format(
          "volumes '{}' and '{}' were promoted into pools {} and {}: a group replicates back "
          "from one pool",
          rs.front().volume, r.volume, rs.front().pool, r.pool));
    }
    rs.push_back(std::move(r));
  }
  std::lock_guard registering(register_mu_);
  ASSIGN_OR_RETURN(const std::vector<std::string> joined, JoinBackGroup(group, rs));
  auto out = RegisterManyLocked(rs);
  if (!out.ok()) {
    if (auto pool = OpenPool(rs.front().pool); pool.ok()) LeaveAll(**pool, group, joined);
    return out.status().Annotate("group " + group + " replicating back");
  }
  spdlog::warn("group {}: {} volumes failed over here replicate back at one instant", group,
               rs.size());
  return out;
}

StatusOr<ControlService::GroupFailedBack> Daemon::FailbackGroup(const std::string& group,
                                                                uint64_t seq) {
  if (!sink_) {
    return FailedPrecondition(
        "this cairnd is not a sink: fail a group back on the cairnd of the site it failed over "
        "to");
  }
  std::lock_guard registering(register_mu_);
  const auto not_back = [&](const std::string& why) {
    return FailedPrecondition(fmt::format(
        "group '{}' does not replicate back from this cairnd ({}): `cairn group failover {} "
        "--back ...` sets that up; volumes replicating back on their own fail back one by one "
        "(`cairn failback VOLUME`)",
        group, why, group));
  };
  auto g = FindGroup(group);
  if (!g) return not_back("no such group here");
  const GroupStatusInfo now = g->Report();
  std::map<std::string, BackMember> members;  // by volume
  {
    std::lock_guard lock(sources_mu_);
    for (const auto& [volume, r] : registered_) {
      if (r.group == group) members[volume] = BackMember{};
    }
  }
  for (const auto& v : now.volumes) {
    if (!members.count(v)) return not_back("member '" + v + "' is not registered");
  }
  if (members.empty()) return not_back("no member is registered");
  for (auto& [volume, m] : members) {
    auto found = FindPromotion(volume);
    m.src = FindSource(volume);
    if (!found.ok() || !m.src || m.src->config().pool != found->first.pool ||
        m.src->config().image != found->first.image) {
      return not_back(fmt::format("member '{}' is not an image failed over here{}", volume,
                                  found.ok() ? "" : ": " + found.status().message()));
    }
    m.promoted = found->first;
    m.home = found->second.epoch.source_site;
  }
  const uint64_t want = seq != 0 ? seq : now.last_seq;
  g.reset();
  StopGroup(group);  // no instant from now on: what is checked stays so
  if (Status ready = CheckGroupComesHome(group, want, members); !ready.ok()) {
    if (Status again = RestartRegisteredGroup(group); !again.ok()) {
      spdlog::error("group {}: {}", group, again.ToString());
    }
    return ready.Annotate("nothing changed; the group still replicates back");
  }
  return HandGroupBack(group, want, members);
}

Status Daemon::CheckGroupComesHome(const std::string& group, uint64_t want,
                                   const std::map<std::string, BackMember>& members) {
  if (want == 0) {
    return FailedPrecondition(fmt::format(
        "group {} has no group point at home yet: `cairn group replicate {} --wait`, then fail "
        "back",
        group, group));
  }
  for (const auto& [volume, m] : members) {
    const VolumeStatusInfo now = m.src->Report();
    if (want <= m.promoted.seq || now.last_seq < want) {
      return FailedPrecondition(fmt::format(
          "group point {} of {} has not reached site {} for member '{}' (newest there: {}{}): "
          "`cairn group replicate {} --wait`, then fail back",
          want, group, m.home, volume, now.last_seq, now.error.empty() ? "" : "; " + now.error,
          group));
    }
    if (now.last_seq > want) {
      return FailedPrecondition(fmt::format(
          "member '{}' of group {} has a newer point ({}) than group point {} at site {}: fail "
          "back at the newest group point",
          volume, group, now.last_seq, want, m.home));
    }
    RETURN_IF_ERROR(CheckNothingLeftBehind(m.promoted, want, m.home)
                        .Annotate(fmt::format("group {}, member '{}'", group, volume)));
  }
  return OkStatus();
}

StatusOr<ControlService::GroupFailedBack> Daemon::HandGroupBack(
    const std::string& group, uint64_t want, const std::map<std::string, BackMember>& members) {
  std::vector<std::pair<std::string, HandedBack>> handed;
  Status failed;
  for (const auto& [volume, m] : members) {
    auto said = m.src->HandBack(want);
    if (!said.ok()) {
      failed = said.status().Annotate(fmt::format("handing member '{}' back", volume));
      break;
    }
    said->site = m.home;  // the site its points came from, as its catalog names it
    handed.emplace_back(volume, *said);
  }
  GroupFailedBack out{want, members.begin()->second.home, {}};
  std::vector<std::string> unfolded;
  for (const auto& [volume, said] : handed) {
    const BackMember& m = members.at(volume);
    if (Status forgot = ForgetRegistration(volume); !forgot.ok()) {
      spdlog::error("volume {}: {}", volume, forgot.ToString());
    }
    auto pool = OpenPool(m.promoted.pool);
    Status left = pool.ok() ? (*pool)->LeaveGroup(group, m.promoted.image) : pool.status();
    if (!left.ok()) {
      spdlog::warn("group {}: {}/{} stays in the RBD group here: {}", group, m.promoted.pool,
                   m.promoted.image, left.ToString());
    }
    auto folded = sink_->FoldBack(volume, want, said, group, static_cast<uint32_t>(members.size()));
    if (!folded.ok()) {
      spdlog::error("volume {}: home at site {} at point {}, but not taken here: {}", volume,
                    m.home, want, folded.status().ToString());
      unfolded.push_back(volume);
      continue;
    }
    out.images.push_back(m.promoted.pool + "/" + folded->kept_as);
  }
  if (!failed.ok()) {
    // Nothing changed for the others: they replicate back on, as the group
    // they are now, and the next failback brings them home.
    if (Status again = RestartRegisteredGroup(group); !again.ok()) {
      spdlog::error("group {}: {}", group, again.ToString());
    }
    std::vector<std::string> home, left;
    for (const auto& member : members) {
      const std::string& volume = member.first;
      const bool is_home = std::any_of(handed.begin(), handed.end(),
                                       [&](const auto& h) { return h.first == volume; });
      (is_home ? home : left).push_back(volume);
    }
    return failed.Annotate(fmt::format(
        "group {}: home at group point {}: {}; still replicating back as group {}: {}; run "
        "`cairn group failback {}` again",
        group, want, home.empty() ? "none" : fmt::format("{}", fmt::join(home, ", ")), group,
        fmt::join(left, ", "), group));
  }
  if (!unfolded.empty()) {
    return FailedPrecondition(fmt::format(
        "group {} is home at site {} at group point {}, but this site could not make that point "
        "its own for {}; `cairn release VOLUME` here for each lets site {} replicate them again",
        group, out.primary_site, want, fmt::join(unfolded, ", "), out.primary_site));
  }
  spdlog::warn("group {}: FAILED BACK to site {} at group point {}: {} members, nothing lost",
               group, out.primary_site, want, members.size());
  return out;
}

StatusOr<std::string> Daemon::ReleaseGroupMember(const std::string& volume,
                                                 const std::string& group,
                                                 const Catalog::Promotion& promoted) {
  ASSIGN_OR_RETURN(auto pool, OpenPool(promoted.pool));
  StopGroup(group);
  const auto go_on = [&] {
    if (Status again = RestartRegisteredGroup(group); !again.ok()) {
      spdlog::error("group {}: {}", group, again.ToString());
    }
  };
  if (Status left = pool->LeaveGroup(group, promoted.image);
      !left.ok() && left.code() != Code::kNotFound) {
    go_on();
    return left.Annotate(
        fmt::format("releasing '{}' from group {}; nothing changed", volume, group));
  }
  auto kept = sink_->Release(volume);
  if (!kept.ok()) {
    if (Status back = pool->JoinGroup(group, promoted.image); !back.ok()) {
      spdlog::error("group {}: {}/{} did not join the RBD group again: {}", group, promoted.pool,
                    promoted.image, back.ToString());
    }
    go_on();
    return kept.status();
  }
  if (Status forgot = ForgetRegistration(volume); !forgot.ok()) {
    spdlog::error("volume {}: {}", volume, forgot.ToString());
  }
  go_on();
  spdlog::warn("volume {}: released; group {} replicates back without it", volume, group);
  return kept;
}

}  // namespace cairn
