// Listing what changed between two snapshots (DiffExtents, two passes over
// the object maps and the exact diff), and the cheap "changed at all?" check
// on the head's object map (ChangedSince).

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

// Lists the diff from `from_snap` ("" = the empty image) to the point `h`
// is open at (`to_snap`, "" = the head). `h` is the caller's: its snapshot
// is moved and put back before the listing, so no I/O may be in flight on
// it until this returns or calls `fn` (RbdVolume::DiffExtents).
// `whole_changed`: every object the object maps flag goes whole, as at
// `to_snap` (see "Settling a snapshot").
Status DiffImage(rbd_image_t h, const std::string& pool, const std::string& image,
                 const std::string& from_snap, const std::string& to_snap,
                 const std::function<Status(const Extent&)>& fn, bool whole_changed) {
  const std::string spec = ImageSpec(pool, image, to_snap);
  const char* from = SnapOrNull(from_snap);
  const std::string what =
      fmt::format("diffing {} from {}", spec, from_snap.empty() ? "the empty image" : from_snap);
  ASSIGN_OR_RETURN(const uint64_t size, ImageSize(h, spec));

  uint64_t flags = 0;
  ASSIGN_OR_RETURN(flags, FlagsAt(h, spec));
  if (from != nullptr) {
    bool exists = false;
    if (int rc = rbd_snap_exists(h, from, &exists); rc < 0) return ErrnoStatus(rc, what);
    if (!exists) {
      return NotFound(
          fmt::format("{}: snapshot {} does not exist", what, ImageSpec(pool, image, from_snap)));
    }
    if (!to_snap.empty()) {
      uint64_t from_id = 0;
      uint64_t to_id = 0;
      if (int rc = rbd_snap_get_id(h, from, &from_id); rc < 0) return ErrnoStatus(rc, what);
      if (int rc = rbd_snap_get_id(h, to_snap.c_str(), &to_id); rc < 0) {
        return ErrnoStatus(rc, what);
      }
      if (from_id > to_id) return InvalidArgument(what + ": " + from_snap + " is the newer one");
      if (from_id == to_id) return OkStatus();
    }
    // fast-diff also reads the object map of the start point.
    if (int rc = rbd_snap_set(h, from); rc < 0) return ErrnoStatus(rc, what);
    StatusOr<uint64_t> from_flags = FlagsAt(h, spec);
    if (int rc = rbd_snap_set(h, SnapOrNull(to_snap)); rc < 0) return ErrnoStatus(rc, what);
    if (!from_flags.ok()) return from_flags.status();
    flags |= *from_flags;
  }
  uint64_t features = 0;
  if (int rc = rbd_get_features(h, &features); rc < 0) return ErrnoStatus(rc, what);
  rbd_image_info_t info{};
  if (int rc = rbd_stat(h, &info, sizeof info); rc < 0) return ErrnoStatus(rc, what);
  const uint64_t object_size = std::max<uint64_t>(info.obj_size, 1);
  const bool fast = (features & RBD_FEATURE_FAST_DIFF) != 0 &&
                    (flags & (RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID)) == 0;
  bool whole_objects_only = false;
  if (from == nullptr) {
    ASSIGN_OR_RETURN(whole_objects_only, HasParent(h, spec));
  }
  // Pacific's object-map diff loses the objects that a shrink recorded in a
  // snapshot between the two points removed, once the image grew back (it
  // resets them to "unchanged" instead of "hole"). Only the range between
  // the smallest size in between and the end of the compared range can be
  // hit: it always gets the exact pass.
  std::optional<Extent> suspect;
  if (fast && from != nullptr) {
    ASSIGN_OR_RETURN(std::vector<SnapInfo> snaps, ListSnapsOf(h, spec));
    uint64_t from_id = 0;
    uint64_t from_size = 0;
    uint64_t to_id = UINT64_MAX;  // the head
    for (const auto& s : snaps) {
      if (s.name == from_snap) {
        from_id = s.id;
        from_size = s.size;
      }
      if (!to_snap.empty() && s.name == to_snap) to_id = s.id;
    }
    uint64_t smallest = UINT64_MAX;
    for (const auto& s : snaps) {
      if (s.id > from_id && s.id < to_id) smallest = std::min(smallest, s.size);
    }
    const uint64_t limit = std::min(from_size, size);
    const uint64_t start = smallest / object_size * object_size;
    if (smallest < limit && start < limit) {
      suspect = Extent{start, limit - start, RecordKind::kData};
    }
  }

  ExtentMerger merger(fn);
  DiffCollector collector;
  // One rbd_diff_iterate2 over [lo, lo+len); the normalized result.
  auto iterate = [&](uint64_t lo, uint64_t len,
                     bool whole_object) -> StatusOr<std::vector<Extent>> {
    collector.extents.clear();
    const int rc = rbd_diff_iterate2(h, from, lo, len, /*include_parent=*/1, whole_object ? 1 : 0,
                                     CollectExtent, &collector);
    if (rc < 0) return ErrnoStatus(rc, fmt::format("{} over {}~{}", what, lo, len));
    std::lock_guard lock(collector.mu);
    return Normalize(collector.extents, lo, lo + len);
  };
  auto emit = [&](const std::vector<Extent>& extents) -> Status {
    for (const auto& e : extents) RETURN_IF_ERROR(merger.Add(e));
    return OkStatus();
  };

  if (whole_changed && !fast && !whole_objects_only) {
    spdlog::warn(
        "{}: clients opened the image around a snapshot since {}, and without "
        "fast-diff the writes they made with an out-of-date snapshot context cannot "
        "be found",
        what, from_snap);
  }
  if (!fast && !whole_objects_only) {
    for (uint64_t lo = 0; lo < size; lo += kFineWindow) {
      ASSIGN_OR_RETURN(std::vector<Extent> exact,
                       iterate(lo, std::min(kFineWindow, size - lo), false));
      RETURN_IF_ERROR(emit(exact));
    }
    return merger.Flush();
  }
  const uint64_t window = object_size * kCoarseWindowObjects;
  uint64_t flagged_bytes = 0;
  uint64_t exact_bytes = 0;
  uint64_t unconfirmed_bytes = 0;
  for (uint64_t lo = 0; lo < size; lo += window) {
    const uint64_t len = std::min(window, size - lo);
    ASSIGN_OR_RETURN(std::vector<Extent> changed, iterate(lo, len, true));
    for (const auto& c : changed) flagged_bytes += c.length;
    if (whole_objects_only || whole_changed) {
      RETURN_IF_ERROR(emit(changed));
      continue;
    }
    const std::vector<Extent> flagged = changed;
    if (suspect) {
      const uint64_t b = std::max(suspect->offset, lo);
      const uint64_t e = std::min(suspect->offset + suspect->length, lo + len);
      if (b < e) changed.push_back({b, e - b, RecordKind::kData});
    }
    for (const auto& r : Ranges(changed, kFineWindow)) {
      ASSIGN_OR_RETURN(std::vector<Extent> exact, iterate(r.offset, r.length, false));
      for (const auto& x : exact) exact_bytes += x.length;
      // An object the object maps call changed while its clones show no
      // change took a write with an out-of-date snapshot context: a client
      // that opened the image while a snapshot was being taken may miss the
      // snapshot's notification, and RADOS then files its writes under the
      // older snapshots as well (without a clone), where the exact pass
      // cannot tell them apart. Such objects are sent whole, as they are
      // at `to_snap`.
      std::vector<Extent> whole = Unconfirmed(flagged, exact, r, object_size);
      if (!whole.empty()) {
        for (const auto& w : whole) unconfirmed_bytes += w.length;
        exact.insert(exact.end(), whole.begin(), whole.end());
        std::sort(exact.begin(), exact.end(),
                  [](const Extent& a, const Extent& b) { return a.offset < b.offset; });
      }
      RETURN_IF_ERROR(emit(exact));
    }
  }
  if (whole_changed && !whole_objects_only) {
    spdlog::info(
        "{}: clients opened the image around a snapshot since {}; the {} bytes of "
        "objects changed since are sent whole",
        what, from_snap, flagged_bytes);
  }
  spdlog::debug("{}: the object maps flag {} bytes, the exact pass lists {} of them", what,
                flagged_bytes, exact_bytes);
  if (unconfirmed_bytes > 0) {
    // Seen too for the last object of an image cut short by a resize (sent
    // whole: right, if more than needed).
    spdlog::warn(
        "{}: {} bytes of objects changed per the object maps but not per their clones "
        "(as writes made with an out-of-date snapshot context leave them): sent whole",
        what, unconfirmed_bytes);
  }
  return merger.Flush();
}

// Object map states (two bits per object, in cls_rbd's BitVector<2>).
constexpr uint8_t kObjectNonexistent = 0;
constexpr uint8_t kObjectExistsClean = 3;
// Image and snapshot flags (RBD_FLAG_*): the maps are not to be trusted.
constexpr uint64_t kFlagObjectMapInvalid = 1;
constexpr uint64_t kFlagFastDiffInvalid = 2;
// ChangedSince: quick checks (the map's version only) between two full ones.
constexpr int kFullCheckEvery = 10;

// An RBD object whole and its RADOS version, or kNotFound.
static StatusOr<std::pair<std::string, uint64_t>> ReadWholeVersioned(rados_ioctx_t io,
                                                                     const std::string& oid,
                                                                     size_t at_most) {
  std::string out(at_most + 1, '\0');
  size_t got = 0;
  int prval = 0;
  rados_completion_t c = nullptr;
  if (int rc = rados_aio_create_completion2(nullptr, nullptr, &c); rc < 0) {
    return ErrnoStatus(rc, "reading " + oid);
  }
  rados_read_op_t op = rados_create_read_op();
  rados_read_op_read(op, 0, out.size(), out.data(), &got, &prval);
  int rc = rados_aio_read_op_operate(op, io, c, oid.c_str(), 0);
  if (rc == 0) {
    rados_aio_wait_for_complete(c);
    rc = rados_aio_get_return_value(c);
  }
  const uint64_t version = rados_aio_get_version(c);
  rados_aio_release(c);
  rados_release_read_op(op);
  if (rc == -ENOENT) return NotFound("no object " + oid);
  if (rc < 0) return ErrnoStatus(rc, "reading " + oid);
  if (prval < 0) return ErrnoStatus(prval, "reading " + oid);
  out.resize(got);
  return std::make_pair(std::move(out), version);
}

// Where the two-bit states of an encoded object map lie: a u32 length and
// that many header bytes (u8 version, u8 compat, u32 length, u64 count),
// then count/4 bytes of states, then a footer.
struct MapLayout {
  size_t data_at = 0;
  size_t data_len = 0;
};
static std::optional<MapLayout> LayoutOf(const std::string& m) {
  if (m.size() < 18) return std::nullopt;
  uint32_t hlen = 0;
  uint64_t count = 0;
  std::memcpy(&hlen, m.data(), 4);
  std::memcpy(&count, m.data() + 10, 8);
  hlen = le32toh(hlen);
  count = le64toh(count);
  if (hlen != 14 || count > (m.size() - 18) * 4) return std::nullopt;
  return MapLayout{18, static_cast<size_t>((count + 3) / 4)};
}

}  // namespace rbd_internal

using namespace rbd_internal;  // the adapters' shared helpers (rbd_internal.h)

StatusOr<bool> RbdVolume::ChangedSince(const SnapInfo& snap) {
  const std::string header = "rbd_header." + id_;
  const std::string head_map = "rbd_object_map." + id_;
  if (!unchanged_ || unchanged_->snap_id != snap.id) {
    // Once per snapshot: what the head's map reads while nothing changed.
    // Taking a snapshot copies the head's map to the snapshot's and marks
    // every existing object of the head clean; a write then marks its
    // object dirty (exists), a discard or shrink removes it.
    // No image is opened: an open costs a copy of the client's whole
    // configuration.
    UnchangedMap u;
    u.snap_id = snap.id;
    std::array<HeaderCall, 2> calls{{{"get_features", kNoSnap, {}}, {"get_flags", snap.id, {}}}};
    RETURN_IF_ERROR(CallHeader(io_->get(), header, calls, Spec()));
    // get_features answers the features, then the incompatible ones.
    if (calls[0].out.size() < sizeof(uint64_t)) {
      return DataLoss("the features of " + Spec() + " do not decode");
    }
    ASSIGN_OR_RETURN(const uint64_t features,
                     DecodeFlags(std::string_view(calls[0].out).substr(0, 8), header));
    ASSIGN_OR_RETURN(const uint64_t snap_flags, DecodeFlags(calls[1].out, header));
    if ((features & RBD_FEATURE_FAST_DIFF) != 0 &&
        (snap_flags & (kFlagObjectMapInvalid | kFlagFastDiffInvalid)) == 0) {
      const std::string snap_map = fmt::format("{}.{:016x}", head_map, snap.id);
      uint64_t len = 0;
      time_t mtime = 0;
      if (int rc = rados_stat(io_->get(), snap_map.c_str(), &len, &mtime); rc < 0) {
        return ErrnoStatus(rc, "reading the object map of " + Spec(snap.name));
      }
      ASSIGN_OR_RETURN(auto whole, ReadWholeVersioned(io_->get(), snap_map, len));
      u.expected = std::move(whole.first);
      if (auto layout = LayoutOf(u.expected)) {
        for (size_t i = 0; i < layout->data_len; ++i) {
          const auto b = static_cast<uint8_t>(u.expected[layout->data_at + i]);
          uint8_t out = 0;
          for (int shift = 0; shift < 8; shift += 2) {
            const uint8_t state = (b >> shift) & 3;
            out |= (state == kObjectNonexistent ? kObjectNonexistent : kObjectExistsClean) << shift;
          }
          u.expected[layout->data_at + i] = static_cast<char>(out);
        }
        // The footer holds checksums of what was written: only the states
        // are compared.
        u.expected.resize(layout->data_at + layout->data_len);
        u.usable = true;
      }
    }
    unchanged_ = std::move(u);
  }
  if (!unchanged_->usable) return true;
  UnchangedMap& u = *unchanged_;
  // Between full checks, one RADOS op: the head's map object is still the
  // version a full check found unchanged. A write to a clean object, a
  // discard, a resize, a snapshot over dirty objects: each rewrites it. A
  // full check every kFullCheckEvery quick ones reads the header's flags
  // too (a client that failed to update the map marks it invalid there).
  if (u.map_version != 0 && u.quick_checks < kFullCheckEvery) {
    rados_read_op_t op = rados_create_read_op();
    rados_read_op_assert_version(op, u.map_version);
    const int rc = rados_read_op_operate(op, io_->get(), head_map.c_str(), 0);
    rados_release_read_op(op);
    if (rc == 0) {
      ++u.quick_checks;
      return false;
    }
    // -ERANGE/-EOVERFLOW: rewritten since; anything else: ask in full.
  }
  u.map_version = 0;
  u.quick_checks = 0;
  // The map, then the header: a snapshot taken (by anyone) before the map
  // was read marks every object of the head clean again, whatever was
  // written before it, and the header read after tells of it.
  ASSIGN_OR_RETURN(auto map_now, ReadWholeVersioned(io_->get(), head_map, u.expected.size() + 64));
  const std::string& map = map_now.first;
  const auto layout = LayoutOf(map);
  if (!layout || layout->data_at + layout->data_len != u.expected.size()) return true;
  if (map.compare(0, u.expected.size(), u.expected) != 0) return true;
  std::array<HeaderCall, 2> now{{{"get_snapcontext", 0, {}}, {"get_flags", kNoSnap, {}}}};
  RETURN_IF_ERROR(CallHeader(io_->get(), header, now, Spec()));
  ASSIGN_OR_RETURN(const auto snapc, DecodeSnapContext(now[0].out, Spec()));
  if (snapc.first != snap.id) return true;
  ASSIGN_OR_RETURN(const uint64_t flags, DecodeFlags(now[1].out, header));
  if ((flags & (kFlagObjectMapInvalid | kFlagFastDiffInvalid)) != 0) return true;
  u.map_version = map_now.second;
  return false;
}

Status RbdVolume::DiffExtents(const std::string& from_snap, const std::string& to_snap,
                              const std::function<Status(const Extent&)>& fn) {
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
    uint64_t to = UINT64_MAX;  // the head
    if (rbd_snap_get_id(at->get(), from_snap.c_str(), &from) == 0 &&
        (to_snap.empty() || rbd_snap_get_id(at->get(), to_snap.c_str(), &to) == 0)) {
      whole = book_->AnyUnsettled(name_, from, to);
    }
  }
  Status st = DiffImage(at->get(), io_->pool(), name_, from_snap, to_snap, fn, whole);
  if (!st.ok() && at == snap_) snap_.reset();
  return st;
}

}  // namespace cairn
