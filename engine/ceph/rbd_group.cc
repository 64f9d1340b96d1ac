// RbdPool's groups: the images of an RBD group, its snapshots (taken,
// settled, removed, listed), and the names under which an image lists its
// shares of them (NameGroupShares).
//
// librbd keeps a group in two RADOS objects of its pool: the directory
// rbd_group_directory (omap "name_<group>" -> id) and the group's header
// rbd_group_header.<id> (omap "snapshot_<group snapshot id>" -> the group
// snapshot: its name, state and, per image, the id of its share). The C API
// lists group snapshots by name and state only, and in the order of their
// random ids, so the records are read from the header here.

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/ceph/omap_read.h"
#include "engine/ceph/rbd_internal.h"

namespace cairn {

namespace rbd_internal {

namespace {

constexpr char kGroupDirectory[] = "rbd_group_directory";
constexpr uint8_t kGroupSnapComplete = 1;  // GROUP_SNAPSHOT_STATE_COMPLETE
constexpr uint64_t kOmapPage = 256;        // omap pairs per read

std::string GroupHeader(const std::string& group_id) { return "rbd_group_header." + group_id; }

// One group snapshot as librbd records it in the group's header (cls_rbd
// GroupSnapshot: id, name, state, then per image an ImageSnapshotSpec).
struct GroupSnapRecord {
  std::string id;
  std::string name;
  bool complete = false;
  struct Share {
    int64_t pool = 0;
    std::string image_id;
    uint64_t snap_id = 0;
  };
  std::vector<Share> shares;
};

StatusOr<GroupSnapRecord> DecodeGroupSnap(std::string_view in, const std::string& spec) {
  const auto bad = [&] {
    return DataLoss("a snapshot record of group " + spec + " does not decode");
  };
  ClsReader r(in);
  GroupSnapRecord g;
  size_t end = 0;
  uint8_t state = 0;
  uint32_t n = 0;
  if (!r.Struct(&end) || !r.String(&g.id) || !r.String(&g.name) || !r.U8(&state) || !r.U32(&n)) {
    return bad();
  }
  g.complete = state == kGroupSnapComplete;
  for (uint32_t i = 0; i < n; ++i) {
    size_t share_end = 0;
    uint64_t pool = 0;
    GroupSnapRecord::Share s;
    if (!r.Struct(&share_end) || !r.U64(&pool) || !r.String(&s.image_id) || !r.U64(&s.snap_id)) {
      return bad();
    }
    s.pool = static_cast<int64_t>(pool);
    r.Seek(share_end);
    g.shares.push_back(std::move(s));
  }
  return g;  // later versions append fields before `end`: not needed
}

// The id of group `group`; kNotFound if there is none.
StatusOr<std::string> ReadGroupId(rados_ioctx_t io, const std::string& group,
                                  const std::string& spec) {
  const auto missing = [&] { return NotFound(fmt::format("group {} does not exist", spec)); };
  const std::string key = "name_" + group;
  OmapRead r;
  int prval = 0;
  const char* keys[] = {key.data()};
  const size_t lens[] = {key.size()};
  rados_read_op_omap_get_vals_by_keys2(r.op, keys, 1, lens, &r.iter, &prval);
  int rc = rados_read_op_operate(r.op, io, kGroupDirectory, LIBRADOS_OPERATION_NOFLAG);
  if (rc == -ENOENT) return missing();  // no group was ever made in the pool
  if (rc == 0) rc = prval;
  std::optional<std::string> value;
  if (rc == 0) {
    rc = r.ForEachValue([&](std::string_view k, std::string_view v) {
      if (k == key) value.emplace(v);
      return true;
    });
  }
  if (rc < 0) return ErrnoStatus(rc, "looking up the id of group " + spec);
  if (!value) return missing();
  std::string id;
  if (!ClsReader(*value).String(&id) || id.empty()) {
    return DataLoss("the id of group " + spec + " does not decode");
  }
  return id;
}

// Every snapshot record of the group, complete or not, in key order
// (random). None if its header is gone.
StatusOr<std::vector<GroupSnapRecord>> ReadGroupSnaps(rados_ioctx_t io, const std::string& group_id,
                                                      const std::string& spec) {
  const std::string header = GroupHeader(group_id);
  std::vector<GroupSnapRecord> out;
  std::string after;
  while (true) {
    OmapRead r;
    unsigned char more = 0;
    int prval = 0;
    rados_read_op_omap_get_vals2(r.op, after.c_str(), "snapshot_", kOmapPage, &r.iter, &more,
                                 &prval);
    int rc = rados_read_op_operate(r.op, io, header.c_str(), LIBRADOS_OPERATION_NOFLAG);
    if (rc == -ENOENT) return out;
    if (rc == 0) rc = prval;
    Status decoded;
    size_t n = 0;
    if (rc == 0) {
      rc = r.ForEachValue([&](std::string_view k, std::string_view v) {
        after.assign(k);
        ++n;
        StatusOr<GroupSnapRecord> g = DecodeGroupSnap(v, spec);
        if (g.ok()) out.push_back(std::move(*g));
        if (!g.ok() && decoded.ok()) decoded = g.status();
        return true;
      });
    }
    if (rc < 0) return ErrnoStatus(rc, "reading the snapshots of group " + spec);
    RETURN_IF_ERROR(decoded);
    if (!more || n == 0) return out;
  }
}

// An I/O context on pool `pool` in the namespace of `io`: `io` itself if it
// is on that pool. Null get() if there is no such pool.
class PoolIo {
 public:
  static StatusOr<std::unique_ptr<PoolIo>> Open(rados_ioctx_t io, int64_t pool) {
    auto p = std::unique_ptr<PoolIo>(new PoolIo());
    if (pool == rados_ioctx_get_id(io)) {
      p->io_ = io;
      return p;
    }
    const int rc = rados_ioctx_create2(rados_ioctx_get_cluster(io), pool, &p->own_);
    if (rc == -ENOENT) return p;
    if (rc < 0) return ErrnoStatus(rc, fmt::format("opening pool {}", pool));
    char ns[256] = {};
    if (rados_ioctx_get_namespace(io, ns, sizeof ns) >= 0) rados_ioctx_set_namespace(p->own_, ns);
    p->io_ = p->own_;
    return p;
  }
  ~PoolIo() {
    if (own_ != nullptr) rados_ioctx_destroy(own_);
  }
  rados_ioctx_t get() const { return io_; }

 private:
  PoolIo() = default;
  rados_ioctx_t io_ = nullptr;
  rados_ioctx_t own_ = nullptr;
};

// Once per group and process at warn (a listing comes with every epoch),
// at debug after.
void WarnSharesLeftOut(const std::string& what, const Status& why) {
  static std::mutex mu;
  static std::set<std::string> warned;
  bool first = false;
  {
    std::lock_guard lock(mu);
    first = warned.insert(what).second;
  }
  spdlog::log(first ? spdlog::level::warn : spdlog::level::debug,
              "the shares of group {} are left out of its snapshots: {}", what, why.ToString());
}

}  // namespace

StatusOr<std::vector<std::optional<std::string>>> NameGroupShares(
    rados_ioctx_t io, const std::vector<GroupShareRef>& refs, const std::string& spec) {
  // (pool, group id) -> its records by group snapshot id.
  std::map<std::pair<int64_t, std::string>, std::map<std::string, GroupSnapRecord>> groups;
  std::vector<std::optional<std::string>> out;
  for (const auto& ref : refs) {
    const auto key = std::make_pair(ref.group_pool, ref.group_id);
    auto it = groups.find(key);
    if (it == groups.end()) {
      it = groups.emplace(key, std::map<std::string, GroupSnapRecord>()).first;
      // A group whose header cannot be read (no caps on its pool) or
      // decoded (a newer format) leaves its shares out of the listing, not
      // the image's own snapshots: the image replicates on. Cairn's own
      // group operations read the header themselves and fail, saying why.
      const std::string what = fmt::format("{} (of {})", ref.group_id, spec);
      StatusOr<std::unique_ptr<PoolIo>> pool = PoolIo::Open(io, ref.group_pool);
      StatusOr<std::vector<GroupSnapRecord>> records = std::vector<GroupSnapRecord>{};
      if (!pool.ok()) {
        records = pool.status();
      } else if ((*pool)->get() != nullptr) {
        records = ReadGroupSnaps((*pool)->get(), ref.group_id, what);
      }
      if (records.ok()) {
        for (auto& g : *records) it->second.emplace(g.id, std::move(g));
      } else {
        WarnSharesLeftOut(what, records.status());
      }
    }
    auto g = it->second.find(ref.group_snap_id);
    out.push_back(g != it->second.end() && g->second.complete
                      ? std::optional<std::string>(GroupSnapName(g->second.name))
                      : std::nullopt);
  }
  return out;
}

}  // namespace rbd_internal

using namespace rbd_internal;  // the adapters' shared helpers (rbd_internal.h)

namespace {

std::string GroupSpec(const std::string& pool, const std::string& group,
                      const std::string& snap = "") {
  return snap.empty() ? fmt::format("{}/{}", pool, group)
                      : fmt::format("{}/{}@{}", pool, group, snap);
}

// The record of group snapshot `snap`, or kNotFound.
StatusOr<GroupSnapRecord> FindGroupSnap(const RadosIoCtx& io, const std::string& group,
                                        const std::string& snap) {
  const std::string spec = GroupSpec(io.pool(), group);
  ASSIGN_OR_RETURN(const std::string id, ReadGroupId(io.get(), group, spec));
  ASSIGN_OR_RETURN(std::vector<GroupSnapRecord> records, ReadGroupSnaps(io.get(), id, spec));
  for (auto& g : records) {
    if (g.name == snap) return std::move(g);
  }
  return NotFound(
      fmt::format("group snapshot {} does not exist", GroupSpec(io.pool(), group, snap)));
}

// A member of a group whose snapshot is being taken.
struct Member {
  std::string name;
  std::string id;
  std::shared_ptr<Image> h;  // read-only: no watch of its own
  std::unique_ptr<SnapSettler> settler;
};

}  // namespace

StatusOr<std::vector<std::string>> RbdPool::GroupImages(const std::string& group) {
  const std::string spec = GroupSpec(io_->pool(), group);
  // rbd_group_image_list lists a missing group as empty.
  RETURN_IF_ERROR(ReadGroupId(io_->get(), group, spec).status());
  std::vector<rbd_group_image_info_t> infos(8);
  size_t n = infos.size();
  int rc = 0;
  while ((rc = rbd_group_image_list(io_->get(), group.c_str(), infos.data(), sizeof infos[0],
                                    &n)) == -ERANGE) {
    infos.resize(n);
  }
  if (rc < 0) return ErrnoStatus(rc, "listing the images of group " + spec);
  const int64_t here = rados_ioctx_get_id(io_->get());
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) {
    if (infos[i].pool == here) out.emplace_back(infos[i].name);
  }
  rbd_group_image_list_cleanup(infos.data(), sizeof infos[0], n);
  std::sort(out.begin(), out.end());
  return out;
}

Status RbdPool::CreateGroupSnap(const std::string& group, const std::string& snap) {
  const std::string spec = GroupSpec(io_->pool(), group, snap);
  if (snap.empty()) return InvalidArgument("creating a snapshot of group " + spec + ": empty name");
  const std::string share = GroupSnapName(snap);
  ASSIGN_OR_RETURN(const std::vector<std::string> images, GroupImages(group));
  std::vector<Member> members;
  for (const auto& name : images) {
    Member m{name, "", nullptr, nullptr};
    ASSIGN_OR_RETURN(m.h, OpenImage(*io_, name, "", true));
    ASSIGN_OR_RETURN(m.id, ImageId(m.h->get(), Spec(name)));
    ASSIGN_OR_RETURN(const std::vector<SnapInfo> snaps,
                     ListSnapsOfHeader(io_->get(), m.id, Spec(name)));
    for (const auto& s : snaps) {
      if (s.name == share) {
        return AlreadyExists(fmt::format(
            "creating group snapshot {}: {} already has a share of a group snapshot {} (taken "
            "before it joined the group?)",
            spec, Spec(name), snap));
      }
    }
    members.push_back(std::move(m));
  }
  for (auto& m : members) {
    m.settler = std::make_unique<SnapSettler>(m.h->get(), *io_, *book_, m.name, Spec(m.name));
  }
  // librbd opens and closes a context per member: the gate (rbd_internal.h).
  // Every other open and close of this process waits meanwhile, through the
  // members' exclusive-lock handovers too (a guest gives its lock up within
  // a second or so).
  const int rc = [&] {
    const auto lock = ImageContextLock();
    return rbd_group_snap_create(io_->get(), group.c_str(), snap.c_str());
  }();
  if (rc == -ENOENT) {
    return NotFound(fmt::format("group {} does not exist", GroupSpec(io_->pool(), group)));
  }
  if (rc == -EEXIST) return AlreadyExists(fmt::format("group snapshot {} already exists", spec));
  if (rc < 0) return ErrnoStatus(rc, "creating group snapshot " + spec);
  // The group snapshot exists: what follows only settles its shares.
  StatusOr<GroupSnapRecord> record = FindGroupSnap(*io_, group, snap);
  for (auto& m : members) {
    StatusOr<uint64_t> id = record.status();
    if (record.ok()) {
      id = NotFound(fmt::format("the record of {} lists no share of {}", spec, Spec(m.name)));
      for (const auto& s : record->shares) {
        if (s.image_id == m.id) id = s.snap_id;
      }
    }
    m.settler->Finish(id, Spec(m.name, share));
  }
  if (record.ok() && record->shares.size() > members.size()) {
    spdlog::warn(
        "group snapshot {}: {} image(s) joined the group meanwhile or are in other pools; "
        "their shares were not settled",
        spec, record->shares.size() - members.size());
  }
  return OkStatus();
}

Status RbdPool::RemoveGroupSnap(const std::string& group, const std::string& snap) {
  const std::string spec = GroupSpec(io_->pool(), group, snap);
  ASSIGN_OR_RETURN(const GroupSnapRecord record, FindGroupSnap(*io_, group, snap));
  const int rc = [&] {
    const auto lock = ImageContextLock();
    return rbd_group_snap_remove(io_->get(), group.c_str(), snap.c_str());
  }();
  if (rc == -ENOENT) return NotFound(fmt::format("group snapshot {} does not exist", spec));
  if (rc < 0) return ErrnoStatus(rc, "removing group snapshot " + spec);
  for (const auto& s : record.shares) book_->Forget(s.snap_id);
  return OkStatus();
}

StatusOr<std::vector<std::string>> RbdPool::GroupSnaps(const std::string& group) {
  const std::string spec = GroupSpec(io_->pool(), group);
  ASSIGN_OR_RETURN(const std::string id, ReadGroupId(io_->get(), group, spec));
  ASSIGN_OR_RETURN(std::vector<GroupSnapRecord> records, ReadGroupSnaps(io_->get(), id, spec));
  // (oldest share's id, name). Snapshot ids are a pool's: only this pool's
  // shares compare.
  const int64_t here = rados_ioctx_get_id(io_->get());
  std::vector<std::pair<uint64_t, std::string>> order;
  for (const auto& g : records) {
    if (!g.complete) continue;
    uint64_t oldest = UINT64_MAX;
    for (const auto& s : g.shares) {
      if (s.pool == here) oldest = std::min(oldest, s.snap_id);
    }
    order.emplace_back(oldest, g.name);
  }
  std::sort(order.begin(), order.end());
  std::vector<std::string> out;
  for (auto& [oldest, name] : order) out.push_back(std::move(name));
  return out;
}

Status RbdPool::JoinGroup(const std::string& group, const std::string& image) {
  const std::string spec = GroupSpec(io_->pool(), group);
  int rc = rbd_group_create(io_->get(), group.c_str());
  if (rc < 0 && rc != -EEXIST) return ErrnoStatus(rc, "creating group " + spec);
  const bool created = rc == 0;
  ASSIGN_OR_RETURN(const std::vector<std::string> members, GroupImages(group));
  if (std::find(members.begin(), members.end(), image) != members.end()) {
    return AlreadyExists(fmt::format("{} is in group {} already", Spec(image), spec));
  }
  rc = [&] {
    const auto lock = ImageContextLock();  // librbd opens the image
    const int added = rbd_group_image_add(io_->get(), group.c_str(), io_->get(), image.c_str());
    if (added < 0 && created) rbd_group_remove(io_->get(), group.c_str());  // made for it
    return added;
  }();
  if (rc == -ENOENT) return NotFound(fmt::format("{} does not exist", Spec(image)));
  if (rc == -EEXIST) {
    return FailedPrecondition(fmt::format(
        "adding {} to group {}: it is in another group; an image is in one group at most",
        Spec(image), spec));
  }
  if (rc < 0) return ErrnoStatus(rc, fmt::format("adding {} to group {}", Spec(image), spec));
  return OkStatus();
}

Status RbdPool::LeaveGroup(const std::string& group, const std::string& image) {
  const std::string spec = GroupSpec(io_->pool(), group);
  // librbd answers 0 for an image that is not in the group.
  ASSIGN_OR_RETURN(const std::vector<std::string> members, GroupImages(group));
  if (std::find(members.begin(), members.end(), image) == members.end()) {
    return NotFound(fmt::format("{} is not in group {}", Spec(image), spec));
  }
  int rc = [&] {
    const auto lock = ImageContextLock();
    return rbd_group_image_remove(io_->get(), group.c_str(), io_->get(), image.c_str());
  }();
  if (rc == -ENOENT) {
    return NotFound(fmt::format("{} is not in group {} (or either is missing)", Spec(image), spec));
  }
  if (rc < 0) return ErrnoStatus(rc, fmt::format("taking {} out of group {}", Spec(image), spec));
  ASSIGN_OR_RETURN(const std::vector<std::string> left, GroupImages(group));
  if (!left.empty()) return OkStatus();
  // The last one left: the group goes, its snapshots first (each through
  // RemoveGroupSnap, which forgets their shares' settling).
  ASSIGN_OR_RETURN(const std::vector<std::string> snaps, GroupSnaps(group));
  for (const auto& snap : snaps) RETURN_IF_ERROR(RemoveGroupSnap(group, snap));
  rc = [&] {
    const auto lock = ImageContextLock();
    return rbd_group_remove(io_->get(), group.c_str());
  }();
  if (rc < 0 && rc != -ENOENT) return ErrnoStatus(rc, "removing the empty group " + spec);
  return OkStatus();
}

}  // namespace cairn
