// MemoryPool's groups (memory_volume.h): membership, and group snapshots
// taken of every member under the pool's lock.
#include <fmt/format.h>

#include <algorithm>
#include <mutex>
#include <utility>

#include "engine/volume/memory_state.h"
#include "engine/volume/memory_volume.h"

namespace cairn {

namespace {

using memory_internal::FindSnap;
using memory_internal::GroupSnapState;
using memory_internal::GroupState;
using memory_internal::ImageState;
using memory_internal::PoolState;
using memory_internal::SnapState;

// REQUIRES: pool.mu held.
StatusOr<GroupState*> FindGroup(PoolState& pool, const std::string& group) {
  auto it = pool.groups.find(group);
  if (it == pool.groups.end()) {
    return NotFound(fmt::format("group {}/{} does not exist", pool.name, group));
  }
  return &it->second;
}

// REQUIRES: pool.mu held.
std::vector<GroupSnapState>::iterator FindGroupSnap(GroupState& group, const std::string& snap) {
  return std::find_if(group.snaps.begin(), group.snaps.end(),
                      [&](const GroupSnapState& s) { return s.name == snap; });
}

}  // namespace

Status MemoryPool::CreateGroup(const std::string& group) {
  if (group.empty()) return InvalidArgument("creating a group: empty name");
  std::lock_guard lock(state_->mu);
  if (!state_->groups.emplace(group, GroupState{}).second) {
    return AlreadyExists(fmt::format("group {}/{} already exists", state_->name, group));
  }
  return OkStatus();
}

Status MemoryPool::AddToGroup(const std::string& group, const std::string& image) {
  std::lock_guard lock(state_->mu);
  RETURN_IF_ERROR(FindGroup(*state_, group).status());
  auto it = state_->images.find(image);
  if (it == state_->images.end()) {
    return NotFound(fmt::format("image {}/{} does not exist", state_->name, image));
  }
  const std::string& now = it->second->group;
  if (now == group) {
    return AlreadyExists(
        fmt::format("image {}/{} is in group {} already", state_->name, image, group));
  }
  if (!now.empty()) {
    return FailedPrecondition(fmt::format(
        "adding image {}/{} to group {}: it is in group {}; an image is in one group at most",
        state_->name, image, group, now));
  }
  it->second->group = group;
  return OkStatus();
}

Status MemoryPool::RemoveFromGroup(const std::string& group, const std::string& image) {
  std::lock_guard lock(state_->mu);
  RETURN_IF_ERROR(FindGroup(*state_, group).status());
  auto it = state_->images.find(image);
  if (it == state_->images.end() || it->second->group != group) {
    return NotFound(fmt::format("image {}/{} is not in group {}", state_->name, image, group));
  }
  it->second->group.clear();
  return OkStatus();
}

StatusOr<std::vector<std::string>> MemoryPool::GroupImages(const std::string& group) {
  std::lock_guard lock(state_->mu);
  RETURN_IF_ERROR(FindGroup(*state_, group).status());
  std::vector<std::string> out;  // sorted: the map is
  for (const auto& [name, image] : state_->images) {
    if (image->group == group) out.push_back(name);
  }
  return out;
}

Status MemoryPool::CreateGroupSnap(const std::string& group, const std::string& snap) {
  if (snap.empty()) {
    return InvalidArgument(
        fmt::format("creating a snapshot of group {}/{}: empty name", state_->name, group));
  }
  const std::string share = GroupSnapName(snap);
  // One critical section from the checks to the last member's share: no
  // write (it takes the same lock) lands between two members.
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(GroupState * g, FindGroup(*state_, group));
  if (FindGroupSnap(*g, snap) != g->snaps.end()) {
    return AlreadyExists(
        fmt::format("snapshot {} of group {}/{} already exists", snap, state_->name, group));
  }
  GroupSnapState taken{snap, {}};
  for (const auto& [name, image] : state_->images) {
    if (image->group != group) continue;
    if (FindSnap(*image, share) != nullptr) {
      return AlreadyExists(fmt::format(
          "snapshot {}/{}@{} already exists (a share of a group snapshot taken before the "
          "image joined {})",
          state_->name, name, share, group));
    }
    taken.images.push_back(image);
  }
  // Each share stamped at its own time, as librbd stamps each image's.
  for (const auto& image : taken.images) {
    image->snaps.push_back(
        {share, state_->next_snap_id++, image->size, state_->options.now_ns(), image->head, 0});
  }
  g->snaps.push_back(std::move(taken));
  return OkStatus();
}

Status MemoryPool::RemoveGroupSnap(const std::string& group, const std::string& snap) {
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(GroupState * g, FindGroup(*state_, group));
  auto it = FindGroupSnap(*g, snap);
  if (it == g->snaps.end()) {
    return NotFound(
        fmt::format("snapshot {} of group {}/{} does not exist", snap, state_->name, group));
  }
  const std::string share = GroupSnapName(snap);
  for (const auto& image : it->images) {
    // Shares are never cloned (Clone refuses them): nothing pins one.
    std::erase_if(image->snaps, [&](const SnapState& s) { return s.name == share; });
  }
  g->snaps.erase(it);
  return OkStatus();
}

StatusOr<std::vector<std::string>> MemoryPool::GroupSnaps(const std::string& group) {
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(GroupState * g, FindGroup(*state_, group));
  std::vector<std::string> out;
  for (const auto& s : g->snaps) out.push_back(s.name);
  return out;
}

Status MemoryPool::JoinGroup(const std::string& group, const std::string& image) {
  Status made = CreateGroup(group);
  if (!made.ok() && made.code() != Code::kAlreadyExists) return made;
  Status added = AddToGroup(group, image);
  if (!added.ok() && made.ok()) {  // made for it: gone again
    std::lock_guard lock(state_->mu);
    state_->groups.erase(group);
  }
  return added;
}

Status MemoryPool::LeaveGroup(const std::string& group, const std::string& image) {
  RETURN_IF_ERROR(RemoveFromGroup(group, image));
  std::lock_guard lock(state_->mu);
  for (const auto& [name, img] : state_->images) {
    if (img->group == group) return OkStatus();
  }
  // The last one left: the group goes, with its snapshots (as librbd's).
  auto it = state_->groups.find(group);
  if (it == state_->groups.end()) return OkStatus();
  for (const auto& gs : it->second.snaps) {
    const std::string share = GroupSnapName(gs.name);
    for (const auto& img : gs.images) {
      std::erase_if(img->snaps, [&](const SnapState& s) { return s.name == share; });
    }
  }
  state_->groups.erase(it);
  return OkStatus();
}

}  // namespace cairn
