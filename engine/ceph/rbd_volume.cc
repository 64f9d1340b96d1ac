#include "engine/ceph/rbd_volume.h"

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
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <endian.h>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "engine/ceph/handoff_queue.h"
#include "engine/ceph/rados_kv_store.h"

namespace cairn {
namespace rbd_internal {

// librbd 16.2 does not survive images being opened and closed in several
// threads of one process at once: six threads opening and closing
// snapshots of their own images crash it within a minute, in two runs of
// three (std::system_error "Invalid argument", or SIGSEGV in the copy of
// the configuration every image context takes), and not once in five
// minutes with those calls serialised. So every call that makes or drops an
// image context (open, close, create, clone, rename, remove, listing clones)
// holds this lock, in every thread of cairnd and of the tools.
//
// A close goes before every open waiting: an image context (a copy of the
// client's whole configuration, caches) stays in memory until its close
// gets the lock, and with a thousand volumes syncing, hundreds of them
// queued behind new opens made the daemon's peak RSS.
class ImageContextHold {
 public:
  explicit ImageContextHold(bool closing);
  ~ImageContextHold();
  ImageContextHold(const ImageContextHold&) = delete;
  ImageContextHold& operator=(const ImageContextHold&) = delete;
};

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

ImageContextHold ImageContextLock(bool closing = false) { return ImageContextHold(closing); }

// An open librbd image handle, closed when the last user lets go.
class Image {
 public:
  explicit Image(rbd_image_t h) : h_(h) {}
  ~Image() {
    const auto lock = ImageContextLock(/*closing=*/true);
    rbd_close(h_);
  }
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;
  rbd_image_t get() const { return h_; }

 private:
  rbd_image_t h_;
};

}  // namespace rbd_internal

namespace {

using rbd_internal::Image;
// A watch on an image header: the client's global id and the watch's cookie.
using WatcherId = std::pair<uint64_t, uint64_t>;

// Level-1 diff windows span this many objects (a bounded list of changed
// objects per window; one object-map load per window).
constexpr uint64_t kCoarseWindowObjects = 64 * 1024;
// Exact diffs run over at most this many bytes per call (bounded extent
// lists; no long stall between two calls of the caller's fn).
constexpr uint64_t kFineWindow = 64ull << 20;
// After a snapshot, clients that began watching the image's header since
// just before it are told of it again, round after round while new ones
// appear (at most kSettleRounds notifications, each waiting up to
// kNotifyTimeout); the snapshot is then listed no sooner than kSettleFloor
// after it was taken and kSettleDrain after the last notification.
constexpr std::chrono::milliseconds kSettleFloor{50};
constexpr std::chrono::milliseconds kSettleDrain{20};
constexpr int kSettleRounds = 8;
constexpr std::chrono::milliseconds kNotifyTimeout{5000};
// Copy: pieces in flight and their size.
constexpr size_t kCopySlots = 8;
constexpr uint64_t kCopyPiece = 4ull << 20;

std::string ImageSpec(const std::string& pool, const std::string& image,
                      const std::string& snap = "") {
  return snap.empty() ? fmt::format("{}/{}", pool, image)
                      : fmt::format("{}/{}@{}", pool, image, snap);
}

const char* SnapOrNull(const std::string& snap) { return snap.empty() ? nullptr : snap.c_str(); }

// Opens pool/image at `snap` (the head if empty).
StatusOr<std::shared_ptr<Image>> OpenImage(const RadosIoCtx& io, const std::string& image,
                                           const std::string& snap, bool read_only) {
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

StatusOr<std::vector<SnapInfo>> ListSnapsOf(rbd_image_t h, const std::string& spec) {
  int max = 16;
  std::vector<rbd_snap_info_t> raw;
  int n = 0;
  while (true) {
    raw.assign(max, rbd_snap_info_t{});
    n = rbd_snap_list(h, raw.data(), &max);  // needs room for a terminator
    if (n != -ERANGE) break;
  }
  if (n < 0) return ErrnoStatus(n, "listing the snapshots of " + spec);
  std::vector<SnapInfo> out;
  out.reserve(n);
  Status st;
  for (int i = 0; i < n && st.ok(); ++i) {
    timespec ts{};
    if (int rc = rbd_snap_get_timestamp(h, raw[i].id, &ts); rc < 0) {
      st = ErrnoStatus(rc, fmt::format("getting the time of snapshot {}@{}", spec, raw[i].name));
    }
    out.push_back({raw[i].name, raw[i].id, raw[i].size,
                   static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec});
  }
  rbd_snap_list_end(raw.data());
  if (!st.ok()) return st;
  std::sort(out.begin(), out.end(),
            [](const SnapInfo& a, const SnapInfo& b) { return a.id < b.id; });
  return out;
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

// --- asynchronous I/O --------------------------------------------------------

// kObjectWrite: the pieces of one RADOS object, written in one op beside
// librbd (see ObjectWriter).
enum class OpKind { kRead, kWrite, kZero, kObjectWrite };

struct PendingOp;
using CompletionQueue = HandoffQueue<PendingOp*>;

// The writes of one RADOS object of the image within one AsyncIo: the first
// goes through librbd, the rest wait in `pieces` until it has completed
// (ObjectWriter says why).
struct Batch {
  struct Piece {
    uint64_t tag = 0;
    uint64_t offset = 0;  // in the image
    std::span<const char> data;
  };
  uint64_t object = 0;
  std::vector<Piece> pieces;
  bool closed = false;  // no more pieces will join
  bool primed = false;  // the first write has completed, with prime_status
  Status prime_status;
};

// One operation handed to librbd or librados; owned by it from start to
// callback, then by the queue, then by whoever pops it.
struct PendingOp {
  CompletionQueue* queue = nullptr;
  rbd_completion_t completion = nullptr;          // librbd ops
  rados_completion_t rados_completion = nullptr;  // kObjectWrite
  rados_write_op_t write_op = nullptr;            // kObjectWrite
  uint64_t tag = 0;
  std::vector<uint64_t> tags;  // kObjectWrite: one per piece
  OpKind kind = OpKind::kRead;
  uint64_t offset = 0;
  uint64_t length = 0;
  Batch* primes = nullptr;  // a kWrite that is the first write of this batch
};

// Run on a librbd or librados thread: only hand the operation over.
void OnRbdComplete(rbd_completion_t, void* arg) {
  auto* op = static_cast<PendingOp*>(arg);
  op->queue->Push(op);
}
void OnRadosComplete(rados_completion_t, void* arg) {
  auto* op = static_cast<PendingOp*>(arg);
  op->queue->Push(op);
}

std::string Describe(OpKind kind, const std::string& spec, uint64_t offset, uint64_t length) {
  const char* verb = kind == OpKind::kRead    ? "reading"
                     : kind == OpKind::kZero  ? "zeroing"
                                              : "writing";
  return fmt::format("{} {} at {}~{}", verb, spec, offset, length);
}

// Starts one librbd operation whose completion goes to `queue`. `buf` is
// read into or written from; it must live until the completion is popped.
Status StartOp(rbd_image_t image, CompletionQueue& queue, OpKind kind, uint64_t tag,
               uint64_t offset, uint64_t length, char* buf, const std::string& spec,
               Batch* primes = nullptr) {
  assert(kind != OpKind::kObjectWrite);
  auto op = std::make_unique<PendingOp>();
  op->queue = &queue;
  op->tag = tag;
  op->kind = kind;
  op->offset = offset;
  op->length = length;
  op->primes = primes;
  int rc = rbd_aio_create_completion(op.get(), OnRbdComplete, &op->completion);
  if (rc < 0) return ErrnoStatus(rc, Describe(kind, spec, offset, length));
  switch (kind) {
    case OpKind::kRead:
      rc = rbd_aio_read(image, offset, length, buf, op->completion);
      break;
    case OpKind::kWrite:
      rc = rbd_aio_write(image, offset, length, buf, op->completion);
      break;
    case OpKind::kZero:
      rc = rbd_aio_write_zeroes(image, offset, length, op->completion, 0, 0);
      break;
    case OpKind::kObjectWrite:
      break;
  }
  if (rc < 0) {
    rbd_aio_release(op->completion);
    return ErrnoStatus(rc, Describe(kind, spec, offset, length));
  }
  op.release();  // librbd's until the callback
  return OkStatus();
}

// Takes a popped librbd operation apart: its tag and its outcome.
AsyncIo::Completion FinishOp(PendingOp* op, const std::string& spec) {
  std::unique_ptr<PendingOp> owned(op);
  const ssize_t rc = rbd_aio_get_return_value(op->completion);
  rbd_aio_release(op->completion);
  AsyncIo::Completion c{op->tag, OkStatus()};
  const std::string what = Describe(op->kind, spec, op->offset, op->length);
  if (rc < 0) {
    c.status = ErrnoStatus(static_cast<int>(rc), what);
  } else if (op->kind == OpKind::kRead && static_cast<uint64_t>(rc) != op->length) {
    // librbd clips I/O at the end of the image: it shrank under us.
    c.status = Aborted(fmt::format("{}: short read of {} bytes (did the image shrink?)", what, rc));
  } else if (op->kind != OpKind::kRead && rc != 0 && static_cast<uint64_t>(rc) != op->length) {
    c.status =
        Aborted(fmt::format("{}: short write of {} bytes (did the image shrink?)", what, rc));
  }
  return c;
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
    return DataLoss(fmt::format("the snapshot context of {} does not decode ({} bytes)", spec,
                                len));
  }
  std::vector<uint64_t> snaps;
  for (uint32_t i = 0; i < count; ++i) snaps.push_back(u64(12 + 8 * i));
  return std::make_pair(u64(0), std::move(snaps));
}

// --- cls_rbd over RADOS -------------------------------------------------------
// Reads of an image's metadata that need no image context: opening one
// copies the client's whole configuration and, in this process, waits for
// every other open and close (ImageContextLock).

constexpr uint64_t kNoSnap = UINT64_MAX - 1;  // CEPH_NOSNAP: the head
constexpr uint32_t kUserSnapshotNamespace = 0;  // SNAPSHOT_NAMESPACE_TYPE_USER

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
struct HeaderCall {
  const char* method;
  uint64_t snap_id;  // the input: kNoSnap for the head
  std::string out;   // the answer
};
Status CallHeader(rados_ioctx_t io, const std::string& header, std::span<HeaderCall> calls,
                  const std::string& spec, std::vector<int>* missing = nullptr) {
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
StatusOr<std::pair<uint64_t, std::vector<uint64_t>>> ReadSnapContext(
    rados_ioctx_t io, const std::string& header, const std::string& spec) {
  std::array<HeaderCall, 1> context{{{"get_snapcontext", 0, {}}}};
  RETURN_IF_ERROR(CallHeader(io, header, context, spec));
  return DecodeSnapContext(context[0].out, spec);
}

// Reads little-endian values and Ceph-encoded strings out of a cls answer.
class ClsReader {
 public:
  explicit ClsReader(std::string_view in) : in_(in) {}
  bool U8(uint8_t* v) { return Take(v, 1); }
  bool U32(uint32_t* v) {
    if (!Take(v, 4)) return false;
    *v = le32toh(*v);
    return true;
  }
  bool U64(uint64_t* v) {
    if (!Take(v, 8)) return false;
    *v = le64toh(*v);
    return true;
  }
  bool String(std::string* v) {
    uint32_t n = 0;
    if (!U32(&n) || in_.size() - at_ < n) return false;
    v->assign(in_.substr(at_, n));
    at_ += n;
    return true;
  }
  // A versioned struct's header (ENCODE_START): version, compat, length.
  // Returns where the struct ends.
  bool Struct(size_t* end) {
    uint8_t v = 0, compat = 0;
    uint32_t len = 0;
    if (!U8(&v) || !U8(&compat) || !U32(&len) || in_.size() - at_ < len) return false;
    *end = at_ + len;
    return true;
  }
  void Seek(size_t at) { at_ = at; }

 private:
  bool Take(void* v, size_t n) {
    if (in_.size() - at_ < n) return false;
    std::memcpy(v, in_.data() + at_, n);
    at_ += n;
    return true;
  }
  std::string_view in_;
  size_t at_ = 0;
};

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
// namespace, name, size, timestamp, child count); nullopt for snapshots
// outside the user namespace (trash, group, mirror), which librbd's
// listing leaves out too.
StatusOr<std::optional<SnapInfo>> DecodeSnapshotInfo(std::string_view in,
                                                     const std::string& spec) {
  const auto bad = [&] { return DataLoss("a snapshot of " + spec + " does not decode"); };
  ClsReader r(in);
  size_t end = 0, ns_end = 0;
  SnapInfo s;
  uint32_t ns_type = 0, sec = 0, nsec = 0;
  if (!r.Struct(&end) || !r.U64(&s.id) || !r.Struct(&ns_end) || !r.U32(&ns_type)) return bad();
  r.Seek(ns_end);
  if (!r.String(&s.name) || !r.U64(&s.size) || !r.U32(&sec) || !r.U32(&nsec)) return bad();
  if (ns_type != kUserSnapshotNamespace) return std::optional<SnapInfo>();
  s.time_ns = static_cast<int64_t>(sec) * 1'000'000'000 + nsec;
  return std::optional<SnapInfo>(std::move(s));
}

// The image's user snapshots, in id order, from its header: the snapshot
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
  std::vector<SnapInfo> out;
  if (snapc->second.empty()) return out;
  std::vector<HeaderCall> calls;
  for (uint64_t snap_id : snapc->second) calls.push_back({"snapshot_get", snap_id, {}});
  std::vector<int> missing;
  RETURN_IF_ERROR(CallHeader(io, header, calls, spec, &missing));
  for (size_t i = 0; i < calls.size(); ++i) {
    if (missing[i]) continue;
    ASSIGN_OR_RETURN(auto s, DecodeSnapshotInfo(calls[i].out, spec));
    if (s) out.push_back(std::move(*s));
  }
  std::sort(out.begin(), out.end(),
            [](const SnapInfo& a, const SnapInfo& b) { return a.id < b.id; });
  return out;
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
class ObjectWriter {
 public:
  // Null if the image's layout rules the object writes out (see above).
  static StatusOr<std::unique_ptr<ObjectWriter>> Open(rbd_image_t h, const RadosIoCtx& meta,
                                                      const std::string& spec) {
    uint8_t old = 0;
    uint64_t features = 0, stripe_unit = 0, stripe_count = 0;
    rbd_image_info_t info{};
    if (int rc = rbd_get_old_format(h, &old); rc < 0) return ErrnoStatus(rc, "inspecting " + spec);
    if (int rc = rbd_get_features(h, &features); rc < 0) {
      return ErrnoStatus(rc, "getting the features of " + spec);
    }
    if (int rc = rbd_get_stripe_unit(h, &stripe_unit); rc < 0) {
      return ErrnoStatus(rc, "getting the stripe unit of " + spec);
    }
    if (int rc = rbd_get_stripe_count(h, &stripe_count); rc < 0) {
      return ErrnoStatus(rc, "getting the stripe count of " + spec);
    }
    if (int rc = rbd_stat(h, &info, sizeof info); rc < 0) return ErrnoStatus(rc, "stat " + spec);
    if (old != 0 || (features & RBD_FEATURE_JOURNALING) != 0 || stripe_count != 1 ||
        stripe_unit != info.obj_size || info.obj_size == 0) {
      spdlog::debug("{}: writes go through librbd one by one (format {}, features {:#x}, "
                    "stripe {}x{}, object size {})",
                    spec, old ? 1 : 2, features, stripe_count, stripe_unit, info.obj_size);
      return std::unique_ptr<ObjectWriter>();
    }
    std::array<char, 128> buf{};
    if (int rc = rbd_get_block_name_prefix(h, buf.data(), buf.size()); rc < 0) {
      return ErrnoStatus(rc, "getting the object name prefix of " + spec);
    }
    const std::string prefix = buf.data();
    ASSIGN_OR_RETURN(const std::string id, ImageId(h, spec));
    const std::string header = "rbd_header." + id;
    ASSIGN_OR_RETURN(auto snapc, ReadSnapContext(meta.get(), header, spec));

    const int64_t data_pool = rbd_get_data_pool_id(h);
    if (data_pool < 0) {
      return ErrnoStatus(static_cast<int>(data_pool), "getting the data pool of " + spec);
    }
    rados_ioctx_t io = nullptr;
    if (int rc = rados_ioctx_create2(rados_ioctx_get_cluster(meta.get()), data_pool, &io);
        rc < 0) {
      return ErrnoStatus(rc, fmt::format("opening the data pool (id {}) of {}", data_pool, spec));
    }
    auto w = std::unique_ptr<ObjectWriter>(new ObjectWriter(io, prefix, info.obj_size));
    buf.fill(0);
    if (int rc = rados_ioctx_get_namespace(meta.get(), buf.data(), buf.size()); rc < 0) {
      return ErrnoStatus(rc, "getting the namespace of " + spec);
    }
    rados_ioctx_set_namespace(io, buf.data());
    std::vector<rados_snap_t> snaps(snapc.second.begin(), snapc.second.end());
    if (int rc = rados_ioctx_selfmanaged_snap_set_write_ctx(
            io, snapc.first, snaps.data(), static_cast<int>(snaps.size()));
        rc < 0) {
      return ErrnoStatus(rc, "setting the snapshot context of " + spec);
    }
    return w;
  }

  ~ObjectWriter() { rados_ioctx_destroy(io_); }
  ObjectWriter(const ObjectWriter&) = delete;
  ObjectWriter& operator=(const ObjectWriter&) = delete;

  uint64_t object_size() const { return object_size_; }

  // Starts one op writing `pieces` (all in object `object`); its completion
  // goes to `queue`. The pieces' data must live until it is popped.
  Status Start(CompletionQueue& queue, uint64_t object, const std::vector<Batch::Piece>& pieces,
               const std::string& spec) {
    const std::string oid = fmt::format("{}.{:016x}", prefix_, object);
    auto op = std::make_unique<PendingOp>();
    op->queue = &queue;
    op->kind = OpKind::kObjectWrite;
    op->offset = object * object_size_;
    op->length = object_size_;
    op->write_op = rados_create_write_op();
    for (const Batch::Piece& p : pieces) {
      rados_write_op_write(op->write_op, p.data.data(), p.data.size(), p.offset - op->offset);
      op->tags.push_back(p.tag);
    }
    int rc = rados_aio_create_completion2(op.get(), OnRadosComplete, &op->rados_completion);
    if (rc == 0) {
      rc = rados_aio_write_op_operate(op->write_op, io_, op->rados_completion, oid.c_str(),
                                      nullptr, 0);
      if (rc < 0) rados_aio_release(op->rados_completion);
    }
    if (rc < 0) {
      rados_release_write_op(op->write_op);
      return ErrnoStatus(rc, fmt::format("writing {} pieces of {} to object {}", pieces.size(),
                                         spec, oid));
    }
    op.release();  // librados's until the callback
    return OkStatus();
  }

  // Takes a popped kObjectWrite apart: its outcome (for every tag).
  static Status Finish(PendingOp* op, const std::string& spec) {
    std::unique_ptr<PendingOp> owned(op);
    const int rc = rados_aio_get_return_value(op->rados_completion);
    rados_aio_release(op->rados_completion);
    rados_release_write_op(op->write_op);
    if (rc < 0) {
      return ErrnoStatus(rc, fmt::format("writing {} pieces of {} at {}~{} (one object)",
                                         op->tags.size(), spec, op->offset, op->length));
    }
    return OkStatus();
  }

 private:
  ObjectWriter(rados_ioctx_t io, std::string prefix, uint64_t object_size)
      : io_(io), prefix_(std::move(prefix)), object_size_(object_size) {}


  rados_ioctx_t io_;
  const std::string prefix_;
  const uint64_t object_size_;
};

class RbdAsyncIo final : public AsyncIo {
 public:
  // `objects`, if given, writes the pieces of one object after its first
  // (ObjectWriter).
  RbdAsyncIo(std::shared_ptr<Image> image, bool read_only, std::string spec,
             std::unique_ptr<ObjectWriter> objects = nullptr)
      : image_(std::move(image)),
        read_only_(read_only),
        spec_(std::move(spec)),
        objects_(std::move(objects)) {}

  // librbd may still write into the caller's buffers: wait for everything.
  ~RbdAsyncIo() override {
    while (in_flight_ > 0) (void)WaitOne();
  }

  Status StartRead(uint64_t tag, uint64_t offset, std::span<char> buf) override {
    return Start(OpKind::kRead, tag, offset, buf.size(), buf.data());
  }

  Status StartWrite(uint64_t tag, uint64_t offset, std::span<const char> buf) override {
    const uint64_t osize = objects_ ? objects_->object_size() : 0;
    if (!objects_ || read_only_ || buf.empty() ||
        offset / osize != (offset + buf.size() - 1) / osize) {
      // librbd only reads a write's buffer.
      return Start(OpKind::kWrite, tag, offset, buf.size(), const_cast<char*>(buf.data()));
    }
    RETURN_IF_ERROR(CheckRange(OpKind::kWrite, offset, buf.size()));
    ++stats_.writes;
    const uint64_t object = offset / osize;
    if (open_ != nullptr && open_->object != object) CloseOpen();
    if (open_ != nullptr) {
      open_->pieces.push_back({tag, offset, buf});
      ++in_flight_;
      return OkStatus();
    }
    Batch& b = batches_.emplace_back();
    b.object = object;
    Status st = StartOp(image_->get(), queue_, OpKind::kWrite, tag, offset, buf.size(),
                        const_cast<char*>(buf.data()), spec_, &b);
    if (!st.ok()) {
      batches_.pop_back();
      return st;
    }
    open_ = &b;
    ++stats_.ops;
    ++ops_in_flight_;
    ++in_flight_;
    return OkStatus();
  }

  Status StartZero(uint64_t tag, uint64_t offset, uint64_t length) override {
    return Start(OpKind::kZero, tag, offset, length, nullptr);
  }

  Completion WaitOne() override {
    assert(in_flight_ > 0 && "WaitOne with nothing in flight");
    while (ready_.empty()) {
      if (ops_in_flight_ == 0) {
        // Only pieces wait, in the open batch (whose first write is done):
        // send them now.
        assert(open_ != nullptr && open_->primed);
        CloseOpen();
        continue;
      }
      Handle(queue_.Pop());
    }
    Completion c = std::move(ready_.front());
    ready_.pop_front();
    --in_flight_;
    return c;
  }

  size_t InFlight() const override { return in_flight_; }

  WriteStats write_stats() const override { return stats_; }

  Status Drain() override {
    if (open_ != nullptr) CloseOpen();
    RETURN_IF_ERROR(WaitAll());
    if (!read_only_) {
      if (int rc = rbd_flush(image_->get()); rc < 0) return ErrnoStatus(rc, "flushing " + spec_);
      if (objects_) {
        spdlog::debug("{}: {} writes in {} ops", spec_, stats_.writes, stats_.ops);
      }
    }
    return OkStatus();
  }

 private:
  Status CheckRange(OpKind kind, uint64_t offset, uint64_t length) {
    if (kind != OpKind::kRead && read_only_) {
      return FailedPrecondition(Describe(kind, spec_, offset, length) +
                                ": a snapshot is read-only");
    }
    // librbd would clip an I/O at the end of the image; refuse it instead.
    ASSIGN_OR_RETURN(uint64_t size, ImageSize(image_->get(), spec_));
    if (offset > size || length > size - offset) {
      return InvalidArgument(fmt::format("{}: beyond the end of the image ({} bytes)",
                                         Describe(kind, spec_, offset, length), size));
    }
    return OkStatus();
  }

  Status Start(OpKind kind, uint64_t tag, uint64_t offset, uint64_t length, char* buf) {
    RETURN_IF_ERROR(CheckRange(kind, offset, length));
    RETURN_IF_ERROR(StartOp(image_->get(), queue_, kind, tag, offset, length, buf, spec_));
    if (kind == OpKind::kWrite) {
      ++stats_.writes;
      ++stats_.ops;
    }
    ++ops_in_flight_;
    ++in_flight_;
    return OkStatus();
  }

  // One completed op: its completions go to ready_.
  void Handle(PendingOp* op) {
    --ops_in_flight_;
    if (op->kind == OpKind::kObjectWrite) {
      const std::vector<uint64_t> tags = op->tags;
      const Status st = ObjectWriter::Finish(op, spec_);
      for (uint64_t tag : tags) ready_.push_back({tag, st});
      return;
    }
    Batch* b = op->primes;
    Completion c = FinishOp(op, spec_);
    if (b != nullptr) {
      b->primed = true;
      b->prime_status = c.status;
    }
    ready_.push_back(std::move(c));
    if (b != nullptr && b->closed) Send(b);
  }

  void CloseOpen() {
    Batch* b = open_;
    open_ = nullptr;
    b->closed = true;
    if (b->primed) Send(b);
  }

  // Sends the pieces of a closed batch whose first write has completed,
  // and forgets the batch.
  void Send(Batch* b) {
    assert(b->closed && b->primed);
    std::vector<Batch::Piece> pieces = std::move(b->pieces);
    const uint64_t object = b->object;
    const Status prime = b->prime_status;
    batches_.remove_if([b](const Batch& x) { return &x == b; });
    if (pieces.empty()) return;
    const auto fail_all = [&](const Status& st) {
      for (const Batch::Piece& p : pieces) {
        ready_.push_back({p.tag, st.Annotate(Describe(OpKind::kWrite, spec_, p.offset,
                                                      p.data.size()))});
      }
    };
    if (!prime.ok()) {
      fail_all(prime.Annotate("not sent: the first write to its object failed"));
      return;
    }
    if (!StillLockOwner()) {
      for (const Batch::Piece& p : pieces) {
        Status st = StartOp(image_->get(), queue_, OpKind::kWrite, p.tag, p.offset,
                            p.data.size(), const_cast<char*>(p.data.data()), spec_);
        if (!st.ok()) {
          ready_.push_back({p.tag, st});
          continue;
        }
        ++stats_.ops;
        ++ops_in_flight_;
      }
      return;
    }
    if (Status st = objects_->Start(queue_, object, pieces, spec_); !st.ok()) {
      fail_all(st);
      return;
    }
    ++stats_.ops;
    ++ops_in_flight_;
  }

  // Whether this client still owns the image's exclusive lock (true if the
  // image has none). librbd lets the lock go when another client asks.
  bool StillLockOwner() {
    uint64_t features = 0;
    if (rbd_get_features(image_->get(), &features) < 0) return false;
    if ((features & RBD_FEATURE_EXCLUSIVE_LOCK) == 0) return true;
    int owner = 0;
    return rbd_is_exclusive_lock_owner(image_->get(), &owner) == 0 && owner != 0;
  }

  std::shared_ptr<Image> image_;
  const bool read_only_;
  const std::string spec_;
  const std::unique_ptr<ObjectWriter> objects_;
  CompletionQueue queue_;
  size_t in_flight_ = 0;      // started, completion not yet returned
  size_t ops_in_flight_ = 0;  // librbd and librados ops not yet handled
  std::list<Batch> batches_;  // with pieces waiting or a first write in flight
  Batch* open_ = nullptr;     // the batch that further writes to its object join
  std::deque<Completion> ready_;
  WriteStats stats_;
};


// --- DiffExtents -------------------------------------------------------------


// What rbd_diff_iterate2 reports. Its callback may run on librados threads
// (one at a time, in order), so the list is guarded anyway.
struct DiffCollector {
  std::mutex mu;
  std::vector<Extent> extents;
};

int CollectExtent(uint64_t offset, size_t length, int exists, void* arg) {
  auto* c = static_cast<DiffCollector*>(arg);
  std::lock_guard lock(c->mu);
  c->extents.push_back({offset, length, exists ? RecordKind::kData : RecordKind::kZero});
  return 0;
}

// Sorts and unites extents of one kind, clipped to [lo, hi).
std::vector<Extent> Unite(const std::vector<Extent>& in, RecordKind kind, uint64_t lo,
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
std::vector<Extent> Normalize(const std::vector<Extent>& raw, uint64_t lo, uint64_t hi) {
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
std::vector<Extent> Ranges(const std::vector<Extent>& extents, uint64_t max_len) {
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

StatusOr<std::set<WatcherId>> Watchers(rbd_image_t h, const std::string& spec) {
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
StatusOr<std::set<WatcherId>> NotifyHeaderChanged(rados_ioctx_t io, const std::string& header_oid,
                                                  const std::string& spec) {
  char* reply = nullptr;
  size_t len = 0;
  const int rc = rados_notify2(io, header_oid.c_str(), nullptr, 0,
                               static_cast<uint64_t>(kNotifyTimeout.count()), &reply, &len);
  std::unique_ptr<char, void (*)(char*)> guard(reply, rados_buffer_free);
  // On a timeout the reply still lists those that did acknowledge.
  if (rc < 0 && rc != -ETIMEDOUT) return ErrnoStatus(rc, "notifying the watchers of " + spec);
  const auto bad = [&] {
    return Internal(fmt::format("notifying the watchers of {}: a malformed reply of {} bytes",
                                spec, len));
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
StatusOr<Settled> Settle(rbd_image_t h, const RadosIoCtx& io, const std::set<WatcherId>& before,
                         const std::string& spec) {
  char id[128] = {};
  if (int rc = rbd_get_id(h, id, sizeof id); rc < 0) {
    return ErrnoStatus(rc, "getting the id of " + spec);
  }
  const std::string header_oid = std::string("rbd_header.") + id;
  auto floor = std::chrono::steady_clock::now() + kSettleFloor;
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
      if (std::chrono::steady_clock::now() >= floor) break;
      std::this_thread::sleep_until(floor);
      continue;
    }
    if (rounds++ == kSettleRounds) {
      return Unavailable(fmt::format("{} client(s) that began watching {} did not acknowledge "
                                     "{} notifications",
                                     untold.size(), spec, kSettleRounds));
    }
    ASSIGN_OR_RETURN(std::set<WatcherId> acked, NotifyHeaderChanged(io.get(), header_oid, spec));
    for (const auto& w : untold) {
      if (acked.count(w)) told.insert(w);
    }
    floor = std::max(floor, std::chrono::steady_clock::now() + kSettleDrain);
  }
  if (!told.empty()) {
    spdlog::info("{}: {} client(s) opened the image as the snapshot was taken; told of it",
                 spec, told.size());
  }
  return Settled{told.size(), std::move(now)};
}

// The parts of `flagged` (whole objects the object maps call changed,
// ascending) inside `range` that the exact pass listed nothing for, object by
// object, with the kind the object maps gave them. `exact` is ascending.
std::vector<Extent> Unconfirmed(const std::vector<Extent>& flagged, const std::vector<Extent>& exact,
                                const Extent& range, uint64_t object_size) {
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

StatusOr<uint64_t> FlagsAt(rbd_image_t h, const std::string& spec) {
  uint64_t flags = 0;
  if (int rc = rbd_get_flags(h, &flags); rc < 0) {
    return ErrnoStatus(rc, "getting the flags of " + spec);
  }
  return flags;
}

StatusOr<bool> HasParent(rbd_image_t h, const std::string& spec) {
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
                 const std::function<Status(const Extent&)>& fn, bool whole_changed = false) {
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
    spdlog::warn("{}: clients opened the image around a snapshot since {}, and without "
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
    spdlog::info("{}: clients opened the image around a snapshot since {}; the {} bytes of "
                 "objects changed since are sent whole",
                 what, from_snap, flagged_bytes);
  }
  spdlog::debug("{}: the object maps flag {} bytes, the exact pass lists {} of them", what,
                flagged_bytes, exact_bytes);
  if (unconfirmed_bytes > 0) {
    // Seen too for the last object of an image cut short by a resize (sent
    // whole: right, if more than needed).
    spdlog::warn("{}: {} bytes of objects changed per the object maps but not per their clones "
                 "(as writes made with an out-of-date snapshot context leave them): sent whole",
                 what, unconfirmed_bytes);
  }
  return merger.Flush();
}

bool AllZero(const char* p, size_t n) {
  static const char kZeros[4096] = {};
  while (n > 0) {
    const size_t k = std::min(n, sizeof kZeros);
    if (std::memcmp(p, kZeros, k) != 0) return false;
    p += k;
    n -= k;
  }
  return true;
}

// Copies the allocated data of `src` (read-only, at its snapshot) into the
// fresh image `dst`, kCopySlots pieces in flight.
Status CopyData(rbd_image_t src, rbd_image_t dst, const std::string& pool,
                const std::string& src_image, const std::string& snap, const std::string& dst_spec,
                uint64_t size, const ProgressFn& progress) {
  const std::string src_spec = ImageSpec(pool, src_image, snap);
  CompletionQueue queue;
  std::array<std::vector<char>, kCopySlots> bufs;
  std::vector<size_t> free_slots;
  for (size_t i = kCopySlots; i > 0; --i) free_slots.push_back(i - 1);
  size_t in_flight = 0;
  Status first;
  std::set<uint64_t> outstanding;  // offsets of pieces not yet written
  uint64_t issued_to = 0;          // end of the last piece started
  uint64_t reported = 0;
  if (progress) progress(0, size);

  auto report = [&] {
    const uint64_t done = outstanding.empty() ? issued_to : *outstanding.begin();
    if (progress && done > reported) {
      reported = done;
      progress(done, size);
    }
  };
  // Pops one completion: a finished read starts its write; a finished write
  // frees its slot. The tag is the slot.
  auto handle_one = [&] {
    PendingOp* op = queue.Pop();
    --in_flight;
    const OpKind kind = op->kind;
    const uint64_t offset = op->offset;
    const uint64_t length = op->length;
    const AsyncIo::Completion c = FinishOp(op, kind == OpKind::kRead ? src_spec : dst_spec);
    const size_t slot = c.tag;
    auto release = [&] {
      free_slots.push_back(slot);
      outstanding.erase(offset);
      report();
    };
    if (!c.status.ok()) {
      if (first.ok()) first = c.status;
      release();
      return;
    }
    if (kind == OpKind::kRead && first.ok() && !AllZero(bufs[slot].data(), length)) {
      Status st =
          StartOp(dst, queue, OpKind::kWrite, slot, offset, length, bufs[slot].data(), dst_spec);
      if (st.ok()) {
        ++in_flight;
        return;
      }
      first = st;
    }
    release();  // written, or all zeros (the new image reads zeros already)
  };

  Status listed = DiffImage(src, pool, src_image, "", snap, [&](const Extent& e) -> Status {
    if (e.kind != RecordKind::kData) return OkStatus();
    const uint64_t end = e.offset + e.length;
    for (uint64_t pos = e.offset; pos < end;) {
      const uint64_t n = std::min(kCopyPiece - pos % kCopyPiece, end - pos);
      while (free_slots.empty()) handle_one();
      if (!first.ok()) return first;
      const size_t slot = free_slots.back();
      if (bufs[slot].empty()) bufs[slot].resize(kCopyPiece);
      RETURN_IF_ERROR(
          StartOp(src, queue, OpKind::kRead, slot, pos, n, bufs[slot].data(), src_spec));
      free_slots.pop_back();
      ++in_flight;
      outstanding.insert(pos);
      pos += n;
      issued_to = pos;
    }
    return OkStatus();
  });
  while (in_flight > 0) handle_one();  // never leave librbd with our buffers
  RETURN_IF_ERROR(listed);
  RETURN_IF_ERROR(first);
  if (int rc = rbd_flush(dst); rc < 0) return ErrnoStatus(rc, "flushing " + dst_spec);
  issued_to = size;
  report();
  return OkStatus();
}

}  // namespace

// --- What the settling saw ---------------------------------------------------

namespace rbd_internal {

// Per image, the snapshots (by id) after which clients may have written
// with a snapshot context that lacks them (see "Settling a snapshot"), and
// who watched the newest one when its settling ended. Only what this
// process saw: snapshots taken before it started count as settled. The
// watchers given leave out this process's own (its handles come and go
// with every epoch, and it knows of every snapshot it takes).
// Thread-safe.
class SettleBook {
 public:
  // Just before a snapshot of `image`: a client watching now that was not
  // when the newest snapshot settled may have opened it before that
  // snapshot. Null `before`: the watchers could not be listed.
  void BeforeSnapshot(const std::string& image, const std::set<WatcherId>* before) {
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
      spdlog::debug("{}: watcher(s) {} appeared since its newest snapshot settled ({} then)",
                    image, fmt::join(appeared, ", "), e.watchers.size());
    }
  }
  // Snapshot `id` of `image` settled: `settled` null if that failed.
  void AfterSettling(const std::string& image, uint64_t id, const Settled* settled) {
    std::lock_guard lock(mu_);
    Entry& e = images_[image];
    e.newest = id;
    e.watchers = settled != nullptr ? settled->watchers : std::set<WatcherId>{};
    if (settled == nullptr || settled->told > 0) e.unsettled.insert(id);
  }
  // Whether a snapshot with id in [from, to) is unsettled.
  bool AnyUnsettled(const std::string& image, uint64_t from, uint64_t to) const {
    std::lock_guard lock(mu_);
    auto it = images_.find(image);
    if (it == images_.end()) return false;
    auto u = it->second.unsettled.lower_bound(from);
    return u != it->second.unsettled.end() && *u < to;
  }
  void Forget(const std::string& image, uint64_t id) {
    std::lock_guard lock(mu_);
    auto it = images_.find(image);
    if (it != images_.end()) it->second.unsettled.erase(id);
  }

 private:
  struct Entry {
    uint64_t newest = 0;
    std::set<WatcherId> watchers;
    std::set<uint64_t> unsettled;
  };
  mutable std::mutex mu_;
  std::map<std::string, Entry> images_;
};

}  // namespace rbd_internal

// --- RbdCluster --------------------------------------------------------------

RbdCluster::RbdCluster(rados_t rados, std::string conf_path, std::string client_name)
    : rados_(rados), conf_path_(std::move(conf_path)), client_name_(std::move(client_name)) {}

RbdCluster::~RbdCluster() { rados_shutdown(rados_); }

StatusOr<std::shared_ptr<RbdCluster>> RbdCluster::Connect(const std::string& conf_path,
                                                          const std::string& client_id,
                                                          const std::string& keyring_path,
                                                          std::chrono::seconds timeout) {
  const std::string client = "client." + client_id;
  rados_t r = nullptr;
  int rc = rados_create2(&r, "ceph", client.c_str(), 0);
  if (rc < 0) return ErrnoStatus(rc, "creating a RADOS handle for " + client);
  auto fail = [&](Status st) {
    rados_shutdown(r);
    return st;
  };
  rc = rados_conf_read_file(r, conf_path.c_str());
  if (rc < 0) {
    return fail(FailedPrecondition(fmt::format("cannot read the Ceph config {}: {} (errno {})",
                                               conf_path, std::strerror(-rc), -rc)));
  }
  const std::string secs = std::to_string(std::max<int64_t>(1, timeout.count()));
  std::vector<std::pair<const char*, std::string>> settings = {
      // Bounded waits: a dead cluster must give errors, not hangs.
      {"client_mount_timeout", secs},
      {"rados_mon_op_timeout", secs},
      {"rados_osd_op_timeout", secs},
      // A config written for daemons may give every process one socket
      // path; clients side by side would then fail with "File exists".
      {"admin_socket", ""},
      // Cairn bounds its own I/O (window x block_size) and flushes where it
      // needs durability; librbd's cache would copy every block once more
      // and hold up to 32 MiB per open image (1 TiB or 1 GiB alike).
      {"rbd_cache", "false"},
      // Writes go to the OSDs from Cairn's own buffers, not from a copy:
      // each buffer is left untouched until its write completes, and librbd
      // holds a write's completion until its last reference to the buffer
      // is gone.
      {"rbd_disable_zero_copy_writes", "false"},
  };
  if (!keyring_path.empty()) settings.emplace_back("keyring", keyring_path);
  for (const auto& [option, value] : settings) {
    if (rc = rados_conf_set(r, option, value.c_str()); rc < 0) {
      return fail(ErrnoStatus(rc, fmt::format("setting {} for {}", option, client)));
    }
  }
  std::string keyring = keyring_path;
  if (keyring.empty()) {
    char buf[1024] = {};
    keyring = rados_conf_get(r, "keyring", buf, sizeof buf) == 0 ? buf : "(unknown)";
  }

  rc = rados_connect(r);
  if (rc == -EACCES || rc == -EPERM) {
    return fail(FailedPrecondition(fmt::format(
        "connecting to the cluster of {} as {}: the cluster refused the key (errno {}); check "
        "that keyring {} holds the key of {} and that this user exists with its caps",
        conf_path, client, -rc, keyring, client)));
  }
  if (rc == -ENOENT) {
    return fail(FailedPrecondition(fmt::format(
        "connecting to the cluster of {} as {}: no key found for {} in keyring {}; check the "
        "keyring path and its content",
        conf_path, client, client, keyring)));
  }
  if (rc == -ETIMEDOUT) {
    return fail(Unavailable(fmt::format(
        "connecting to the cluster of {} as {}: no monitor answered within {} s; check that the "
        "cluster runs and that the mon host in {} is right",
        conf_path, client, secs, conf_path)));
  }
  if (rc < 0) {
    return fail(
        ErrnoStatus(rc, fmt::format("connecting to the cluster of {} as {}", conf_path, client)));
  }
  return std::shared_ptr<RbdCluster>(new RbdCluster(r, conf_path, client));
}

StatusOr<std::string> RbdCluster::ClientAddress() const {
  char* raw = nullptr;
  if (int rc = rados_getaddrs(rados_, &raw); rc < 0) {
    return ErrnoStatus(rc, "getting the client address of " + client_name_);
  }
  std::string addrs = raw != nullptr ? raw : "";
  std::free(raw);
  // Usually one address; an address vector "[v2:IP:0/N,v1:IP:0/N]" names one
  // client too: its first entry, without the type, is what the OSDs list.
  std::string_view a = addrs;
  if (a.starts_with('[')) {
    a.remove_prefix(1);
    a = a.substr(0, std::min(a.find(','), a.find(']')));
  }
  for (std::string_view type : {"any:", "v1:", "v2:"}) {
    if (a.starts_with(type)) a.remove_prefix(type.size());
  }
  if (a.empty() || a.find('/') == std::string_view::npos) {
    return Internal(fmt::format("{} has no usable client address (librados says '{}')",
                                client_name_, addrs));
  }
  return std::string(a);
}

Status RbdCluster::Blocklist(const std::string& addr, std::chrono::seconds expire) {
  std::string arg = addr;  // the C API takes a char*
  const uint32_t secs = static_cast<uint32_t>(std::clamp<int64_t>(expire.count(), 1, UINT32_MAX));
  const int rc = rados_blocklist_add(rados_, arg.data(), secs);
  if (rc == -EACCES || rc == -EPERM) {
    return FailedPrecondition(fmt::format(
        "blocklisting client {} on the cluster of {}: {} may not (errno {}); it needs the mon "
        "cap 'profile rbd' (or 'allow command \"osd blocklist\" with blocklistop=add'), e.g. "
        "ceph auth caps {} mon 'profile rbd' osd 'profile rbd'",
        addr, conf_path_, client_name_, -rc, client_name_));
  }
  if (rc == -EINVAL) {
    return InvalidArgument(fmt::format("blocklisting '{}' on the cluster of {}: not a client "
                                       "address",
                                       addr, conf_path_));
  }
  if (rc < 0) {
    return ErrnoStatus(rc, fmt::format("blocklisting client {} on the cluster of {}", addr,
                                       conf_path_));
  }
  return OkStatus();
}

StatusOr<bool> RbdCluster::Blocklisted(const std::string& pool, const std::string& object) {
  ASSIGN_OR_RETURN(std::shared_ptr<RadosIoCtx> io, OpenIoCtx(pool));
  uint64_t size = 0;
  time_t mtime = 0;
  const int rc = rados_stat(io->get(), object.c_str(), &size, &mtime);
  if (rc == -ESHUTDOWN) return true;  // EBLOCKLISTED
  if (rc == 0 || rc == -ENOENT) return false;
  return ErrnoStatus(rc, fmt::format("checking whether {} is blocklisted (stat of {}/{})",
                                     client_name_, pool, object));
}

StatusOr<std::shared_ptr<RadosIoCtx>> RbdCluster::OpenIoCtx(const std::string& pool) {
  rados_ioctx_t io = nullptr;
  const int rc = rados_ioctx_create(rados_, pool.c_str(), &io);
  if (rc == -ENOENT) {
    return NotFound(fmt::format("pool {} does not exist on cluster {}", pool, conf_path_));
  }
  if (rc < 0) {
    return ErrnoStatus(rc, fmt::format("opening pool {} on cluster {}", pool, conf_path_));
  }
  return std::make_shared<RadosIoCtx>(shared_from_this(), io, pool);
}

StatusOr<std::shared_ptr<RbdPool>> RbdCluster::OpenPool(const std::string& pool,
                                                        const RbdPoolOptions& options) {
  ASSIGN_OR_RETURN(std::shared_ptr<RadosIoCtx> io, OpenIoCtx(pool));
  return std::make_shared<RbdPool>(std::move(io), options);
}

StatusOr<std::shared_ptr<KvStore>> RbdCluster::OpenKvStore(const std::string& pool,
                                                           const std::string& object) {
  ASSIGN_OR_RETURN(std::shared_ptr<RadosIoCtx> io, OpenIoCtx(pool));
  return std::shared_ptr<KvStore>(std::make_shared<RadosKvStore>(std::move(io), object));
}

RadosIoCtx::RadosIoCtx(std::shared_ptr<RbdCluster> cluster, rados_ioctx_t io, std::string pool)
    : cluster_(std::move(cluster)), io_(io), pool_(std::move(pool)) {}

RadosIoCtx::~RadosIoCtx() { rados_ioctx_destroy(io_); }

// --- RbdPool -----------------------------------------------------------------

RbdPool::RbdPool(std::shared_ptr<RadosIoCtx> io, RbdPoolOptions options)
    : io_(std::move(io)), options_(options), book_(std::make_shared<rbd_internal::SettleBook>()) {}

std::string RbdPool::Spec(const std::string& image, const std::string& snap) const {
  return ImageSpec(io_->pool(), image, snap);
}

StatusOr<std::unique_ptr<Volume>> RbdPool::Open(const std::string& image) {
  // No image is opened here: the id comes from the image's id object. A
  // read-write handle is opened only when an operation needs it (see
  // RbdVolume::Head): it holds a watch, and the watch of a process killed
  // with -9 stalls every snapshot of the image for ~30 s.
  ASSIGN_OR_RETURN(std::string id, ReadImageId(io_->get(), image, Spec(image)));
  return std::unique_ptr<Volume>(
      std::make_unique<RbdVolume>(io_, std::move(id), image, book_));
}

namespace {

// Creates `image` with the given features and order.
Status CreateImage(const RadosIoCtx& io, const std::string& image, uint64_t size, uint64_t features,
                   int order) {
  rbd_image_options_t opts;
  rbd_image_options_create(&opts);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FORMAT, 2);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES, features);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_ORDER, static_cast<uint64_t>(order));
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_create4(io.get(), image.c_str(), size, opts);
  }();
  rbd_image_options_destroy(opts);
  if (rc == -EEXIST) {
    return AlreadyExists(fmt::format("image {} already exists", ImageSpec(io.pool(), image)));
  }
  if (rc < 0) {
    return ErrnoStatus(
        rc, fmt::format("creating image {} of {} bytes", ImageSpec(io.pool(), image), size));
  }
  return OkStatus();
}

}  // namespace

Status RbdPool::Create(const std::string& image, uint64_t size) {
  if (image.empty()) return InvalidArgument("creating an image in pool " + name() + ": empty name");
  return CreateImage(*io_, image, size, options_.features, options_.order);
}

StatusOr<bool> RbdPool::Exists(const std::string& image) {
  StatusOr<std::shared_ptr<Image>> h = OpenImage(*io_, image, "", true);
  if (h.ok()) return true;
  if (h.status().code() == Code::kNotFound) return false;
  return h.status();
}

Status RbdPool::Rename(const std::string& from, const std::string& to) {
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_rename(io_->get(), from.c_str(), to.c_str());
  }();
  if (rc == -ENOENT) return NotFound(fmt::format("image {} does not exist", Spec(from)));
  if (rc == -EEXIST) return AlreadyExists(fmt::format("image {} already exists", Spec(to)));
  if (rc < 0) return ErrnoStatus(rc, fmt::format("renaming {} to {}", Spec(from), to));
  return OkStatus();
}

Status RbdPool::Remove(const std::string& image) {
  const std::string spec = Spec(image);
  std::vector<SnapInfo> snaps;
  std::vector<bool> protected_snaps;
  {
    // Read-only: no watch of our own. Check everything before changing anything.
    ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(*io_, image, "", true));
    size_t max = 4;
    std::vector<rbd_image_watcher_t> watchers;
    int rc = 0;
    while (true) {
      watchers.assign(max, rbd_image_watcher_t{});
      rc = rbd_watchers_list(h->get(), watchers.data(), &max);
      if (rc != -ERANGE) break;
    }
    if (rc < 0) return ErrnoStatus(rc, "listing the clients of " + spec);
    rbd_watchers_list_cleanup(watchers.data(), max);
    if (max > 0) {
      return FailedPrecondition(
          fmt::format("removing image {}: {} client(s) have it open; close them first", spec, max));
    }
    ASSIGN_OR_RETURN(snaps, ListSnapsOf(h->get(), spec));
    for (const auto& s : snaps) {
      ASSIGN_OR_RETURN(bool prot, IsProtected(h->get(), spec, s.name));
      protected_snaps.push_back(prot);
      if (!prot) continue;
      ASSIGN_OR_RETURN(size_t clones, CountClones(*io_, image, s.name));
      if (clones > 0) {
        return ClonesDependOn(Spec(image, s.name), clones).Annotate("removing image " + spec);
      }
    }
  }
  if (!snaps.empty()) {
    ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(*io_, image, "", false));
    for (size_t i = 0; i < snaps.size(); ++i) {
      const std::string snap_spec = Spec(image, snaps[i].name);
      if (protected_snaps[i]) {
        const int rc = rbd_snap_unprotect(h->get(), snaps[i].name.c_str());
        if (rc < 0 && rc != -EINVAL) {  // EINVAL: no longer protected
          return ErrnoStatus(rc, "removing image " + spec + ": unprotecting " + snap_spec);
        }
      }
      const int rc = rbd_snap_remove(h->get(), snaps[i].name.c_str());
      if (rc < 0 && rc != -ENOENT) {
        return ErrnoStatus(rc, "removing image " + spec + ": removing " + snap_spec);
      }
    }
  }
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_remove(io_->get(), image.c_str());
  }();
  if (rc == -ENOENT) return NotFound(fmt::format("image {} does not exist", spec));
  if (rc == -EBUSY) {
    return FailedPrecondition(fmt::format("removing image {}: a client has it open", spec));
  }
  if (rc == -ENOTEMPTY) {
    return FailedPrecondition(
        fmt::format("removing image {}: it has snapshots (one was taken meanwhile?)", spec));
  }
  if (rc < 0) return ErrnoStatus(rc, "removing image " + spec);
  return OkStatus();
}

Status RbdPool::Clone(const std::string& image, const std::string& snap, const std::string& dest) {
  if (snap.empty()) return InvalidArgument("cloning " + Spec(image) + ": a snapshot is required");
  if (dest.empty()) return InvalidArgument("cloning " + Spec(image) + ": empty destination name");
  const std::string spec = Spec(image, snap);
  ASSIGN_OR_RETURN(bool dest_exists, Exists(dest));
  if (dest_exists) return AlreadyExists(fmt::format("image {} already exists", Spec(dest)));
  {
    ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(*io_, image, "", false));
    bool exists = false;
    if (int rc = rbd_snap_exists(h->get(), snap.c_str(), &exists); rc < 0) {
      return ErrnoStatus(rc, "cloning " + spec);
    }
    if (!exists) return NotFound(fmt::format("snapshot {} does not exist", spec));
    ASSIGN_OR_RETURN(bool prot, IsProtected(h->get(), Spec(image), snap));
    if (!prot) {
      const int rc = rbd_snap_protect(h->get(), snap.c_str());
      if (rc < 0 && rc != -EBUSY) {  // EBUSY: protected meanwhile
        return ErrnoStatus(rc, "cloning " + spec + ": protecting the snapshot");
      }
    }
  }
  rbd_image_options_t opts;
  rbd_image_options_create(&opts);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FORMAT, 2);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES,
                               options_.features | RBD_FEATURE_LAYERING);
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_clone3(io_->get(), image.c_str(), snap.c_str(), io_->get(), dest.c_str(), opts);
  }();
  rbd_image_options_destroy(opts);
  if (rc == -EEXIST) return AlreadyExists(fmt::format("image {} already exists", Spec(dest)));
  if (rc < 0) return ErrnoStatus(rc, fmt::format("cloning {} into {}", spec, Spec(dest)));
  return OkStatus();
}

Status RbdPool::Copy(const std::string& image, const std::string& snap, const std::string& dest,
                     const ProgressFn& progress) {
  if (snap.empty()) return InvalidArgument("copying " + Spec(image) + ": a snapshot is required");
  if (dest.empty()) return InvalidArgument("copying " + Spec(image) + ": empty destination name");
  const std::string what = fmt::format("copying {} to {}", Spec(image, snap), Spec(dest));
  ASSIGN_OR_RETURN(std::shared_ptr<Image> src, OpenImage(*io_, image, snap, true));
  ASSIGN_OR_RETURN(const uint64_t size, ImageSize(src->get(), Spec(image, snap)));
  ASSIGN_OR_RETURN(std::string src_id, ImageId(src->get(), Spec(image)));
  uint64_t snap_id = 0;
  if (int rc = rbd_snap_get_id(src->get(), snap.c_str(), &snap_id); rc < 0) {
    return ErrnoStatus(rc, what + ": getting the snapshot's id");
  }
  rbd_image_info_t info{};
  if (int rc = rbd_stat(src->get(), &info, sizeof info); rc < 0) return ErrnoStatus(rc, what);
  RETURN_IF_ERROR(CreateImage(*io_, dest, size, options_.features, info.order));
  Status st;
  {
    StatusOr<std::shared_ptr<Image>> dst = OpenImage(*io_, dest, "", false);
    st = dst.ok() ? CopyData(src->get(), (*dst)->get(), io_->pool(), image, snap, Spec(dest), size,
                             progress)
                  : dst.status();
  }
  // What was read of a snapshot removed meanwhile may be zeros: the copy
  // stands only if the snapshot outlived it.
  if (st.ok()) st = RbdVolume(io_, std::move(src_id), image, book_).ConfirmSnap(snap, snap_id);
  if (!st.ok()) {
    const int rc = [&] {
      const auto lock = rbd_internal::ImageContextLock();
      return rbd_remove(io_->get(), dest.c_str());
    }();
    return st.Annotate(what + (rc == 0 ? " (the partial copy was removed)"
                                       : " (the partial copy could not be removed)"));
  }
  return OkStatus();
}

// --- RbdVolume ---------------------------------------------------------------

RbdVolume::RbdVolume(std::shared_ptr<RadosIoCtx> io, std::string id, std::string name,
                     std::shared_ptr<rbd_internal::SettleBook> book)
    : io_(std::move(io)), id_(std::move(id)), name_(std::move(name)), book_(std::move(book)) {}

RbdVolume::~RbdVolume() = default;

std::string RbdVolume::Spec(const std::string& snap) const {
  return ImageSpec(io_->pool(), name_, snap);
}

StatusOr<std::shared_ptr<Image>> RbdVolume::OpenSame(const std::string& snap, bool read_only) {
  ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(*io_, name_, snap, read_only));
  ASSIGN_OR_RETURN(const std::string id, ImageId(h->get(), Spec()));
  RETURN_IF_ERROR(SameIdAsOpened(id));
  return h;
}

StatusOr<std::shared_ptr<Image>> RbdVolume::Head() {
  if (!head_) {
    ASSIGN_OR_RETURN(head_, OpenSame("", false));
  }
  return head_;
}

StatusOr<std::shared_ptr<Image>> RbdVolume::HeadForReading() {
  if (head_) return head_;
  return OpenSame("", true);
}

StatusOr<std::shared_ptr<Image>> RbdVolume::AtSnap(const std::string& snap) {
  if (!snap_ || snap_name_ != snap) {
    snap_.reset();
    ASSIGN_OR_RETURN(snap_, OpenSame(snap, true));
    snap_name_ = snap;
  }
  return snap_;
}

namespace {

// Object map states (two bits per object, in cls_rbd's BitVector<2>).
constexpr uint8_t kObjectNonexistent = 0;
constexpr uint8_t kObjectExistsClean = 3;
// Image and snapshot flags (RBD_FLAG_*): the maps are not to be trusted.
constexpr uint64_t kFlagObjectMapInvalid = 1;
constexpr uint64_t kFlagFastDiffInvalid = 2;
// ChangedSince: quick checks (the map's version only) between two full ones.
constexpr int kFullCheckEvery = 10;

// An RBD object whole and its RADOS version, or kNotFound.
StatusOr<std::pair<std::string, uint64_t>> ReadWholeVersioned(rados_ioctx_t io,
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
std::optional<MapLayout> LayoutOf(const std::string& m) {
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

}  // namespace

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
  ASSIGN_OR_RETURN(auto map_now,
                   ReadWholeVersioned(io_->get(), head_map, u.expected.size() + 64));
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
  return NotFound(fmt::format("snapshot {} (id {}) was removed while it was read", Spec(snap),
                              snap_id));
}

void RbdVolume::CloseSnapshotHandles() {
  snap_.reset();
  snap_name_.clear();
}

void RbdVolume::CloseHandles() {
  CloseSnapshotHandles();
  head_.reset();
}

StatusOr<uint64_t> RbdVolume::Size() {
  ASSIGN_OR_RETURN(auto h, HeadForReading());
  return ImageSize(h->get(), Spec());
}

Status RbdVolume::Resize(uint64_t new_size) {
  ASSIGN_OR_RETURN(auto h, Head());
  if (int rc = rbd_resize(h->get(), new_size); rc < 0) {
    return ErrnoStatus(rc, fmt::format("resizing {} to {} bytes", Spec(), new_size));
  }
  return OkStatus();
}

StatusOr<std::vector<SnapInfo>> RbdVolume::ListSnaps() {
  RETURN_IF_ERROR(CheckSameImage());
  return ListSnapsOfHeader(io_->get(), id_, Spec());
}

Status RbdVolume::CheckSameImage() const {
  ASSIGN_OR_RETURN(const std::string id, ReadImageId(io_->get(), name_, Spec()));
  return SameIdAsOpened(id);
}

Status RbdVolume::SameIdAsOpened(const std::string& id) const {
  if (id == id_) return OkStatus();
  return NotFound(fmt::format("image {} is no longer the image opened (id {}, now {}): it was "
                              "removed or renamed and another created under its name",
                              Spec(), id_, id));
}

Status RbdVolume::CreateSnap(const std::string& snap, Writers writers) {
  if (snap.empty()) return InvalidArgument("creating a snapshot of " + Spec() + ": empty name");
  ASSIGN_OR_RETURN(auto h, Head());
  // Only other clients need settling: our own handle learns of the
  // snapshot as it takes it.
  const bool settle = writers == Writers::kOthers;
  // Those watching the header now hear of the snapshot from librbd itself.
  StatusOr<std::set<WatcherId>> before =
      settle ? Watchers(h->get(), Spec()) : std::set<WatcherId>{};
  const uint64_t self = rados_get_instance_id(rados_ioctx_get_cluster(io_->get()));
  const auto others = [self](std::set<WatcherId> w) {
    std::erase_if(w, [self](const WatcherId& x) { return x.first == self; });
    return w;
  };
  if (settle) {
    const std::optional<std::set<WatcherId>> seen =
        before.ok() ? std::optional(others(*before)) : std::nullopt;
    book_->BeforeSnapshot(name_, seen ? &*seen : nullptr);
  }
  const int rc = rbd_snap_create(h->get(), snap.c_str());
  if (rc == -EEXIST) return AlreadyExists(fmt::format("snapshot {} already exists", Spec(snap)));
  if (rc < 0) return ErrnoStatus(rc, "creating snapshot " + Spec(snap));
  if (!settle) return OkStatus();
  // The snapshot exists: a failure to settle it is worth a warning, not a
  // failed epoch (the diff from it sends whole the objects that changed).
  StatusOr<Settled> settled =
      before.ok() ? Settle(h->get(), *io_, *before, Spec(snap)) : before.status();
  if (!settled.ok()) {
    spdlog::warn("snapshot {} taken, but clients that opened the image meanwhile may not know "
                 "of it: {}",
                 Spec(snap), settled.status().ToString());
  }
  // librbd knows the id of a snapshot it just took (no I/O); should it not,
  // the snapshot still exists and the epoch goes on, as above.
  uint64_t id = 0;
  if (int err = rbd_snap_get_id(h->get(), snap.c_str(), &id); err < 0) {
    spdlog::warn("snapshot {} taken, but its id is unknown ({}): what its settling saw is "
                 "not kept",
                 Spec(snap), std::strerror(-err));
    return OkStatus();
  }
  if (settled.ok()) settled->watchers = others(std::move(settled->watchers));
  book_->AfterSettling(name_, id, settled.ok() ? &*settled : nullptr);
  return OkStatus();
}

Status RbdVolume::RemoveSnap(const std::string& snap) {
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

Status RbdVolume::DiffExtents(const std::string& from_snap, const std::string& to_snap,
                              const std::function<Status(const Extent&)>& fn) {
  // The head's changes are listed on a fresh handle; a snapshot's on the
  // handle at it that OpenIo shares. DiffImage moves that handle to
  // `from_snap` and back before it lists anything, so reads started from
  // its callback read `to_snap`; should it fail on the way, the handle is
  // not trusted again.
  ASSIGN_OR_RETURN(std::shared_ptr<Image> at, to_snap.empty() ? OpenSame("", true)
                                                              : AtSnap(to_snap));
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

StatusOr<std::unique_ptr<AsyncIo>> RbdVolume::OpenIo(const std::string& snap) {
  if (snap.empty()) {
    ASSIGN_OR_RETURN(auto h, Head());
    ASSIGN_OR_RETURN(std::unique_ptr<ObjectWriter> objects,
                     ObjectWriter::Open(h->get(), *io_, Spec()));
    return std::unique_ptr<AsyncIo>(
        std::make_unique<RbdAsyncIo>(std::move(h), false, Spec(), std::move(objects)));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<Image> at, AtSnap(snap));
  // Through librbd. Reading a snapshot's RADOS objects directly (one read
  // op per object) was tried and removed: cairnd aborted with a corrupted
  // heap under it (docs/perf-history.md, "Per-object reads, removed").
  return std::unique_ptr<AsyncIo>(std::make_unique<RbdAsyncIo>(std::move(at), true, Spec(snap)));
}

}  // namespace cairn
