// Snapshots: taking one and settling it (clients that opened the image
// around it are told again), removing and confirming them, and the book of
// what the settling saw (SettleBook).

#include <endian.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "engine/base/clock.h"
#include "engine/ceph/rbd_internal.h"

namespace cairn {

namespace rbd_internal {

// --- Settling a snapshot ---------------------------------------------------
//
// librbd reads an image's header (its snapshot context) before it starts
// watching it. A client whose open spans the creation of a snapshot misses
// the snapshot's notification and writes on with the context it read: RADOS
// then makes no clone, and the writes land under the new snapshot (and the
// older ones) after it was taken; the exact diff cannot see them later. So
// after a snapshot, every client that began watching since just before it
// is told again (an empty notification: "the header changed", to librbd and
// the kernel client alike), round after round until no untold one remains,
// and the snapshot is listed no sooner than kSettleFloor after it was taken
// and kSettleDrain after the last client was told (its writes sent before
// it heard land meanwhile). Taking the exclusive lock to flush such a
// client was tried and dropped: while Cairn held the lock, the client's
// writes failed with EROFS.
//
// Telling is not enough on its own. A told client's write may already be on
// its way, and it marks the object map only after the snapshot (so the
// snapshot's object map does not show it): the next diff's object maps flag
// the object, but if a later write with the new context hits the same
// object first, RADOS clones the object with the stale write in it, and the
// exact pass lists only the later write. So after a snapshot at which a
// client was told, or before the next of which a client appeared that was
// not watching when it settled, the diff from it sends whole every object
// the object maps flag (SettleBook). A client that opens, writes and closes
// between two snapshots without being seen by either is not covered.

static StatusOr<std::set<WatcherId>> Watchers(rbd_image_t h, const std::string& spec) {
  std::vector<rbd_image_watcher_t> w(8);
  for (;;) {
    size_t n = w.size();
    const int rc = rbd_watchers_list(h, w.data(), &n);
    if (rc == -ERANGE) {
      w.resize(std::max(n, 2 * w.size()));
      continue;
    }
    if (rc < 0) return ErrnoStatus(rc, "listing the watchers of " + spec);
    std::set<WatcherId> out;
    for (size_t i = 0; i < n; ++i) out.insert({static_cast<uint64_t>(w[i].id), w[i].cookie});
    rbd_watchers_list_cleanup(w.data(), n);
    return out;
  }
}

// Sends the empty notification to every watcher of `header_oid`; returns
// those that acknowledged it within kNotifyTimeout. The reply is, all
// little-endian: u32 count, then per watcher u64 gid, u64 cookie, u32 length
// and that many bytes; then the timed-out ones (not needed here).
static StatusOr<std::set<WatcherId>> NotifyHeaderChanged(rados_ioctx_t io,
                                                         const std::string& header_oid,
                                                         const std::string& spec) {
  char* reply = nullptr;
  size_t len = 0;
  const int rc = rados_notify2(io, header_oid.c_str(), nullptr, 0,
                               static_cast<uint64_t>(kNotifyTimeout.count()), &reply, &len);
  std::unique_ptr<char, void (*)(char*)> guard(reply, rados_buffer_free);
  // On a timeout the reply still lists those that did acknowledge.
  if (rc < 0 && rc != -ETIMEDOUT) return ErrnoStatus(rc, "notifying the watchers of " + spec);
  const auto bad = [&] {
    return Internal(
        fmt::format("notifying the watchers of {}: a malformed reply of {} bytes", spec, len));
  };
  size_t pos = 0;
  const auto take = [&](auto& v) {
    if (reply == nullptr || len - pos < sizeof v) return false;
    std::memcpy(&v, reply + pos, sizeof v);
    pos += sizeof v;
    return true;
  };
  uint32_t count = 0;
  if (!take(count)) return rc < 0 ? ErrnoStatus(rc, "notifying the watchers of " + spec) : bad();
  std::set<WatcherId> acked;
  for (uint32_t i = 0; i < le32toh(count); ++i) {
    uint64_t gid = 0;
    uint64_t cookie = 0;
    uint32_t n = 0;
    if (!take(gid) || !take(cookie) || !take(n) || len - pos < le32toh(n)) return bad();
    pos += le32toh(n);
    acked.insert({le64toh(gid), le64toh(cookie)});
  }
  return acked;
}

struct Settled {
  size_t told = 0;               // clients that began watching, told again
  std::set<WatcherId> watchers;  // those watching when it ended
};

// See above. `before`: the watchers just before the snapshot.
static StatusOr<Settled> Settle(rbd_image_t h, const RadosIoCtx& io,
                                const std::set<WatcherId>& before, const std::string& spec) {
  char id[128] = {};
  if (int rc = rbd_get_id(h, id, sizeof id); rc < 0) {
    return ErrnoStatus(rc, "getting the id of " + spec);
  }
  const std::string header_oid = std::string("rbd_header.") + id;
  // Real time: the watchers are real clients of a real cluster.
  Clock& clock = RealClock();
  auto floor = clock.Now() + kSettleFloor;
  std::set<WatcherId> told;
  std::set<WatcherId> now;
  int rounds = 0;
  for (;;) {
    ASSIGN_OR_RETURN(now, Watchers(h, spec));
    std::vector<WatcherId> untold;
    for (const auto& w : now) {
      if (!before.count(w) && !told.count(w)) untold.push_back(w);
    }
    if (untold.empty()) {
      if (clock.Now() >= floor) break;
      std::this_thread::sleep_until(floor);
      continue;
    }
    if (rounds++ == kSettleRounds) {
      return Unavailable(
          fmt::format("{} client(s) that began watching {} did not acknowledge "
                      "{} notifications",
                      untold.size(), spec, kSettleRounds));
    }
    ASSIGN_OR_RETURN(std::set<WatcherId> acked, NotifyHeaderChanged(io.get(), header_oid, spec));
    for (const auto& w : untold) {
      if (acked.count(w)) told.insert(w);
    }
    floor = std::max(floor, clock.Now() + kSettleDrain);
  }
  if (!told.empty()) {
    spdlog::info("{}: {} client(s) opened the image as the snapshot was taken; told of it", spec,
                 told.size());
  }
  return Settled{told.size(), std::move(now)};
}

void SettleBook::BeforeSnapshot(const std::string& image, const std::set<WatcherId>* before) {
  std::lock_guard lock(mu_);
  auto it = images_.find(image);
  if (it == images_.end() || it->second.newest == 0) return;
  Entry& e = it->second;
  if (before == nullptr) {
    e.unsettled.insert(e.newest);
    spdlog::debug("{}: its watchers could not be listed; counted as appeared", image);
    return;
  }
  std::vector<std::string> appeared;
  for (const auto& [gid, cookie] : *before) {
    if (!e.watchers.count({gid, cookie})) appeared.push_back(fmt::format("{}/{}", gid, cookie));
  }
  if (!appeared.empty()) {
    e.unsettled.insert(e.newest);
    spdlog::debug("{}: watcher(s) {} appeared since its newest snapshot settled ({} then)", image,
                  fmt::join(appeared, ", "), e.watchers.size());
  }
}

void SettleBook::AfterSettling(const std::string& image, uint64_t id, const Settled* settled) {
  std::lock_guard lock(mu_);
  Entry& e = images_[image];
  e.newest = id;
  e.watchers = settled != nullptr ? settled->watchers : std::set<WatcherId>{};
  if (settled == nullptr || settled->told > 0) e.unsettled.insert(id);
}

bool SettleBook::AnyUnsettled(const std::string& image, uint64_t from, uint64_t to) const {
  std::lock_guard lock(mu_);
  auto it = images_.find(image);
  if (it == images_.end()) return false;
  auto u = it->second.unsettled.lower_bound(from);
  return u != it->second.unsettled.end() && *u < to;
}

void SettleBook::Forget(const std::string& image, uint64_t id) {
  std::lock_guard lock(mu_);
  auto it = images_.find(image);
  if (it != images_.end()) it->second.unsettled.erase(id);
}

void SettleBook::Forget(uint64_t id) {
  std::lock_guard lock(mu_);
  for (auto& [image, e] : images_) e.unsettled.erase(id);
}

SnapSettler::SnapSettler(rbd_image_t h, const RadosIoCtx& io, SettleBook& book, std::string image,
                         std::string spec)
    : h_(h),
      io_(io),
      book_(book),
      image_(std::move(image)),
      spec_(std::move(spec)),
      self_(rados_get_instance_id(rados_ioctx_get_cluster(io.get()))),
      // Those watching the header now hear of the snapshot from librbd itself.
      before_(Watchers(h, spec_)) {
  const std::optional<std::set<WatcherId>> seen =
      before_.ok() ? std::optional(Others(*before_)) : std::nullopt;
  book_.BeforeSnapshot(image_, seen ? &*seen : nullptr);
}

std::set<WatcherId> SnapSettler::Others(std::set<WatcherId> w) const {
  std::erase_if(w, [this](const WatcherId& x) { return x.first == self_; });
  return w;
}

void SnapSettler::Finish(const StatusOr<uint64_t>& snap_id, const std::string& snap_spec) {
  StatusOr<Settled> settled =
      before_.ok() ? Settle(h_, io_, *before_, snap_spec) : before_.status();
  if (!settled.ok()) {
    spdlog::warn(
        "snapshot {} taken, but clients that opened the image meanwhile may not know "
        "of it: {}",
        snap_spec, settled.status().ToString());
  }
  if (!snap_id.ok()) {
    spdlog::warn("snapshot {} taken, but its id is unknown ({}): what its settling saw is not kept",
                 snap_spec, snap_id.status().ToString());
    return;
  }
  if (settled.ok()) settled->watchers = Others(std::move(settled->watchers));
  book_.AfterSettling(image_, *snap_id, settled.ok() ? &*settled : nullptr);
}

}  // namespace rbd_internal

using namespace rbd_internal;  // the adapters' shared helpers (rbd_internal.h)

// A share of a group snapshot comes and goes only with the group's.
static Status GroupShare(const std::string& spec) {
  return InvalidArgument(fmt::format(
      "{} names a group snapshot: it is created, removed and renamed only with its group", spec));
}

Status RbdVolume::ConfirmSnap(const std::string& snap, uint64_t snap_id) {
  // From the header as it is now, not through a handle that read: those
  // keep what they saw when they opened.
  auto snaps = ListSnaps();
  if (!snaps.ok()) {
    if (snaps.status().code() != Code::kNotFound) return snaps.status();
    return NotFound(fmt::format("image {} was removed, renamed or replaced while it was read: {}",
                                Spec(), snaps.status().message()));
  }
  for (const auto& s : *snaps) {
    if (s.id == snap_id && s.name == snap) return OkStatus();
  }
  return NotFound(
      fmt::format("snapshot {} (id {}) was removed while it was read", Spec(snap), snap_id));
}

Status RbdVolume::CreateSnap(const std::string& snap, Writers writers) {
  if (snap.empty()) return InvalidArgument("creating a snapshot of " + Spec() + ": empty name");
  if (IsGroupSnapName(snap)) return GroupShare(Spec(snap));
  ASSIGN_OR_RETURN(auto h, Head());
  // Only other clients need settling: our own handle learns of the
  // snapshot as it takes it.
  std::optional<SnapSettler> settler;
  if (writers == Writers::kOthers) settler.emplace(h->get(), *io_, *book_, name_, Spec());
  const int rc = rbd_snap_create(h->get(), snap.c_str());
  if (rc == -EEXIST) return AlreadyExists(fmt::format("snapshot {} already exists", Spec(snap)));
  if (rc < 0) return ErrnoStatus(rc, "creating snapshot " + Spec(snap));
  if (!settler) return OkStatus();
  // librbd knows the id of a snapshot it just took (no I/O); should it not,
  // the snapshot still exists and the epoch goes on.
  uint64_t id = 0;
  const int err = rbd_snap_get_id(h->get(), snap.c_str(), &id);
  settler->Finish(err < 0 ? StatusOr<uint64_t>(ErrnoStatus(err, "getting its id")) : id,
                  Spec(snap));
  return OkStatus();
}

Status RbdVolume::RemoveSnap(const std::string& snap) {
  if (IsGroupSnapName(snap)) return GroupShare(Spec(snap));
  if (snap == snap_name_) snap_.reset();
  const std::string spec = Spec(snap);
  ASSIGN_OR_RETURN(auto h, Head());
  bool exists = false;
  if (int rc = rbd_snap_exists(h->get(), snap.c_str(), &exists); rc < 0) {
    return ErrnoStatus(rc, "removing snapshot " + spec);
  }
  if (!exists) return NotFound(fmt::format("snapshot {} does not exist", spec));
  ASSIGN_OR_RETURN(bool prot, IsProtected(h->get(), Spec(), snap));
  if (prot) {
    ASSIGN_OR_RETURN(size_t clones, CountClones(*io_, name_, snap));
    if (clones > 0) return ClonesDependOn(spec, clones).Annotate("removing snapshot " + spec);
    const int rc = rbd_snap_unprotect(h->get(), snap.c_str());
    if (rc == -EBUSY) {
      return ClonesDependOn(spec, 1).Annotate("removing snapshot " + spec);  // cloned meanwhile
    }
    if (rc < 0 && rc != -EINVAL) return ErrnoStatus(rc, "unprotecting snapshot " + spec);
  }
  uint64_t id = 0;
  if (int rc = rbd_snap_get_id(h->get(), snap.c_str(), &id); rc < 0) {
    return ErrnoStatus(rc, "getting the id of snapshot " + spec);
  }
  const int rc = rbd_snap_remove(h->get(), snap.c_str());
  if (rc == -ENOENT) return NotFound(fmt::format("snapshot {} does not exist", spec));
  if (rc < 0) return ErrnoStatus(rc, "removing snapshot " + spec);
  book_->Forget(name_, id);
  return OkStatus();
}

StatusOr<std::vector<std::string>> RbdVolume::OtherClients() {
  ASSIGN_OR_RETURN(auto h, HeadForReading());
  std::vector<rbd_image_watcher_t> w(8);
  size_t n = w.size();
  int rc;
  while ((rc = rbd_watchers_list(h->get(), w.data(), &n)) == -ERANGE) w.resize(n);
  if (rc < 0) return ErrnoStatus(rc, "listing the clients that hold " + Spec() + " open");
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back(PlainClientAddr(w[i].addr ? w[i].addr : ""));
  rbd_watchers_list_cleanup(w.data(), n);
  ASSIGN_OR_RETURN(const std::string self, io_->cluster().ClientAddress());
  std::erase(out, self);
  return out;
}

Status RbdVolume::RenameSnap(const std::string& from, const std::string& to) {
  if (IsGroupSnapName(from)) return GroupShare(Spec(from));
  if (IsGroupSnapName(to)) return GroupShare(Spec(to));
  if (from == snap_name_) snap_.reset();
  ASSIGN_OR_RETURN(auto h, Head());
  const int rc = rbd_snap_rename(h->get(), from.c_str(), to.c_str());
  if (rc == -ENOENT) return NotFound(fmt::format("snapshot {} does not exist", Spec(from)));
  if (rc == -EEXIST) return AlreadyExists(fmt::format("snapshot {} already exists", Spec(to)));
  if (rc < 0) return ErrnoStatus(rc, fmt::format("renaming snapshot {} to {}", Spec(from), to));
  return OkStatus();
}

}  // namespace cairn
