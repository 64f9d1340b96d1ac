// Listing what changed between two snapshots (DiffExtents, two passes over
// the object maps and the exact diff). The cheap "changed at all?" check is
// in rbd_changed_since.cc.

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/ceph/rbd_internal.h"

namespace cairn {

namespace rbd_internal {

// --- DiffExtents -------------------------------------------------------------

// What rbd_diff_iterate2 reports. Its callback may run on librados threads
// (one at a time, in order), so the list is guarded anyway.
struct DiffCollector {
  std::mutex mu;
  std::vector<Extent> extents;
};

static int CollectExtent(uint64_t offset, size_t length, int exists, void* arg) {
  auto* c = static_cast<DiffCollector*>(arg);
  std::lock_guard lock(c->mu);
  c->extents.push_back({offset, length, exists ? RecordKind::kData : RecordKind::kZero});
  return 0;
}

// Sorts and unites extents of one kind, clipped to [lo, hi).
static std::vector<Extent> Unite(const std::vector<Extent>& in, RecordKind kind, uint64_t lo,
                                 uint64_t hi) {
  std::vector<Extent> v;
  for (const auto& e : in) {
    const uint64_t b = std::max(e.offset, lo);
    const uint64_t end = std::min(e.offset + e.length, hi);
    if (e.kind == kind && b < end) v.push_back({b, end - b, kind});
  }
  std::sort(v.begin(), v.end(),
            [](const Extent& a, const Extent& b) { return a.offset < b.offset; });
  std::vector<Extent> out;
  for (const auto& e : v) {
    if (!out.empty() && e.offset <= out.back().offset + out.back().length) {
      const uint64_t end = std::max(out.back().offset + out.back().length, e.offset + e.length);
      out.back().length = end - out.back().offset;
    } else {
      out.push_back(e);
    }
  }
  return out;
}

// librbd's raw report as ascending, disjoint extents within [lo, hi). Where
// a range is reported both ways, kData wins: reading it at `to_snap` gives
// the right bytes either way.
static std::vector<Extent> Normalize(const std::vector<Extent>& raw, uint64_t lo, uint64_t hi) {
  const std::vector<Extent> data = Unite(raw, RecordKind::kData, lo, hi);
  const std::vector<Extent> zero = Unite(raw, RecordKind::kZero, lo, hi);
  std::vector<Extent> zero_only;
  size_t d = 0;
  for (const auto& z : zero) {
    uint64_t pos = z.offset;
    const uint64_t end = z.offset + z.length;
    while (pos < end) {
      while (d < data.size() && data[d].offset + data[d].length <= pos) ++d;
      if (d < data.size() && data[d].offset < end) {
        if (data[d].offset > pos)
          zero_only.push_back({pos, data[d].offset - pos, RecordKind::kZero});
        pos = data[d].offset + data[d].length;
      } else {
        zero_only.push_back({pos, end - pos, RecordKind::kZero});
        pos = end;
      }
    }
  }
  std::vector<Extent> out;
  out.reserve(data.size() + zero_only.size());
  std::merge(data.begin(), data.end(), zero_only.begin(), zero_only.end(), std::back_inserter(out),
             [](const Extent& a, const Extent& b) { return a.offset < b.offset; });
  return out;
}

// Ranges (kind ignored) covering every extent, split at `max_len`.
static std::vector<Extent> Ranges(const std::vector<Extent>& extents, uint64_t max_len) {
  std::vector<Extent> all = extents;
  for (auto& e : all) e.kind = RecordKind::kData;
  std::vector<Extent> out;
  for (const auto& r : Unite(all, RecordKind::kData, 0, UINT64_MAX)) {
    for (uint64_t pos = r.offset; pos < r.offset + r.length; pos += max_len) {
      out.push_back({pos, std::min(max_len, r.offset + r.length - pos), RecordKind::kData});
    }
  }
  return out;
}

// The parts of `flagged` (whole objects the object maps call changed,
// ascending) inside `range` that the exact pass listed nothing for, object by
// object, with the kind the object maps gave them. `exact` is ascending.
static std::vector<Extent> Unconfirmed(const std::vector<Extent>& flagged,
                                       const std::vector<Extent>& exact, const Extent& range,
                                       uint64_t object_size) {
  std::vector<Extent> out;
  size_t x = 0;
  const uint64_t range_end = range.offset + range.length;
  for (const auto& f : flagged) {
    uint64_t pos = std::max(f.offset, range.offset);
    const uint64_t end = std::min(f.offset + f.length, range_end);
    while (pos < end) {
      const uint64_t seg_end = std::min(end, (pos / object_size + 1) * object_size);
      while (x < exact.size() && exact[x].offset + exact[x].length <= pos) ++x;
      const bool listed = x < exact.size() && exact[x].offset < seg_end;
      if (!listed) out.push_back({pos, seg_end - pos, f.kind});
      pos = seg_end;
    }
  }
  return out;
}

static StatusOr<uint64_t> FlagsAt(rbd_image_t h, const std::string& spec) {
  uint64_t flags = 0;
  if (int rc = rbd_get_flags(h, &flags); rc < 0) {
    return ErrnoStatus(rc, "getting the flags of " + spec);
  }
  return flags;
}

static StatusOr<bool> HasParent(rbd_image_t h, const std::string& spec) {
  rbd_linked_image_spec_t image{};
  rbd_snap_spec_t snap{};
  const int rc = rbd_get_parent(h, &image, &snap);
  if (rc == -ENOENT) return false;
  if (rc < 0) return ErrnoStatus(rc, "getting the parent of " + spec);
  rbd_linked_image_spec_cleanup(&image);
  rbd_snap_spec_cleanup(&snap);
  return true;
}

// What DiffImage finds out before it lists anything.
struct DiffPlan {
  std::string what;   // "diffing SPEC from SNAP", for messages
  uint64_t size = 0;  // of the image at `to_snap`
  uint64_t object_size = 1;
  bool nothing = false;  // `from_snap` is `to_snap`: nothing changed
  // The ids of the two points (the empty image 0, the head UINT64_MAX).
  uint64_t from_id = 0;
  uint64_t to_id = UINT64_MAX;
  // The object maps of both points are valid: the object-map pass finds the
  // changed objects, the exact pass lists only those.
  bool fast = false;
  // A clone's first epoch: the object-map pass only (the exact one would
  // list the parent's data too).
  bool whole_objects_only = false;
  std::optional<Extent> suspect;  // see ShrinkSuspect
};

// Checks that `from_snap` exists and is not newer than `to_snap`, and
// finds their ids. `to_snap` may be a share of a group snapshot; `from_snap`
// may not: rbd_diff_iterate2 names its start by user snapshot name.
static Status FindPoints(rbd_image_t h, const std::string& pool, const std::string& image,
                         const std::string& from_snap, const std::string& to_snap, DiffPlan& plan) {
  if (IsGroupSnapName(from_snap)) {
    return InvalidArgument(plan.what + ": a diff starts at a user snapshot, not a group snapshot");
  }
  const char* from = from_snap.c_str();
  bool exists = false;
  if (int rc = rbd_snap_exists(h, from, &exists); rc < 0) return ErrnoStatus(rc, plan.what);
  if (!exists) {
    return NotFound(fmt::format("{}: snapshot {} does not exist", plan.what,
                                ImageSpec(pool, image, from_snap)));
  }
  if (int rc = rbd_snap_get_id(h, from, &plan.from_id); rc < 0) return ErrnoStatus(rc, plan.what);
  if (!to_snap.empty()) {
    ASSIGN_OR_RETURN(plan.to_id, SnapIdOf(h, to_snap, ImageSpec(pool, image)));
  }
  if (plan.from_id > plan.to_id) {
    return InvalidArgument(plan.what + ": " + from_snap + " is the newer one");
  }
  plan.nothing = plan.from_id == plan.to_id;
  return OkStatus();
}

// Moves `h` to snapshot `id` (UINT64_MAX: the head).
static int SetSnapById(rbd_image_t h, uint64_t id) {
  return id == UINT64_MAX ? rbd_snap_set(h, nullptr) : rbd_snap_set_by_id(h, id);
}

// The flags of `from_snap`: fast-diff also reads the object map of the
// start point. `h` is moved there and back to `to_snap` (by id: a share of
// a group snapshot has no name librbd resolves).
static StatusOr<uint64_t> FlagsAtFrom(rbd_image_t h, const std::string& spec,
                                      const std::string& from_snap, const DiffPlan& plan) {
  if (int rc = rbd_snap_set(h, from_snap.c_str()); rc < 0) return ErrnoStatus(rc, plan.what);
  StatusOr<uint64_t> from_flags = FlagsAt(h, spec);
  if (int rc = SetSnapById(h, plan.to_id); rc < 0) return ErrnoStatus(rc, plan.what);
  return from_flags;
}

// Pacific's object-map diff loses the objects that a shrink recorded in a
// snapshot between the two points removed, once the image grew back (it
// resets them to "unchanged" instead of "hole"). Only the range between
// the smallest size in between and the end of the compared range can be
// hit: it always gets the exact pass. Returns that range, if any. Every
// snapshot in between counts, of whatever namespace: each has its object
// map.
static StatusOr<std::optional<Extent>> ShrinkSuspect(rbd_image_t h, const std::string& spec,
                                                     const DiffPlan& plan) {
  ASSIGN_OR_RETURN(std::vector<RawSnap> snaps, ListAllSnapsOf(h, spec));
  uint64_t from_size = 0;
  uint64_t smallest = UINT64_MAX;
  for (const auto& s : snaps) {
    if (s.id == plan.from_id) from_size = s.size;
    if (s.id > plan.from_id && s.id < plan.to_id) smallest = std::min(smallest, s.size);
  }
  const uint64_t limit = std::min(from_size, plan.size);
  const uint64_t start = smallest / plan.object_size * plan.object_size;
  if (smallest < limit && start < limit) {
    return std::optional<Extent>(Extent{start, limit - start, RecordKind::kData});
  }
  return std::optional<Extent>();
}

static StatusOr<DiffPlan> PlanDiff(rbd_image_t h, const std::string& pool, const std::string& image,
                                   const std::string& from_snap, const std::string& to_snap) {
  DiffPlan plan;
  const std::string spec = ImageSpec(pool, image, to_snap);
  plan.what =
      fmt::format("diffing {} from {}", spec, from_snap.empty() ? "the empty image" : from_snap);
  ASSIGN_OR_RETURN(plan.size, ImageSize(h, spec));
  uint64_t flags = 0;
  ASSIGN_OR_RETURN(flags, FlagsAt(h, spec));
  if (!from_snap.empty()) {
    RETURN_IF_ERROR(FindPoints(h, pool, image, from_snap, to_snap, plan));
    if (plan.nothing) return plan;
    ASSIGN_OR_RETURN(const uint64_t from_flags, FlagsAtFrom(h, spec, from_snap, plan));
    flags |= from_flags;
  }
  uint64_t features = 0;
  if (int rc = rbd_get_features(h, &features); rc < 0) return ErrnoStatus(rc, plan.what);
  rbd_image_info_t info{};
  if (int rc = rbd_stat(h, &info, sizeof info); rc < 0) return ErrnoStatus(rc, plan.what);
  plan.object_size = std::max<uint64_t>(info.obj_size, 1);
  plan.fast = (features & RBD_FEATURE_FAST_DIFF) != 0 &&
              (flags & (RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID)) == 0;
  if (from_snap.empty()) {
    ASSIGN_OR_RETURN(plan.whole_objects_only, HasParent(h, spec));
  }
  if (plan.fast && !from_snap.empty()) {
    ASSIGN_OR_RETURN(plan.suspect, ShrinkSuspect(h, spec, plan));
  }
  return plan;
}

// The passes of one diff over `h`: rbd_diff_iterate2 calls whose extents
// go, normalized and in offset order, to one ExtentMerger and on to `fn`.
class DiffPasses {
 public:
  DiffPasses(rbd_image_t h, const std::string& from_snap, const std::string& what,
             const std::function<Status(const Extent&)>& fn)
      : h_(h), from_(SnapOrNull(from_snap)), what_(what), merger_(fn) {}

  // One rbd_diff_iterate2 over [lo, lo+len); the normalized result.
  StatusOr<std::vector<Extent>> Iterate(uint64_t lo, uint64_t len, bool whole_object) {
    collector_.extents.clear();
    const int rc = rbd_diff_iterate2(h_, from_, lo, len, /*include_parent=*/1, whole_object ? 1 : 0,
                                     CollectExtent, &collector_);
    if (rc < 0) return ErrnoStatus(rc, fmt::format("{} over {}~{}", what_, lo, len));
    std::lock_guard lock(collector_.mu);
    return Normalize(collector_.extents, lo, lo + len);
  }
  Status Emit(const std::vector<Extent>& extents) {
    for (const auto& e : extents) RETURN_IF_ERROR(merger_.Add(e));
    return OkStatus();
  }
  Status Flush() { return merger_.Flush(); }

 private:
  rbd_image_t h_;
  const char* from_;
  const std::string& what_;
  ExtentMerger merger_;
  DiffCollector collector_;
};

// Without valid object maps: the exact pass over the whole image.
static Status ListExact(DiffPasses& passes, uint64_t size) {
  for (uint64_t lo = 0; lo < size; lo += kFineWindow) {
    ASSIGN_OR_RETURN(std::vector<Extent> exact,
                     passes.Iterate(lo, std::min(kFineWindow, size - lo), false));
    RETURN_IF_ERROR(passes.Emit(exact));
  }
  return OkStatus();
}

// Bytes that the object-map pass flagged, that the exact pass listed, and
// that were sent whole for want of a clone to confirm them.
struct DiffBytes {
  uint64_t flagged = 0;
  uint64_t exact = 0;
  uint64_t unconfirmed = 0;
};

// The exact pass over `changed`, the objects of one window the object-map
// pass flagged (`flagged`) and the suspect range in it.
static Status ListChangedExactly(DiffPasses& passes, const std::vector<Extent>& flagged,
                                 const std::vector<Extent>& changed, uint64_t object_size,
                                 DiffBytes& bytes) {
  for (const auto& r : Ranges(changed, kFineWindow)) {
    ASSIGN_OR_RETURN(std::vector<Extent> exact, passes.Iterate(r.offset, r.length, false));
    for (const auto& x : exact) bytes.exact += x.length;
    // An object the object maps call changed while its clones show no
    // change took a write with an out-of-date snapshot context: a client
    // that opened the image while a snapshot was being taken may miss the
    // snapshot's notification, and RADOS then files its writes under the
    // older snapshots as well (without a clone), where the exact pass
    // cannot tell them apart. Such objects are sent whole, as they are
    // at `to_snap`.
    std::vector<Extent> whole = Unconfirmed(flagged, exact, r, object_size);
    if (!whole.empty()) {
      for (const auto& w : whole) bytes.unconfirmed += w.length;
      exact.insert(exact.end(), whole.begin(), whole.end());
      std::sort(exact.begin(), exact.end(),
                [](const Extent& a, const Extent& b) { return a.offset < b.offset; });
    }
    RETURN_IF_ERROR(passes.Emit(exact));
  }
  return OkStatus();
}

// The object-map pass, a window of objects at a time, each followed by the
// exact pass over what it flagged (unless whole objects are sent).
static StatusOr<DiffBytes> ListByObjectMap(DiffPasses& passes, const DiffPlan& plan,
                                           bool whole_changed) {
  DiffBytes bytes;
  const uint64_t window = plan.object_size * kCoarseWindowObjects;
  for (uint64_t lo = 0; lo < plan.size; lo += window) {
    const uint64_t len = std::min(window, plan.size - lo);
    ASSIGN_OR_RETURN(std::vector<Extent> changed, passes.Iterate(lo, len, true));
    for (const auto& c : changed) bytes.flagged += c.length;
    if (plan.whole_objects_only || whole_changed) {
      RETURN_IF_ERROR(passes.Emit(changed));
      continue;
    }
    const std::vector<Extent> flagged = changed;
    if (plan.suspect) {
      const uint64_t b = std::max(plan.suspect->offset, lo);
      const uint64_t e = std::min(plan.suspect->offset + plan.suspect->length, lo + len);
      if (b < e) changed.push_back({b, e - b, RecordKind::kData});
    }
    RETURN_IF_ERROR(ListChangedExactly(passes, flagged, changed, plan.object_size, bytes));
  }
  return bytes;
}

static void LogObjectMapPass(const DiffPlan& plan, const std::string& from_snap, bool whole_changed,
                             const DiffBytes& bytes) {
  if (whole_changed && !plan.whole_objects_only) {
    spdlog::info(
        "{}: clients opened the image around a snapshot since {}; the {} bytes of "
        "objects changed since are sent whole",
        plan.what, from_snap, bytes.flagged);
  }
  spdlog::debug("{}: the object maps flag {} bytes, the exact pass lists {} of them", plan.what,
                bytes.flagged, bytes.exact);
  if (bytes.unconfirmed > 0) {
    // Seen too for the last object of an image cut short by a resize (sent
    // whole: right, if more than needed).
    spdlog::warn(
        "{}: {} bytes of objects changed per the object maps but not per their clones "
        "(as writes made with an out-of-date snapshot context leave them): sent whole",
        plan.what, bytes.unconfirmed);
  }
}

// Lists the diff from `from_snap` ("" = the empty image) to the point `h`
// is open at (`to_snap`, "" = the head). `h` is the caller's: its snapshot
// is moved and put back before the listing, so no I/O may be in flight on
// it until this returns or calls `fn` (RbdVolume::DiffExtents).
// `whole_changed`: every object the object maps flag goes whole, as at
// `to_snap` (see "Settling a snapshot").
Status DiffImage(rbd_image_t h, const std::string& pool, const std::string& image,
                 const std::string& from_snap, const std::string& to_snap,
                 const std::function<Status(const Extent&)>& fn, bool whole_changed) {
  ASSIGN_OR_RETURN(const DiffPlan plan, PlanDiff(h, pool, image, from_snap, to_snap));
  if (plan.nothing) return OkStatus();
  DiffPasses passes(h, from_snap, plan.what, fn);
  if (whole_changed && !plan.fast && !plan.whole_objects_only) {
    spdlog::warn(
        "{}: clients opened the image around a snapshot since {}, and without "
        "fast-diff the writes they made with an out-of-date snapshot context cannot "
        "be found",
        plan.what, from_snap);
  }
  if (!plan.fast && !plan.whole_objects_only) {
    RETURN_IF_ERROR(ListExact(passes, plan.size));
    return passes.Flush();
  }
  ASSIGN_OR_RETURN(const DiffBytes bytes, ListByObjectMap(passes, plan, whole_changed));
  LogObjectMapPass(plan, from_snap, whole_changed, bytes);
  return passes.Flush();
}

}  // namespace rbd_internal

using namespace rbd_internal;  // the adapters' shared helpers (rbd_internal.h)

Status RbdVolume::DiffExtents(const std::string& from_snap, const std::string& to_snap,
                              const std::function<Status(const Extent&)>& fn) {
  if (IsGroupSnapName(from_snap)) {
    return InvalidArgument(
        fmt::format("diffing {} from {}: a diff starts at a user snapshot, not a group snapshot",
                    Spec(to_snap), from_snap));
  }
  // The head's changes are listed on a fresh handle; a snapshot's on the
  // handle at it that OpenIo shares. DiffImage moves that handle to
  // `from_snap` and back before it lists anything, so reads started from
  // its callback read `to_snap`; should it fail on the way, the handle is
  // not trusted again.
  ASSIGN_OR_RETURN(std::shared_ptr<Image> at,
                   to_snap.empty() ? OpenSame("", true) : AtSnap(to_snap));
  bool whole = false;
  if (!from_snap.empty()) {
    // DiffImage reports a missing snapshot.
    uint64_t from = 0;
    StatusOr<uint64_t> to = UINT64_MAX;  // the head
    if (!to_snap.empty()) to = SnapIdOf(at->get(), to_snap, Spec());
    if (rbd_snap_get_id(at->get(), from_snap.c_str(), &from) == 0 && to.ok()) {
      whole = book_->AnyUnsettled(name_, from, *to);
    }
  }
  Status st = DiffImage(at->get(), io_->pool(), name_, from_snap, to_snap, fn, whole);
  if (!st.ok() && at == snap_) snap_.reset();
  return st;
}

}  // namespace cairn
