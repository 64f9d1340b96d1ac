#include "engine/object_reader.h"

#include <fmt/format.h>
#include <rbd/features.h>

#include <cassert>
#include <cstring>
#include <deque>
#include <unordered_map>
#include <vector>

#include "engine/handoff_queue.h"

namespace cairn {
namespace {

// Sub-reads per RADOS op at most: an op stays a bounded amount of work for
// the OSD (the whole object is the bound in bytes).
constexpr size_t kMaxPiecesPerOp = 64;

// One extent of one object, part of one started read.
struct Piece {
  uint64_t object_offset = 0;
  uint64_t length = 0;
  char* buf = nullptr;
  uint64_t read = 0;  // started read it belongs to
  size_t bytes_read = 0;
  int rval = 0;
};

class ObjectReader;

// One RADOS read op: the pieces of one object. Lives from Submit until
// its completion is popped; pieces do not move in between (RADOS writes
// bytes_read and rval through pointers to them).
struct Batch {
  ObjectReader* owner = nullptr;
  uint64_t object_no = 0;
  std::vector<Piece> pieces;
  rados_completion_t completion = nullptr;
  rados_read_op_t op = nullptr;
};

void OnBatchComplete(rados_completion_t, void* arg);

class ObjectReader final : public AsyncIo {
 public:
  ObjectReader(rados_ioctx_t io, rados_ioctx_t meta, std::string image, uint64_t snap_id,
               std::string prefix, uint64_t object_size, uint64_t size, std::string spec)
      : io_(io),
        meta_(meta),
        image_(std::move(image)),
        snap_id_(snap_id),
        prefix_(std::move(prefix)),
        object_size_(object_size),
        size_(size),
        spec_(std::move(spec)) {}

  // RADOS may still write into the caller's buffers: wait for every op.
  ~ObjectReader() override {
    pending_.reset();
    while (submitted_ > 0) Release(PopDone());
    rados_ioctx_destroy(io_);
    rados_ioctx_destroy(meta_);
  }

  Status StartRead(uint64_t tag, uint64_t offset, std::span<char> buf) override {
    const uint64_t length = buf.size();
    if (offset > size_ || length > size_ - offset) {
      return InvalidArgument(fmt::format("reading {} at {}~{}: beyond the end of the image ({} bytes)",
                                         spec_, offset, length, size_));
    }
    const uint64_t id = next_read_++;
    Read& r = reads_[id];
    r.tag = tag;
    ++in_flight_;
    // One count held while splitting: a batch that fails to submit settles
    // its pieces at once, and must not settle this read before its last
    // piece is even added.
    r.pieces = 1;
    // Split at object boundaries; pieces of the object being gathered join
    // its op, another object's start a new one.
    for (uint64_t done = 0; done < length;) {
      const uint64_t at = offset + done;
      const uint64_t object_no = at / object_size_;
      const uint64_t in_object = at % object_size_;
      const uint64_t n = std::min(length - done, object_size_ - in_object);
      if (pending_ && (pending_->object_no != object_no ||
                       pending_->pieces.size() >= kMaxPiecesPerOp)) {
        Submit();
      }
      if (!pending_) {
        pending_ = std::make_unique<Batch>();
        pending_->owner = this;
        pending_->object_no = object_no;
      }
      pending_->pieces.push_back(Piece{in_object, n, buf.data() + done, id, 0, 0});
      ++r.pieces;
      done += n;
    }
    if (--r.pieces == 0) ready_.push_back(id);
    return OkStatus();
  }

  Status StartWrite(uint64_t, uint64_t offset, std::span<const char> buf) override {
    return FailedPrecondition(fmt::format("writing {} at {}~{}: a snapshot is read-only", spec_,
                                          offset, buf.size()));
  }
  Status StartZero(uint64_t, uint64_t offset, uint64_t length) override {
    return FailedPrecondition(
        fmt::format("zeroing {} at {}~{}: a snapshot is read-only", spec_, offset, length));
  }

  Completion WaitOne() override {
    assert(in_flight_ > 0 && "WaitOne with nothing in flight");
    while (ready_.empty()) {
      // Nothing more is started while the caller waits: what is gathered
      // goes out now.
      if (pending_) Submit();
      Finish(PopDone());
    }
    const uint64_t id = ready_.front();
    ready_.pop_front();
    auto it = reads_.find(id);
    Completion c{it->second.tag, std::move(it->second.status)};
    reads_.erase(it);
    --in_flight_;
    return c;
  }

  size_t InFlight() const override { return in_flight_; }

  Status Drain() override { return WaitAll(); }

  // From a RADOS thread: only hands the batch over.
  void Done(Batch* b) { done_.Push(b); }

 private:
  struct Read {
    uint64_t tag = 0;
    size_t pieces = 0;  // not yet finished
    Status status;
  };

  std::string ObjectName(uint64_t object_no) const {
    return fmt::format("{}.{:016x}", prefix_, object_no);
  }

  void Submit() {
    std::unique_ptr<Batch> b = std::move(pending_);
    b->op = rados_create_read_op();
    for (Piece& p : b->pieces) {
      rados_read_op_read(b->op, p.object_offset, p.length, p.buf, &p.bytes_read, &p.rval);
    }
    const std::string oid = ObjectName(b->object_no);
    int rc = rados_aio_create_completion2(b.get(), OnBatchComplete, &b->completion);
    if (rc == 0) {
      rc = rados_aio_read_op_operate(b->op, io_, b->completion, oid.c_str(), 0);
      if (rc < 0) rados_aio_release(b->completion);
    }
    if (rc < 0) {
      rados_release_read_op(b->op);
      FailBatch(*b, ErrnoStatus(rc, fmt::format("reading {} (object {})", spec_, oid)));
      return;
    }
    ++submitted_;
    b.release();  // RADOS's until the callback
  }

  Batch* PopDone() {
    Batch* b = done_.Pop();
    --submitted_;
    return b;
  }

  void Release(Batch* b) {
    rados_aio_release(b->completion);
    rados_release_read_op(b->op);
    delete b;
  }

  // A completed op: zero what the object does not hold, settle its reads.
  void Finish(Batch* raw) {
    const int rc = rados_aio_get_return_value(raw->completion);
    const std::string oid = ObjectName(raw->object_no);
    // No object at the snapshot reads as zeros, unless the snapshot itself
    // was removed (and trimmed) under the read: then its clones are gone
    // too, and zeros would be sent as data. Snapshots leave the image
    // header before the OSDs trim them, so a snapshot still listed now was
    // not trimmed before this read.
    Status absent;
    if (rc == -ENOENT) absent = StillThere();
    for (Piece& p : raw->pieces) {
      Status st;
      if (rc == -ENOENT && !absent.ok()) {
        st = absent;
      } else if (rc == -ENOENT) {
        // No such object at the snapshot: it reads as zeros (never
        // written, or discarded).
        std::memset(p.buf, 0, p.length);
      } else if (rc < 0) {
        st = ErrnoStatus(rc, fmt::format("reading {} (object {})", spec_, oid));
      } else if (p.rval < 0) {
        st = ErrnoStatus(p.rval, fmt::format("reading {} (object {} at {}~{})", spec_, oid,
                                             p.object_offset, p.length));
      } else if (p.bytes_read > p.length) {
        st = Internal(fmt::format("reading {}: object {} returned {} bytes for {}~{}", spec_, oid,
                                  p.bytes_read, p.object_offset, p.length));
      } else {
        // An object ends at its last written byte: the rest reads as zeros.
        std::memset(p.buf + p.bytes_read, 0, p.length - p.bytes_read);
      }
      Settle(p.read, std::move(st));
    }
    Release(raw);
  }

  // OK if the snapshot being read is still in the image's header.
  Status StillThere() {
    rbd_image_t h = nullptr;
    if (int rc = rbd_open_read_only(meta_, image_.c_str(), &h, nullptr); rc < 0) {
      return ErrnoStatus(rc, fmt::format("reading {}: checking that the snapshot still exists",
                                         spec_));
    }
    std::string name(256, '\0');
    size_t len = name.size();
    const int rc = rbd_snap_get_name(h, snap_id_, name.data(), &len);
    rbd_close(h);
    if (rc == -ENOENT) {
      return Aborted(fmt::format("reading {}: the snapshot was removed while it was read", spec_));
    }
    if (rc < 0) {
      return ErrnoStatus(rc, fmt::format("reading {}: checking that the snapshot still exists",
                                         spec_));
    }
    return OkStatus();
  }

  void FailBatch(Batch& b, const Status& st) {
    for (Piece& p : b.pieces) Settle(p.read, st);
  }

  void Settle(uint64_t id, Status st) {
    Read& r = reads_.at(id);
    if (r.status.ok() && !st.ok()) r.status = std::move(st);
    if (--r.pieces == 0) ready_.push_back(id);
  }

  rados_ioctx_t io_;    // reads at the snapshot
  rados_ioctx_t meta_;  // the same pool and namespace, at the head
  const std::string image_;
  const uint64_t snap_id_;
  const std::string prefix_;
  const uint64_t object_size_;
  const uint64_t size_;
  const std::string spec_;

  std::unordered_map<uint64_t, Read> reads_;  // started, not yet returned
  uint64_t next_read_ = 0;
  size_t in_flight_ = 0;
  std::deque<uint64_t> ready_;     // settled, not yet returned by WaitOne
  std::unique_ptr<Batch> pending_;  // being gathered, not submitted
  size_t submitted_ = 0;

  HandoffQueue<Batch*> done_;  // completed by RADOS, not yet finished
};

void OnBatchComplete(rados_completion_t, void* arg) {
  auto* b = static_cast<Batch*>(arg);
  b->owner->Done(b);
}

}  // namespace

StatusOr<std::unique_ptr<AsyncIo>> OpenObjectReader(rados_ioctx_t pool, rbd_image_t at_snap,
                                                    const std::string& image,
                                                    const std::string& snap,
                                                    const std::string& spec) {
  uint64_t features = 0;
  if (int rc = rbd_get_features(at_snap, &features); rc < 0) {
    return ErrnoStatus(rc, "reading the features of " + spec);
  }
  if (features & (RBD_FEATURE_DATA_POOL | RBD_FEATURE_MIGRATING)) return std::unique_ptr<AsyncIo>();
  uint8_t old_format = 0;
  if (int rc = rbd_get_old_format(at_snap, &old_format); rc < 0 || old_format != 0) {
    return std::unique_ptr<AsyncIo>();  // format 1 names its objects differently
  }
  uint64_t stripe_unit = 0, stripe_count = 0;
  rbd_image_info_t info{};
  if (int rc = rbd_stat(at_snap, &info, sizeof(info)); rc < 0) {
    return ErrnoStatus(rc, "reading the layout of " + spec);
  }
  if (rbd_get_stripe_unit(at_snap, &stripe_unit) < 0 ||
      rbd_get_stripe_count(at_snap, &stripe_count) < 0 || stripe_count != 1 ||
      stripe_unit != info.obj_size || info.obj_size == 0) {
    return std::unique_ptr<AsyncIo>();
  }
  rbd_linked_image_spec_t parent{};
  rbd_snap_spec_t parent_snap{};
  if (int rc = rbd_get_parent(at_snap, &parent, &parent_snap); rc == 0) {
    rbd_linked_image_spec_cleanup(&parent);
    rbd_snap_spec_cleanup(&parent_snap);
    return std::unique_ptr<AsyncIo>();  // a clone: objects it never wrote are its parent's
  } else if (rc != -ENOENT) {
    return ErrnoStatus(rc, "reading the parent of " + spec);
  }
  char prefix[128];
  if (int rc = rbd_get_block_name_prefix(at_snap, prefix, sizeof(prefix)); rc < 0) {
    return ErrnoStatus(rc, "reading the object prefix of " + spec);
  }
  uint64_t snap_id = 0;
  if (int rc = rbd_snap_get_id(at_snap, snap.c_str(), &snap_id); rc < 0) {
    return ErrnoStatus(rc, "looking up snapshot " + spec);
  }

  // An I/O context of our own: the snapshot to read at is per context.
  char ns[256];
  const int ns_len = rados_ioctx_get_namespace(pool, ns, sizeof(ns));
  if (ns_len < 0) return ErrnoStatus(ns_len, "reading the namespace of " + spec);
  rados_ioctx_t io[2] = {nullptr, nullptr};
  for (rados_ioctx_t& c : io) {
    if (int rc = rados_ioctx_create2(rados_ioctx_get_cluster(pool), rados_ioctx_get_id(pool), &c);
        rc < 0) {
      if (io[0] != nullptr) rados_ioctx_destroy(io[0]);
      return ErrnoStatus(rc, "opening the pool of " + spec);
    }
    rados_ioctx_set_namespace(c, ns_len > 0 ? ns : nullptr);
  }
  rados_ioctx_snap_set_read(io[0], snap_id);
  return std::unique_ptr<AsyncIo>(std::make_unique<ObjectReader>(
      io[0], io[1], image, snap_id, prefix, info.obj_size, info.size, spec));
}

}  // namespace cairn
