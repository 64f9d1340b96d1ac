// Image contexts (opened one at a time per process), and image metadata
// read through librbd handles or straight from cls_rbd over RADOS.

#include <endian.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <condition_variable>
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

class ImageContextGate {
 public:
  static ImageContextGate& Get() {
    static ImageContextGate gate;
    return gate;
  }
  void Enter(bool closing) {
    std::unique_lock lock(mu_);
    if (closing) {
      ++closes_waiting_;
      closes_.wait(lock, [&] { return !busy_; });
      --closes_waiting_;
    } else {
      opens_.wait(lock, [&] { return !busy_ && closes_waiting_ == 0; });
    }
    busy_ = true;
  }
  // One waiter is woken, a close if any waits (a thousand threads may).
  void Leave() {
    std::lock_guard lock(mu_);
    busy_ = false;
    if (closes_waiting_ > 0) {
      closes_.notify_one();
    } else {
      opens_.notify_one();
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable closes_;
  std::condition_variable opens_;
  bool busy_ = false;
  int closes_waiting_ = 0;
};

ImageContextHold::ImageContextHold(bool closing) { ImageContextGate::Get().Enter(closing); }
ImageContextHold::~ImageContextHold() { ImageContextGate::Get().Leave(); }

ImageContextHold ImageContextLock(bool closing) { return ImageContextHold(closing); }

std::string ImageSpec(const std::string& pool, const std::string& image, const std::string& snap) {
  return snap.empty() ? fmt::format("{}/{}", pool, image)
                      : fmt::format("{}/{}@{}", pool, image, snap);
}

const char* SnapOrNull(const std::string& snap) { return snap.empty() ? nullptr : snap.c_str(); }

// Opens pool/image at `snap` (the head if empty).
StatusOr<std::shared_ptr<Image>> OpenImage(const RadosIoCtx& io, const std::string& image,
                                           const std::string& snap, bool read_only) {
  if (IsGroupSnapName(snap)) {
    ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(io, image, "", true));
    const std::string spec = ImageSpec(io.pool(), image, snap);
    ASSIGN_OR_RETURN(const uint64_t id, SnapIdOf(h->get(), snap, spec));
    const int rc = rbd_snap_set_by_id(h->get(), id);
    if (rc == -ENOENT) return NotFound(fmt::format("snapshot {} does not exist", spec));
    if (rc < 0) return ErrnoStatus(rc, "opening " + spec);
    return h;
  }
  rbd_image_t h = nullptr;
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return read_only ? rbd_open_read_only(io.get(), image.c_str(), &h, SnapOrNull(snap))
                     : rbd_open(io.get(), image.c_str(), &h, SnapOrNull(snap));
  }();
  if (rc == -ENOENT) {
    return NotFound(snap.empty()
                        ? fmt::format("image {} does not exist", ImageSpec(io.pool(), image))
                        : fmt::format("image or snapshot {} does not exist",
                                      ImageSpec(io.pool(), image, snap)));
  }
  if (rc < 0) {
    return ErrnoStatus(rc, fmt::format("opening {}{}", ImageSpec(io.pool(), image, snap),
                                       read_only ? " read-only" : ""));
  }
  return std::make_shared<Image>(h);
}

// The image's id: unlike its name, never given to another image.
StatusOr<std::string> ImageId(rbd_image_t h, const std::string& spec) {
  std::array<char, 128> buf{};
  if (int rc = rbd_get_id(h, buf.data(), buf.size()); rc < 0) {
    return ErrnoStatus(rc, "getting the id of " + spec);
  }
  return std::string(buf.data());
}

StatusOr<uint64_t> ImageSize(rbd_image_t h, const std::string& spec) {
  uint64_t size = 0;
  if (int rc = rbd_get_size(h, &size); rc < 0)
    return ErrnoStatus(rc, "getting the size of " + spec);
  return size;
}

StatusOr<std::vector<RawSnap>> ListAllSnapsOf(rbd_image_t h, const std::string& spec) {
  int max = 16;
  std::vector<rbd_snap_info_t> raw;
  int n = 0;
  while (true) {
    raw.assign(max, rbd_snap_info_t{});
    n = rbd_snap_list(h, raw.data(), &max);  // needs room for a terminator
    if (n != -ERANGE) break;
  }
  if (n < 0) return ErrnoStatus(n, "listing the snapshots of " + spec);
  std::vector<RawSnap> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back({raw[i].id, raw[i].size, raw[i].name});
  rbd_snap_list_end(raw.data());
  std::sort(out.begin(), out.end(), [](const RawSnap& a, const RawSnap& b) { return a.id < b.id; });
  return out;
}

static StatusOr<rbd_snap_namespace_type_t> NamespaceOf(rbd_image_t h, const RawSnap& s,
                                                       const std::string& spec) {
  rbd_snap_namespace_type_t type{};
  if (int rc = rbd_snap_get_namespace_type(h, s.id, &type); rc < 0) {
    return ErrnoStatus(rc, fmt::format("getting the namespace of snapshot {} of {}", s.id, spec));
  }
  return type;
}

// Pacific's rbd_snap_list lists the snapshots of every namespace.
StatusOr<std::vector<SnapInfo>> ListSnapsOf(rbd_image_t h, const std::string& spec) {
  ASSIGN_OR_RETURN(std::vector<RawSnap> all, ListAllSnapsOf(h, spec));
  std::vector<SnapInfo> out;
  for (const auto& s : all) {
    ASSIGN_OR_RETURN(const rbd_snap_namespace_type_t type, NamespaceOf(h, s, spec));
    if (type != RBD_SNAP_NAMESPACE_TYPE_USER) continue;
    timespec ts{};
    if (int rc = rbd_snap_get_timestamp(h, s.id, &ts); rc < 0) {
      return ErrnoStatus(rc, fmt::format("getting the time of snapshot {}@{}", spec, s.name));
    }
    out.push_back(
        {s.name, s.id, s.size, static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec});
  }
  return out;
}

StatusOr<uint64_t> SnapIdOf(rbd_image_t h, const std::string& snap, const std::string& spec) {
  const auto missing = [&] {
    return NotFound(fmt::format("snapshot {}@{} does not exist", spec, snap));
  };
  if (!IsGroupSnapName(snap)) {
    uint64_t id = 0;
    const int rc = rbd_snap_get_id(h, snap.c_str(), &id);
    if (rc == -ENOENT) return missing();
    if (rc < 0) return ErrnoStatus(rc, fmt::format("getting the id of snapshot {}@{}", spec, snap));
    return id;
  }
  ASSIGN_OR_RETURN(std::vector<RawSnap> all, ListAllSnapsOf(h, spec));
  // Newest first: the share asked for is most often the latest.
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    ASSIGN_OR_RETURN(const rbd_snap_namespace_type_t type, NamespaceOf(h, *it, spec));
    if (type != RBD_SNAP_NAMESPACE_TYPE_GROUP) continue;
    rbd_snap_group_namespace_t ns{};
    const int rc = rbd_snap_get_group_namespace(h, it->id, &ns, sizeof ns);
    if (rc == -ENOENT) continue;  // its group snapshot is being removed
    if (rc < 0) {
      return ErrnoStatus(rc, fmt::format("getting the group snapshot of {}@{}", spec, it->name));
    }
    const bool found = ns.group_snap_name != nullptr && GroupSnapName(ns.group_snap_name) == snap;
    rbd_snap_group_namespace_cleanup(&ns, sizeof ns);
    if (found) return it->id;
  }
  return missing();
}

StatusOr<bool> IsProtected(rbd_image_t h, const std::string& spec, const std::string& snap) {
  int prot = 0;
  if (int rc = rbd_snap_is_protected(h, snap.c_str(), &prot); rc < 0) {
    return ErrnoStatus(rc, fmt::format("checking the protection of {}@{}", spec, snap));
  }
  return prot != 0;
}

// How many images are cloned from image@snap (trashed ones included).
StatusOr<size_t> CountClones(const RadosIoCtx& io, const std::string& image,
                             const std::string& snap) {
  ASSIGN_OR_RETURN(std::shared_ptr<Image> at_snap, OpenImage(io, image, snap, true));
  size_t max = 0;
  int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_list_children3(at_snap->get(), nullptr, &max);
  }();
  if (rc == -ERANGE) return max;
  if (rc < 0) {
    return ErrnoStatus(rc, "listing the clones of " + ImageSpec(io.pool(), image, snap));
  }
  return max;
}

Status ClonesDependOn(const std::string& spec, size_t clones) {
  return FailedPrecondition(
      fmt::format("{} clone(s) depend on snapshot {}; remove or flatten them first", clones, spec));
}

// The header's snapshot context (cls_rbd get_snapcontext): the newest
// snapshot id and every snapshot id, newest first.
// The answer of cls_rbd get_snapcontext: the seq and the snapshot ids.
StatusOr<std::pair<uint64_t, std::vector<uint64_t>>> DecodeSnapContext(std::string_view out,
                                                                       const std::string& spec) {
  // Encoded as u64 seq, u32 count, count x u64 (little-endian).
  const auto u64 = [&](size_t at) {
    uint64_t v = 0;
    std::memcpy(&v, out.data() + at, 8);
    return le64toh(v);
  };
  const size_t len = out.size();
  uint32_t count = 0;
  if (len >= 12) {
    std::memcpy(&count, out.data() + 8, 4);
    count = le32toh(count);
  }
  if (len < 12 || len != 12 + 8 * static_cast<size_t>(count)) {
    return DataLoss(
        fmt::format("the snapshot context of {} does not decode ({} bytes)", spec, len));
  }
  std::vector<uint64_t> snaps;
  for (uint32_t i = 0; i < count; ++i) snaps.push_back(u64(12 + 8 * i));
  return std::make_pair(u64(0), std::move(snaps));
}

// --- cls_rbd over RADOS -------------------------------------------------------
// Reads of an image's metadata that need no image context: opening one
// copies the client's whole configuration and, in this process, waits for
// every other open and close (ImageContextLock).

constexpr uint32_t kUserSnapshotNamespace = 0;   // SNAPSHOT_NAMESPACE_TYPE_USER
constexpr uint32_t kGroupSnapshotNamespace = 1;  // SNAPSHOT_NAMESPACE_TYPE_GROUP

// A u64 answer of cls_rbd (flags, features), little-endian.
StatusOr<uint64_t> DecodeFlags(std::string_view out, const std::string& header) {
  uint64_t v = 0;
  if (out.size() != sizeof v) return DataLoss("the flags of " + header + " do not decode");
  std::memcpy(&v, out.data(), sizeof v);
  return le64toh(v);
}

// Calls of cls_rbd methods on an image's header, in one RADOS op. With
// `missing`, a call that finds no such thing (ENOENT: a snapshot removed)
// is marked there instead of failing them all.
Status CallHeader(rados_ioctx_t io, const std::string& header, std::span<HeaderCall> calls,
                  const std::string& spec, std::vector<int>* missing) {
  struct Out {
    char* buf = nullptr;
    size_t len = 0;
    int rc = 0;
    ~Out() {
      if (buf != nullptr) rados_buffer_free(buf);
    }
  };
  std::vector<Out> outs(calls.size());
  std::vector<uint64_t> ins(calls.size());
  rados_read_op_t op = rados_create_read_op();
  for (size_t i = 0; i < calls.size(); ++i) {
    const bool takes_snap = std::string_view(calls[i].method) != "get_snapcontext";
    ins[i] = htole64(calls[i].snap_id);
    rados_read_op_exec(op, "rbd", calls[i].method, reinterpret_cast<const char*>(&ins[i]),
                       takes_snap ? sizeof ins[i] : 0, &outs[i].buf, &outs[i].len, &outs[i].rc);
    if (missing != nullptr) rados_read_op_set_flags(op, LIBRADOS_OP_FLAG_FAILOK);
  }
  const int rc = rados_read_op_operate(op, io, header.c_str(), 0);
  rados_release_read_op(op);
  if (rc < 0) return ErrnoStatus(rc, "reading the header of " + spec);
  if (missing != nullptr) missing->assign(calls.size(), 0);
  for (size_t i = 0; i < calls.size(); ++i) {
    if (missing != nullptr && outs[i].rc == -ENOENT) {
      (*missing)[i] = 1;
      continue;
    }
    if (outs[i].rc < 0) {
      return ErrnoStatus(outs[i].rc, fmt::format("{} on the header of {}", calls[i].method, spec));
    }
    calls[i].out.assign(outs[i].buf, outs[i].len);
  }
  return OkStatus();
}

// The image's snapshot context (seq, snapshot ids) from its header.
StatusOr<std::pair<uint64_t, std::vector<uint64_t>>> ReadSnapContext(rados_ioctx_t io,
                                                                     const std::string& header,
                                                                     const std::string& spec) {
  std::array<HeaderCall, 1> context{{{"get_snapcontext", 0, {}}}};
  RETURN_IF_ERROR(CallHeader(io, header, context, spec));
  return DecodeSnapContext(context[0].out, spec);
}

bool ClsReader::U32(uint32_t* v) {
  if (!Take(v, 4)) return false;
  *v = le32toh(*v);
  return true;
}

bool ClsReader::U64(uint64_t* v) {
  if (!Take(v, 8)) return false;
  *v = le64toh(*v);
  return true;
}

bool ClsReader::String(std::string* v) {
  uint32_t n = 0;
  if (!U32(&n) || in_.size() - at_ < n) return false;
  v->assign(in_.substr(at_, n));
  at_ += n;
  return true;
}

bool ClsReader::Struct(size_t* end) {
  uint8_t v = 0, compat = 0;
  uint32_t len = 0;
  if (!U8(&v) || !U8(&compat) || !U32(&len) || in_.size() - at_ < len) return false;
  *end = at_ + len;
  return true;
}

bool ClsReader::Take(void* v, size_t n) {
  if (in_.size() - at_ < n) return false;
  std::memcpy(v, in_.data() + at_, n);
  at_ += n;
  return true;
}

// The id of the image named `name` (cls_rbd get_id on its rbd_id object).
StatusOr<std::string> ReadImageId(rados_ioctx_t io, const std::string& name,
                                  const std::string& spec) {
  const std::string oid = "rbd_id." + name;
  char* buf = nullptr;
  size_t len = 0;
  int prval = 0;
  rados_read_op_t op = rados_create_read_op();
  rados_read_op_exec(op, "rbd", "get_id", nullptr, 0, &buf, &len, &prval);
  const int rc = rados_read_op_operate(op, io, oid.c_str(), 0);
  rados_release_read_op(op);
  std::string out = buf != nullptr ? std::string(buf, len) : std::string();
  if (buf != nullptr) rados_buffer_free(buf);
  if (rc == -ENOENT) return NotFound(fmt::format("image {} does not exist", spec));
  if (rc < 0) return ErrnoStatus(rc, "getting the id of " + spec);
  std::string id;
  ClsReader r(out);
  if (!r.String(&id) || id.empty()) return DataLoss("the id of " + spec + " does not decode");
  return id;
}

// One snapshot as cls_rbd snapshot_get answers it (SnapshotInfo v1: id,
// namespace, name, size, timestamp, child count) and, for a share of a group
// snapshot, the group snapshot it belongs to.
struct HeaderSnap {
  SnapInfo info;  // named as librbd names it
  uint32_t ns_type = kUserSnapshotNamespace;
  GroupShareRef group;  // kGroupSnapshotNamespace only
};

static StatusOr<HeaderSnap> DecodeSnapshotInfo(std::string_view in, const std::string& spec) {
  const auto bad = [&] { return DataLoss("a snapshot of " + spec + " does not decode"); };
  ClsReader r(in);
  size_t end = 0, ns_end = 0;
  HeaderSnap h;
  SnapInfo& s = h.info;
  uint32_t sec = 0, nsec = 0;
  if (!r.Struct(&end) || !r.U64(&s.id) || !r.Struct(&ns_end) || !r.U32(&h.ns_type)) return bad();
  if (h.ns_type == kGroupSnapshotNamespace) {
    uint64_t pool = 0;
    if (!r.U64(&pool) || !r.String(&h.group.group_id) || !r.String(&h.group.group_snap_id)) {
      return bad();
    }
    h.group.group_pool = static_cast<int64_t>(pool);
  }
  r.Seek(ns_end);
  if (!r.String(&s.name) || !r.U64(&s.size) || !r.U32(&sec) || !r.U32(&nsec)) return bad();
  s.time_ns = static_cast<int64_t>(sec) * 1'000'000'000 + nsec;
  return h;
}

// The snapshots of `snaps` listed by ListSnapsOfHeader: user snapshots, and
// the shares of group snapshots NameGroupShares names.
static StatusOr<std::vector<SnapInfo>> Listed(rados_ioctx_t io, std::vector<HeaderSnap> snaps,
                                              const std::string& spec) {
  std::vector<GroupShareRef> refs;
  for (const auto& h : snaps) {
    if (h.ns_type == kGroupSnapshotNamespace) refs.push_back(h.group);
  }
  std::vector<std::optional<std::string>> names;
  if (!refs.empty()) {
    ASSIGN_OR_RETURN(names, NameGroupShares(io, refs, spec));
  }
  std::vector<SnapInfo> out;
  size_t share = 0;
  for (auto& h : snaps) {
    if (h.ns_type == kGroupSnapshotNamespace) {
      const std::optional<std::string>& name = names[share++];
      if (!name) continue;
      h.info.name = *name;
    } else if (h.ns_type != kUserSnapshotNamespace) {
      continue;  // trash, mirror: librbd's listing leaves them out too
    }
    out.push_back(std::move(h.info));
  }
  std::sort(out.begin(), out.end(),
            [](const SnapInfo& a, const SnapInfo& b) { return a.id < b.id; });
  return out;
}

// The image's snapshots, in id order, from its header: the snapshot
// context, then every snapshot in one op (one removed in between is left
// out, as it would be a moment later).
StatusOr<std::vector<SnapInfo>> ListSnapsOfHeader(rados_ioctx_t io, const std::string& id,
                                                  const std::string& spec) {
  const std::string header = "rbd_header." + id;
  auto snapc = ReadSnapContext(io, header, spec);
  if (!snapc.ok()) {
    if (snapc.status().code() == Code::kNotFound) {
      return NotFound(fmt::format("image {} does not exist", spec));
    }
    return snapc.status();
  }
  if (snapc->second.empty()) return std::vector<SnapInfo>();
  std::vector<HeaderCall> calls;
  for (uint64_t snap_id : snapc->second) calls.push_back({"snapshot_get", snap_id, {}});
  std::vector<int> missing;
  RETURN_IF_ERROR(CallHeader(io, header, calls, spec, &missing));
  std::vector<HeaderSnap> snaps;
  for (size_t i = 0; i < calls.size(); ++i) {
    if (missing[i]) continue;
    ASSIGN_OR_RETURN(HeaderSnap s, DecodeSnapshotInfo(calls[i].out, spec));
    snaps.push_back(std::move(s));
  }
  return Listed(io, std::move(snaps), spec);
}

// Writes several pieces of one RADOS object of an image as one op.
//
// Why: the standby OSD's cost is per op (about 340 us of CPU per 64 KiB
// write on the bench's machine), and librbd sends one op per write; an
// incremental epoch of 64 KiB records writes several records per 4 MiB
// object. rbd-mirror's deep copy likewise writes each object in one op.
//
// How it stays correct beside librbd: the first write to an object within
// an AsyncIo goes through librbd, and the object's other pieces are sent
// only once it has completed. That first write makes librbd do everything
// an object needs before data lands in it: mark it in the object map (so
// fast-diff and reads of the image see it), copy it up from a parent (a
// clone), take the exclusive lock, and make RADOS clone it for the newest
// snapshot. The later pieces then only overwrite bytes of an object that
// exists at the head; they carry the image's snapshot context all the same
// (read from its header when the AsyncIo opens; the sink takes snapshots
// only between epochs). Pieces are sent through librbd instead if this
// client no longer owns the exclusive lock when they go.
//
// Not used (every write goes through librbd) for images whose writes need
// more than an object write: the journaling feature (rbd-mirror journal
// mode), fancy striping, format 1.

}  // namespace rbd_internal

}  // namespace cairn
