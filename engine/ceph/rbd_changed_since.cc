// The cheap "changed at all?" check on the head's object map
// (RbdVolume::ChangedSince): one RADOS op between full checks, no image
// opened.
#include <endian.h>
#include <fmt/format.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "engine/ceph/rbd_internal.h"

namespace cairn {

namespace rbd_internal {

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

// Encoded object map `m` with every existing object marked clean, as the
// head's map reads right after a snapshot, up to the end of the states
// (the footer holds checksums of what was written: only the states are
// compared). nullopt if `m` does not decode.
static std::optional<std::string> AllClean(std::string m) {
  const auto layout = LayoutOf(m);
  if (!layout) return std::nullopt;
  for (size_t i = 0; i < layout->data_len; ++i) {
    const auto b = static_cast<uint8_t>(m[layout->data_at + i]);
    uint8_t out = 0;
    for (int shift = 0; shift < 8; shift += 2) {
      const uint8_t state = (b >> shift) & 3;
      out |= (state == kObjectNonexistent ? kObjectNonexistent : kObjectExistsClean) << shift;
    }
    m[layout->data_at + i] = static_cast<char>(out);
  }
  m.resize(layout->data_at + layout->data_len);
  return m;
}

}  // namespace rbd_internal

using namespace rbd_internal;  // the adapters' shared helpers (rbd_internal.h)

StatusOr<RbdVolume::UnchangedMap> RbdVolume::ReadUnchangedMap(const SnapInfo& snap) {
  // Taking a snapshot copies the head's map to the snapshot's and marks
  // every existing object of the head clean; a write then marks its
  // object dirty (exists), a discard or shrink removes it.
  // No image is opened: an open costs a copy of the client's whole
  // configuration.
  const std::string header = "rbd_header." + id_;
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
  if ((features & RBD_FEATURE_FAST_DIFF) == 0 ||
      (snap_flags & (kFlagObjectMapInvalid | kFlagFastDiffInvalid)) != 0) {
    return u;
  }
  const std::string snap_map = fmt::format("rbd_object_map.{}.{:016x}", id_, snap.id);
  uint64_t len = 0;
  time_t mtime = 0;
  if (int rc = rados_stat(io_->get(), snap_map.c_str(), &len, &mtime); rc < 0) {
    return ErrnoStatus(rc, "reading the object map of " + Spec(snap.name));
  }
  ASSIGN_OR_RETURN(auto whole, ReadWholeVersioned(io_->get(), snap_map, len));
  if (auto clean = AllClean(std::move(whole.first))) {
    u.expected = std::move(*clean);
    u.usable = true;
  }
  return u;
}

StatusOr<bool> RbdVolume::ChangedSinceFullCheck(const SnapInfo& snap, UnchangedMap& u) {
  // The map, then the header: a snapshot taken (by anyone) before the map
  // was read marks every object of the head clean again, whatever was
  // written before it, and the header read after tells of it.
  const std::string header = "rbd_header." + id_;
  const std::string head_map = "rbd_object_map." + id_;
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

StatusOr<bool> RbdVolume::ChangedSince(const SnapInfo& snap) {
  if (!unchanged_ || unchanged_->snap_id != snap.id) {
    // Once per snapshot: what the head's map reads while nothing changed.
    ASSIGN_OR_RETURN(unchanged_, ReadUnchangedMap(snap));
  }
  if (!unchanged_->usable) return true;
  UnchangedMap& u = *unchanged_;
  // Between full checks, one RADOS op: the head's map object is still the
  // version a full check found unchanged. A write to a clean object, a
  // discard, a resize, a snapshot over dirty objects: each rewrites it. A
  // full check every kFullCheckEvery quick ones reads the header's flags
  // too (a client that failed to update the map marks it invalid there).
  if (u.map_version != 0 && u.quick_checks < kFullCheckEvery) {
    const std::string head_map = "rbd_object_map." + id_;
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
  return ChangedSinceFullCheck(snap, u);
}

}  // namespace cairn
